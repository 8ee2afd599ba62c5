"""Task-constrained decoding (serve.constrain: task) against free decoding, side by side on the same files:
held-out accuracy of every label task, and decode speed.

    python benchmarks/constrained_decode.py recipes/default.yaml runs/default/export-*/gguf/default-q8_0.gguf \
        runs/default/export-*/gguf/default-iq4_nl.gguf

Each held-out prompt of a label task is answered greedily twice per file, through the engine `distillery serve`
uses: free, scored by the task's metric (the first label the answer names), and under the grammar of the
task's labels (the answer is a label). Prints accuracy with a 95% bootstrap interval, McNemar's test between the
two, the time for all answers, and decode tokens/s (the tokens after each answer's first, so prompt time is left
out) with their ratio (the grammar path samples through llama-cpp-python's sampler chain, the free path through
distillery's own greedy loop: the ratio is what a user of the server pays per token).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    from toolchain.backends.llama_cpp import LlamaCppEngine
    from toolchain.quality.constraints import free_and_constrained
    from toolchain.data.formats import load_prompts
    from toolchain.recipe import load

    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    cfg = load(a.recipe)
    train, heldout = load_prompts(cfg)
    specs = cfg.task_specs([{"task": p.task, "gold": p.gold} for p in [*train, *heldout]])
    rows = [{"prompt": p.prompt, "task": p.task, "gold": p.gold, **p.extras()} for p in heldout]
    rng = np.random.default_rng(0)
    for path in a.files:
        engine = LlamaCppEngine(path, n_ctx=2048)
        try:
            results = free_and_constrained(engine, specs, rows, cfg.generate.system_prompt, a.max_tokens)
        finally:
            engine.close()
        for task, c in results.items():
            print(f"{path.name} task {task}, {c['n']} held-out prompts with a gold answer")
            for mode in ("free", "constrained"):
                m = c[mode]
                x = np.array(m["right"], dtype=float)
                boot = x[rng.integers(0, len(x), (10_000, len(x)))].mean(1)
                lo, hi = np.percentile(boot, [2.5, 97.5])
                tps = m["decode_tokens_per_s"] or float("nan")
                print(f"  {mode:12s} accuracy {100 * x.mean():5.1f}% [{100 * lo:.1f}-{100 * hi:.1f}]  "
                      f"{m['tokens']:5d} tokens in {m['seconds']:.2f} s; decode {tps:7.1f} tok/s "
                      f"({m['decode_tokens']} tokens after the first)")
            print(f"  decode tokens/s constrained / free: {c['speed_ratio']:.2f}x")
            print(f"  McNemar, constrained below free: {c['mcnemar']}")


if __name__ == "__main__":
    main()
