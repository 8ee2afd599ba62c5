"""Students of different runs on the same held-out prompts, side by side: per task the student's gold accuracy with
its 95 % interval, retention of the run's own teacher, and against the first run McNemar's exact test both ways.

    python benchmarks/compare_students.py hand-made=runs/default/eval-… synthetic=runs/synthetic/eval-… …

Each argument is NAME=an eval stage directory (its eval.json). Runs must share held-out prompts; prompts are paired
by id, so a task's rows are compared only where both runs scored them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from toolchain.quality.stats import mcnemar, summarize


def load(path: str) -> dict:
    return json.loads((Path(path) / "eval.json").read_text())


def by_id(e: dict, task: str, who: str = "student") -> dict[str, int]:
    p = e["paired"].get(task, {"ids": [], who: []})
    return dict(zip(p["ids"], p[who]))


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    runs = [(a.split("=", 1)[0], load(a.split("=", 1)[1])) for a in argv]
    ref_name, ref = runs[0]
    tasks = sorted(set.intersection(*(set(e["paired"]) for _, e in runs)))
    print(f"| run | {' | '.join(tasks)} | overall | retention | vs {ref_name}: only {ref_name} / only run, "
          f"p(run < {ref_name}), p(run > {ref_name}) |")
    print("|---|" + "---:|" * (len(tasks) + 3))
    for name, e in runs:
        cells, pooled_ref, pooled_run = [], [], []
        own = summarize({t: ([*by_id(e, t, "teacher").values()], [*by_id(e, t).values()]) for t in tasks},
                        iters=10000, seed=1234)["tasks"]
        for t in tasks:
            a, b = by_id(ref, t), by_id(e, t)
            ids = sorted(set(a) & set(b))
            pooled_ref += [a[i] for i in ids]
            pooled_run += [b[i] for i in ids]
            lo, hi = own[t]["student"]
            cells.append(f"{100 * sum(b.values()) / max(len(b), 1):.1f} [{100 * lo:.0f}-{100 * hi:.0f}]")
        o = own["overall"]
        lo, hi = o["student"]
        student = sum(sum(by_id(e, t).values()) for t in tasks) / o["n"]
        ret = o["retention"]
        below, above = mcnemar(pooled_ref, pooled_run), mcnemar(pooled_run, pooled_ref)
        vs = ("-" if name == ref_name else f"{below['teacher_only']} / {below['student_only']}, "
              f"{below['p_student_below']:.3f}, {above['p_student_below']:.3f}")
        print(f"| {name} | {' | '.join(cells)} | {100 * student:.1f} [{100 * lo:.0f}-{100 * hi:.0f}] | "
              f"{e['retention']['overall']['retention']:.2f} [{ret[0]:.2f}-{ret[1]:.2f}] | {vs} |")
    print(f"\nn per task: {', '.join(f'{t} {len(by_id(ref, t))}' for t in tasks)}; [..] 95 % paired bootstrap; "
          "McNemar's exact one-sided tests on prompts both runs scored")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
