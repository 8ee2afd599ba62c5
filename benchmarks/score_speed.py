"""How long export spends scoring one exported file on the held-out tasks: generation and likelihood apart.

    python benchmarks/score_speed.py runs/default/export-*/onnx/fp32 runs/default/export-*/gguf/default-q8_0.gguf
    python benchmarks/score_speed.py runs/default/export-*/gguf/default-q8_0.gguf --batch 1 --batch 8

Runs the recipe's held-out tasks through each file's runtime exactly as ``distillery export`` does (the same
task files, ``EngineLM``), once per --batch value (sequences decoded together: llama.cpp's continuous batching
with the shared prompt prefix read once, or onnxruntime's left-padded batches; 1 = one at a time), files in
the order given, and prints seconds for the generation tasks and for the likelihood tasks, with the gold
accuracy so a faster path that changes answers shows.
"""

from __future__ import annotations

import argparse
import glob
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="A .gguf file or an ONNX folder from an export.")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "default.yaml"))
    ap.add_argument("--batch", type=int, action="append", help="sequences decoded together (repeatable; default 8).")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from toolchain import recipe
    from toolchain.quality.lm_adapter import EngineLM
    from toolchain.quality.heldout import heldout_rows, score, write_tasks

    cfg = recipe.load(args.recipe)
    runs = ROOT / "runs" / cfg.name
    generate = sorted(glob.glob(str(runs / "generate-*")))
    merged = sorted(glob.glob(str(runs / "merge-*")))
    if not generate or not merged:
        sys.exit(f"no finished generate and merge stages under {runs}: run the recipe first")
    rows = heldout_rows(cfg, Path(generate[-1]))
    tok = AutoTokenizer.from_pretrained(Path(merged[-1]) / "model")
    work = Path(tempfile.mkdtemp(prefix="score-speed-"))
    names = write_tasks(cfg, rows, tok, work / "tasks", "student")
    gen = [n for n in names if not n.endswith("_ppl")]
    lik = [n for n in names if n.endswith("_ppl")]
    print(f"{len(rows)} held-out prompts; tasks {', '.join(gen)}")
    for file in args.files:
        path = Path(file)
        for batch in args.batch or [8]:
            if path.suffix == ".gguf":
                from toolchain.backends.llama_cpp import LlamaCppEngine

                engine = LlamaCppEngine(path, n_ctx=2048, logits_all=True)
            else:
                from toolchain.backends.onnx import OnnxEngine

                engine = OnnxEngine(path)
            lm = EngineLM(engine, tok, path.name, batch=batch)
            t0 = time.perf_counter()
            result = score(cfg, lm, work / "tasks" / "student", gen, chat=True)
            t1 = time.perf_counter()
            score(cfg, lm, work / "tasks" / "student", lik, chat=True)
            t2 = time.perf_counter()
            gold = [m.get("gold") for m in result["metrics"].values() if m.get("gold") is not None]
            print(f"{file}  batch {batch}: generation {t1 - t0:.1f} s, likelihood {t2 - t1:.1f} s, "
                  f"mean task gold {100 * sum(gold) / max(len(gold), 1):.1f}%")
            engine.close()


if __name__ == "__main__":
    main()
