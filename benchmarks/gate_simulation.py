"""How often each gate rule passes, fails or cannot decide one task, simulated at a known true retention.

    python benchmarks/gate_simulation.py [--reps 1000]

One task of n held-out prompts (n = 60 and 240), the teacher right on each with probability 0.7, the student right
where the teacher is right with probability r (never where it is wrong), floor 0.8, level 0.05. At r below or at
the floor a pass is a false pass; above it a fail (or, for noninferior, undecided) is a false fail. The same
seeds for every rule, so the rows compare side by side.
"""

from __future__ import annotations

import argparse

from toolchain.quality.stats import error_rates

FLOOR, TEACHER, LEVEL = 0.8, 0.7, 0.05


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=1000)
    a = ap.parse_args()
    print(f"floor {FLOOR}, teacher accuracy {TEACHER}, level {LEVEL}, {a.reps} simulated tasks per row")
    print("| rule | n | true retention | pass | fail | undecided |")
    print("|---|---:|---:|---:|---:|---:|")
    for rule in ("noninferior", "confident"):
        for n in (60, 240):
            for r in (0.7, 0.8, 0.9, 0.95):
                e = error_rates(n, TEACHER, r, FLOOR, rule=rule, level=LEVEL, reps=a.reps, seed=n)
                print(f"| {rule} | {n} | {r:.2f} | {e['pass']:.3f} | {e['fail']:.3f} | {e['undecided']:.3f} |",
                      flush=True)


if __name__ == "__main__":
    main()
