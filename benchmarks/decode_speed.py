"""Decode speed of several GGUF files side by side, in one process, alternating, on the same prompt.

    python benchmarks/decode_speed.py runs/default/export-*/gguf/default-q8_0.gguf --teacher q8_0 --repeats 5

Each round decodes --tokens tokens greedily after the same chat prompt with every file in turn (EOS ignored, so
every file does the same work), through distillery's llama.cpp engine. Prints the median tokens/s per file and
its ratio to the teacher (rebuilt at --teacher's type, as bench does), one line per file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--teacher", default="q8_0", help="Type the embedded teacher is rebuilt at for the comparison.")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "default.yaml"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from toolchain.serve import targets as served
    from toolchain.backends.llama_cpp import LlamaCppEngine
    from toolchain.artifacts.gguf_io import open_reader
    from toolchain.recipe import load

    teacher = served.teacher(load(args.recipe), "llama_cpp", args.teacher).path
    paths = [Path(teacher)] + [Path(f) for f in args.files]
    engines = [LlamaCppEngine(p, n_ctx=2048) for p in paths]
    labels = ["teacher"] + [f"{int(open_reader(p).fields['llama.block_count'].contents())} layers, "
                            f"{len(open_reader(p).fields['tokenizer.ggml.tokens'].contents())} tokens" for p in paths[1:]]
    speeds: list[list[float]] = [[] for _ in engines]
    for _ in range(args.repeats):
        for i, e in enumerate(engines):
            ids = e.tokenize(e.chat_text([{"role": "user", "content": "Write a short story about the sea."}]))
            e._kv = []  # a cold cache: every file evaluates the whole prompt
            import llama_cpp

            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(e.llm._ctx.ctx), 0, 0, -1)
            e._decode(ids)
            start = time.perf_counter()
            for _ in range(args.tokens):
                e._decode([int(np.argmax(e.step_logits()))])
            speeds[i].append(args.tokens / (time.perf_counter() - start))
    base = statistics.median(speeds[0])
    print(f"{'file':60s} {'model':24s} {'tokens/s':>9s} {'vs teacher':>10s}")
    for p, label, v in zip(paths, labels, speeds):
        m = statistics.median(v)
        print(f"{str(p)[-60:]:60s} {label:24s} {m:9.1f} {m / base:9.2f}×")


if __name__ == "__main__":
    main()
