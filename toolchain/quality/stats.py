"""How sure a held-out number is: paired bootstrap intervals, McNemar's exact test and the quality gate's rule.

Every quality number distillery prints is a mean over a few dozen to a few hundred prompts, so one prompt can
move a task's retention by several points. Intervals here come from the paired percentile bootstrap over
prompts: each resample draws prompts with replacement and scores teacher and student on the *same* draw, so
what the two models share (a prompt both get right, or both miss) cancels out of their ratio. The pooled
numbers resample within each task (stratified), so every resample keeps each task's size.

Retention in a resample is (student's right answers) / (teacher's right answers) over the drawn prompts. A
resample in which the teacher gets nothing right has no retention and is left out of its quantiles.

Pure numpy, no model code: the eval stage computes the intervals once, and the gate (pipeline.quality_gate,
the report) re-applies the floors to the stored per-prompt table, so changing a floor re-runs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95  # every reported interval is a two-sided 95 % interval
METHOD = "paired percentile bootstrap over prompts (stratified by task for overall)"


@dataclass(frozen=True)
class Resampled:
    """Right-answer counts of teacher and student in each bootstrap resample of one task (or the pool)."""

    n: int
    teacher: np.ndarray  # (iters,) int
    student: np.ndarray
    point_teacher: int  # right answers on the prompts as drawn (no resampling)
    point_student: int

    def retention(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            r = self.student / self.teacher
        return np.where(self.teacher > 0, r, np.nan)


def resample(tables: dict[str, tuple[list, list]], iters: int, seed: int) -> dict[str, Resampled]:
    """Paired bootstrap of per-prompt 0/1 outcomes: ``tables[task] = (teacher, student)``, same prompt order.

    Returns one ``Resampled`` per task and one for ``"overall"`` (the tasks' resamples added up). Tasks are
    drawn in sorted order from one generator seeded with ``seed``, so the result is a function of the inputs.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, Resampled] = {}
    tot_t = np.zeros(iters, dtype=np.int64)
    tot_s = np.zeros(iters, dtype=np.int64)
    n_all = 0
    for task in sorted(tables):
        t = np.asarray(tables[task][0], dtype=np.int64)
        s = np.asarray(tables[task][1], dtype=np.int64)
        if t.shape != s.shape:
            raise ValueError(f"{task}: teacher and student were scored on different prompts ({len(t)} vs {len(s)})")
        n = len(t)
        if n == 0:
            continue
        idx = rng.integers(0, n, size=(iters, n))
        rt, rs = t[idx].sum(1), s[idx].sum(1)
        out[task] = Resampled(n, rt, rs, int(t.sum()), int(s.sum()))
        tot_t += rt
        tot_s += rs
        n_all += n
    if n_all:
        out["overall"] = Resampled(n_all, tot_t, tot_s, sum(r.point_teacher for r in out.values()),
                                   sum(r.point_student for r in out.values()))
    return out


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """Two-sided percentile interval of the finite samples (None when there are none)."""
    x = samples[np.isfinite(samples)]
    if not len(x):
        return None
    a = (1 - level) / 2
    lo, hi = np.quantile(x, [a, 1 - a])
    return float(lo), float(hi)


def mcnemar(teacher: list, student: list) -> dict:
    """McNemar's exact test of "the student is below the teacher" on paired 0/1 outcomes.

    Only discordant prompts count: b = teacher right and student wrong, c = student right and teacher wrong.
    Under "no difference" each discordant prompt goes either way with probability 1/2, so the one-sided
    p-value is P(X >= b) for X ~ Binomial(b + c, 1/2).
    """
    b = sum(1 for t, s in zip(teacher, student) if t and not s)
    c = sum(1 for t, s in zip(teacher, student) if s and not t)
    m = b + c
    p = sum(math.comb(m, k) for k in range(b, m + 1)) / 2 ** m if m else 1.0
    return {"teacher_only": b, "student_only": c, "p_student_below": p}


