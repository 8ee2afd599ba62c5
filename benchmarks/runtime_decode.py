"""Decode tokens/s of exported files side by side, one process, alternating, greedy on the same chat prompts.

    python benchmarks/runtime_decode.py runs/default/export-*/gguf/default-q8_0.gguf runs/default/export-*/onnx/int8 ...

GGUF files run in llama.cpp, ONNX folders in onnxruntime through toolchain.backends.onnx (what
`distillery serve --backend onnxruntime` uses). Prints the median (min-max) of the repeats and each file's ratio
to the first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

PROMPTS = ["Write one sentence about the sea.", "List three primary colours.", "Summarise: the meeting moved to Friday."]


def engine_for(path: Path):
    if path.suffix == ".gguf":
        from toolchain.backends.llama_cpp import LlamaCppEngine

        return LlamaCppEngine(path, n_ctx=1024)
    from toolchain.backends.onnx import OnnxEngine

    return OnnxEngine(path)


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
    engines = {f: engine_for(f) for f in a.files}
    rates: dict[Path, list[float]] = {f: [] for f in a.files}
    for _ in range(a.repeats):
        for f, e in engines.items():
            rates[f].append(decode_rate(e, a.tokens))
    first = statistics.median(rates[a.files[0]])
    for f, r in rates.items():
        m = statistics.median(r)
        print(f"{str(f):70s} {m:7.1f} tok/s ({min(r):.1f}-{max(r):.1f})  {m / first:.2f}x")


if __name__ == "__main__":
    main()
