"""Decode tokens/s of exported files side by side, one process, alternating, greedy on the same chat prompts.

    python benchmarks/runtime_decode.py runs/default/export-*/gguf/default-q8_0.gguf runs/default/export-*/onnx/int8 ...

GGUF files run in llama.cpp, ONNX folders in onnxruntime through toolchain.backends.onnx (what
`distillery serve --backend onnxruntime` uses); a folder from onnxruntime-genai's builder runs both there and in
onnxruntime-genai's own loop (`--backend onnxruntime-genai`), as two rows. Prints the median (min-max) of the
repeats and each row's ratio to the first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

PROMPTS = ["Write one sentence about the sea.", "List three primary colours.", "Summarise: the meeting moved to Friday."]


def engines_for(path: Path) -> dict[str, object]:
    if path.suffix == ".gguf":
        from toolchain.backends.llama_cpp import LlamaCppEngine

        return {str(path): LlamaCppEngine(path, n_ctx=1024)}
    from toolchain.backends.onnx import OnnxEngine

    out = {f"{path} (onnxruntime)": OnnxEngine(path)}
    if (path / "genai_config.json").is_file():
        from toolchain.backends.onnx_genai import GenaiEngine

        out[f"{path} (onnxruntime-genai)"] = GenaiEngine(path)
    return out


def decode_rate(engine, tokens: int) -> float:
    done, spent = 0, 0.0
    for p in PROMPTS:
        ids = engine.tokenize(engine.chat_text([{"role": "user", "content": p}]))
        engine.greedy(ids, 1, stop_ids=set())  # the prompt and first token: not decode
        start = time.perf_counter()
        out = engine.greedy(ids, tokens, stop_ids=set())
        spent += time.perf_counter() - start
        done += len(out)
    return done / spent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    engines = {name: e for f in a.files for name, e in engines_for(f).items()}
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(a.repeats):
        for name, e in engines.items():
            rates[name].append(decode_rate(e, a.tokens))
    first = statistics.median(next(iter(rates.values())))
    for name, r in rates.items():
        m = statistics.median(r)
        print(f"{name:90s} {m:7.1f} tok/s ({min(r):.1f}-{max(r):.1f})  {m / first:.2f}x")


if __name__ == "__main__":
    main()