def summarize(tables: dict[str, tuple[list, list]], iters: int, seed: int) -> dict:
    """Per task and overall: 95 % intervals of teacher and student accuracy and of retention, and McNemar."""
    res = resample(tables, iters, seed)
    out: dict[str, dict] = {}
    pooled_t: list = []
    pooled_s: list = []
    for task in sorted(tables):
        if task not in res:
            continue
        t, s = tables[task]
        pooled_t += list(t)
        pooled_s += list(s)
        out[task] = _summary(res[task], t, s)
    if "overall" in res:
        out["overall"] = _summary(res["overall"], pooled_t, pooled_s)
    return {"method": METHOD, "level": LEVEL, "iters": iters, "seed": seed, "tasks": out}


def _summary(r: Resampled, t: list, s: list) -> dict:
    return {"n": r.n, "teacher": interval(r.teacher / r.n), "student": interval(r.student / r.n),
            "retention": interval(r.retention()), **mcnemar(t, s)}


# --- the quality gate ------------------------------------------------------------------------------------

RULES = ("point", "confident")


def decide(tables: dict[str, tuple[list, list]], floors: dict[str, float], rule: str = "confident",
           level: float = 0.05, margin: float = 0.1, iters: int = 10_000, seed: int = 1234) -> dict:
    """The gate's verdict for every task with a floor (``floors[task]``; ``"overall"`` is the pool).

    ``point``: a task fails when its retention is below its floor.
    ``confident``: a task fails only when its retention is below the floor *and* the shortfall is
    significant: fewer than ``level`` of the paired resamples reach the floor (the bootstrap p-value of
    "retention >= floor"), which is the same as the one-sided (1 - level) upper bound lying below the floor.
    A retention below the floor that the prompts cannot tell from it passes as "below floor, not significant".

    Under both rules a task whose 95 % retention interval is wider than ``floor ± margin`` (and that did not
    fall significantly short) is marked ``judgeable: false`` ("n=24: cannot tell 0.9 from 0.8") with the number
    of prompts that would narrow it enough (half-widths shrink as 1/sqrt(n)); that note is printed, never silent.
    """
    if rule not in RULES:
        raise ValueError(f"eval.gate must be one of {', '.join(RULES)}, not {rule!r}")
    res = resample(tables, iters, seed)
    tasks: dict[str, dict] = {}
    for name, floor in floors.items():
        r = res.get(name)
        if r is None or r.point_teacher == 0:  # no prompts, or the teacher never right: no retention to judge
            continue
        point = r.point_student / r.point_teacher
        samples = r.retention()
        finite = samples[np.isfinite(samples)]
        ci = interval(samples)
        p = float((finite >= floor - 1e-12).mean()) if len(finite) else 1.0
        below = point < floor - 1e-9  # a ratio of exact counts, compared as such
        if not below:
            passed, why = True, "at or above floor"
        elif rule == "point":
            passed, why = False, "below floor"
        elif p < level:
            passed, why = False, f"below floor, significant (p={p:.3f} < {level})"
        else:
            passed, why = True, f"below floor, not significant (p={p:.3f})"
        half = (ci[1] - ci[0]) / 2 if ci else math.inf
        judgeable = half <= margin + 1e-12 or (below and p < level)  # a significant shortfall is a verdict
        row = {"floor": floor, "retention": point, "interval": ci, "p_at_floor": p, "n": r.n, "passed": passed,
               "why": why, "judgeable": judgeable}
        if not judgeable:
            row["note"] = (f"n={r.n}: cannot tell {floor:g} from {max(floor - margin, 0):g} "
                           f"(95% interval {ci[0]:.2f}-{ci[1]:.2f}); about {needed_n(r.n, half, margin)} prompts would")
        tasks[name] = row
    failed = [k for k, v in tasks.items() if not v["passed"]]
    return {"passed": not failed, "rule": rule, "level": level, "margin": margin, "iters": iters, "seed": seed,
            "failed": failed, "tasks": tasks}


def needed_n(n: int, half_width: float, margin: float) -> int:
    """Prompts for a half-width of ``margin``, scaling today's half-width by 1/sqrt(n)."""
    if not math.isfinite(half_width) or margin <= 0:
        return n
    return max(n, math.ceil(n * (half_width / margin) ** 2))
