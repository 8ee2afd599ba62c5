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
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from toolchain.backends.llama_cpp import LlamaCppEngine
    from toolchain.chat import context, messages_for
    from toolchain.constraints import task_constraints
    from toolchain.formats import load_prompts
    from toolchain.recipe import load
    from toolchain.scoring import check
    from toolchain.stats import mcnemar

    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    cfg = load(a.recipe)
    train, heldout = load_prompts(cfg)
    specs = cfg.task_specs([{"task": p.task, "gold": p.gold} for p in [*train, *heldout]])
    constraints = {t: c for t, c in task_constraints(specs).items() if c[0] == "gbnf"}
    rng = np.random.default_rng(0)
    for path in a.files:
        engine = LlamaCppEngine(path, n_ctx=2048)
        for task, (kind, definition) in constraints.items():
            grammar = engine.grammar(kind, definition)
            rows = [p for p in heldout if p.task == task and p.gold is not None]
            right = {"free": [], "constrained": []}
            spent = {"free": [0, 0.0], "constrained": [0, 0.0]}
            decode = {"free": [0, 0.0], "constrained": [0, 0.0]}
            for p in rows:
                ids = engine.tokenize(engine.chat_text(messages_for(p.prompt, cfg.generate.system_prompt, context(p))))
                for mode in ("free", "constrained"):
                    extra = {"grammar": grammar} if mode == "constrained" else {}
                    start = time.perf_counter()
                    toks, first = [], None
                    for tok in engine.stream(ids, a.max_tokens, **extra):
                        toks.append(tok)
                        if first is None:
                            first = time.perf_counter()
                    end = time.perf_counter()
                    spent[mode][0] += len(toks)
                    spent[mode][1] += end - start
                    if first is not None and len(toks) > 1:  # decode only: the tokens after the first
                        decode[mode][0] += len(toks) - 1
                        decode[mode][1] += end - first
                    right[mode].append(check(specs[task], engine.detokenize(toks), p.gold))
            print(f"{path.name} task {task}, {len(rows)} held-out prompts with a gold label")
            for mode, hits in right.items():
                x = np.array(hits, dtype=float)
                boot = x[rng.integers(0, len(x), (10_000, len(x)))].mean(1)
                lo, hi = np.percentile(boot, [2.5, 97.5])
                tps = decode[mode][0] / decode[mode][1] if decode[mode][1] else float("nan")
                print(f"  {mode:12s} accuracy {100 * x.mean():5.1f}% [{100 * lo:.1f}-{100 * hi:.1f}]  "
                      f"{spent[mode][0]:5d} tokens in {spent[mode][1]:.2f} s; decode {tps:7.1f} tok/s "
                      f"({decode[mode][0]} tokens after the first)")
            ratio = (decode["constrained"][0] / decode["constrained"][1]) / (decode["free"][0] / decode["free"][1])
            print(f"  decode tokens/s constrained / free: {ratio:.2f}x")
            test = mcnemar(right["free"], right["constrained"])
            print(f"  McNemar free vs constrained: {test}")
        engine.close()


if __name__ == "__main__":
    main()
