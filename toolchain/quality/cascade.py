"""The cascade: the student answers the calls it is sure of and hands the rest to the teacher (or the API it
replaces). From held-out prompts — the student's confidence in its answer, whether the student and the teacher
were right, what a call costs each way — this module gives:

    auroc      how well a confidence separates the student's right answers from its wrong ones
    curve      for every threshold: the share of calls kept locally, the combined quality (the student's answer
               where kept, the teacher's elsewhere), its retention of the teacher's, and $ per 1,000 calls
    split      a calibration part and a report part of the prompts, stratified by task (seeded)
    choose     the lowest threshold (the most calls kept) whose combined retention on the calibration part reaches
               the target: by its one-sided lower confidence bound (the gate's score test,
               ``stats.retention_bounds``) or by its point estimate
    at         one threshold on other prompts: what the chosen point gives where it was not chosen

A forwarded call costs the student's attempt plus the teacher's call: the student answered first.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from toolchain.quality.stats import retention_bounds


PREFERRED = ("label", "mean_prob", "min_prob", "first_margin")


@dataclass(frozen=True)
class Case:
    """One held-out prompt as the cascade sees it."""

    task: str
    confidence: float  # the student's, in [0, 1]
    student_right: bool
    teacher_right: bool


def auroc(confidence: list[float], right: list[bool]) -> float | None:
    """Area under the ROC curve of ``confidence`` as a detector of right answers (0.5: no better than chance;
    None when every answer is right or every one wrong)."""
    if len(set(right)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([int(r) for r in right], confidence))


def thresholds(cases: list[Case]) -> list[float]:
    """Every threshold that changes which calls are kept: 0 (keep all), each distinct confidence, and above the
    highest (keep none). A call is kept when its confidence is at or above the threshold."""
    values = sorted({c.confidence for c in cases})
    return [0.0, *[v for v in values if v > 0.0], float("inf")]


def at(cases: list[Case], threshold: float, student_usd: float, teacher_usd: float, alpha: float = 0.05) -> dict:
    """The cascade at ``threshold`` on ``cases``: kept share, combined and teacher quality, the combined
    retention with its one-sided (1 - alpha) bounds, and $ per 1,000 calls (the student's attempt on every call,
    the teacher's price on every forwarded one)."""
    kept = [c.confidence >= threshold for c in cases]
    combined = [c.student_right if k else c.teacher_right for c, k in zip(cases, kept)]
    teacher = [c.teacher_right for c in cases]
    n = len(cases)
    lower, upper = retention_bounds(teacher, combined, alpha) if any(teacher) else (None, None)
    forwarded = n - sum(kept)
    return {"threshold": threshold, "n": n, "kept": sum(kept) / n if n else None,
            "combined": sum(combined) / n if n else None, "teacher": sum(teacher) / n if n else None,
            "retention": sum(combined) / sum(teacher) if any(teacher) else None,
            "lower": lower, "upper": upper,
            "usd_per_1k": 1000 * (student_usd + teacher_usd * forwarded / n) if n else None,
            "kept_wrong": sum(1 for c, k in zip(cases, kept) if k and not c.student_right)}


def curve(cases: list[Case], student_usd: float, teacher_usd: float, alpha: float = 0.05) -> list[dict]:
    """``at`` for every threshold that changes the kept set, from keep-all to keep-none."""
    return [at(cases, t, student_usd, teacher_usd, alpha) for t in thresholds(cases)]


def split(cases: list[Case], fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """(calibration, report): ``fraction`` of each task's prompts chosen by a seeded shuffle for calibration."""
    calibration, report = [], []
    by_task: dict[str, list[int]] = {}
    for i, c in enumerate(cases):
        by_task.setdefault(c.task, []).append(i)
    chosen: set[int] = set()
    rng = random.Random(seed)
    for task in sorted(by_task):
        idx = by_task[task][:]
        rng.shuffle(idx)
        chosen |= set(idx[:round(fraction * len(idx))])
    for i, c in enumerate(cases):
        (calibration if i in chosen else report).append(c)
    return calibration, report


def choose(calibration: list[Case], target: float, alpha: float = 0.05, rule: str = "lower") -> float:
    """The lowest threshold whose combined retention on ``calibration`` reaches ``target``: its one-sided lower
    bound (``rule: lower``) or its point estimate (``rule: point``). Keep-none (inf) when no threshold does."""
    for t in thresholds(calibration):
        point = at(calibration, t, 0.0, 0.0, alpha)
        value = point["lower"] if rule == "lower" else point["retention"]
        if value is not None and value >= target:
            return t
    return float("inf")


def from_eval(report: dict, targets: list[float], fraction: float = 0.5, seed: int = 0, alpha: float = 0.05,
              rule: str = "lower", prices: dict | None = None) -> dict | None:
    """The cascade of an eval report (its per-prompt gold outcomes and the student's confidences): per task, the
    AUROC of every confidence score; the score each task routes on (the best AUROC on the task's calibration part,
    so the choice is not made on the prompts it is reported on); and per target, the thresholds chosen per task on
    the calibration part and what they give on the report part, pooled over the tasks (kept share, combined gold,
    retention with its one-sided bounds). None when the report has no confidences (an older eval) or no task with
    gold answers. With ``prices`` (bench's ``per_call``: per task, and ``all``, the student's and the API's $ per
    1,000 calls at the task's own lengths) each target also gets $ per 1,000 calls: the student's attempt on every
    call plus the API's price on every forwarded one, against the API answering all of them."""
    confidence = report.get("confidence")
    if not confidence:
        return None
    tasks, scores = {}, sorted({name for s in confidence.values() for name in s})
    pooled_cal: dict[str, list[Case]] = {}
    pooled_rep: dict[str, list[Case]] = {}
    for task, table in sorted(report["paired"].items()):
        rows = [(pid, t, s) for pid, t, s in zip(table["ids"], table["teacher"], table["student"]) if pid in confidence]
        if not rows:
            continue
        # the scores every answer of the task has (a label task's ``label`` only there)
        own = [name for name in scores if all(name in confidence[pid] for pid, _, _ in rows)]
        every = {name: [Case(task, confidence[pid][name], bool(s), bool(t)) for pid, t, s in rows] for name in own}
        aurocs = {name: auroc([c.confidence for c in cs], [c.student_right for c in cs]) for name, cs in every.items()}
        split_of = {name: split(cs, fraction, seed) for name, cs in every.items()}
        on_cal = {name: auroc([c.confidence for c in cal], [c.student_right for c in cal])
                  for name, (cal, _) in split_of.items()}
        if not own:
            continue
        # ties (and a calibration part where the student is always right or always wrong) go to the first of
        # PREFERRED: the label's own probability, then the answer's mean probability
        best = max(own, key=lambda name: (on_cal[name] is not None, on_cal[name] or 0.0,
                                          -PREFERRED.index(name) if name in PREFERRED else -len(PREFERRED)))
        tasks[task] = {"n": len(rows), "auroc": aurocs, "score": best}
        pooled_cal[task], pooled_rep[task] = split_of[best]
    if not pooled_cal:  # no task with gold answers: nothing to route on
        return None
    out = []
    for target in targets:
        chosen = {task: choose(cal, target, alpha, rule) for task, cal in pooled_cal.items()}
        kept_cases = [Case(c.task, 1.0 if c.confidence >= chosen[task] else 0.0, c.student_right, c.teacher_right)
                      for task, rep in pooled_rep.items() for c in rep]
        point = at(kept_cases, 1.0, 0.0, 0.0, alpha)
        row = {"target": target, "thresholds": chosen, **{k: point[k] for k in (
            "n", "kept", "combined", "teacher", "retention", "lower", "upper", "kept_wrong")}}
        if prices:
            price = [prices.get(c.task) or prices.get("all") or {} for c in kept_cases]
            if all(p.get("student_usd_per_1k") is not None and p.get("api_usd_per_1k") is not None for p in price):
                row["usd_per_1k"] = sum(p["student_usd_per_1k"] + (0.0 if c.confidence else p["api_usd_per_1k"])
                                        for p, c in zip(price, kept_cases)) / len(kept_cases)
                row["api_usd_per_1k"] = sum(p["api_usd_per_1k"] for p in price) / len(kept_cases)
        out.append(row)
    return {"rule": rule, "calibration": fraction, "seed": seed, "level": alpha, "tasks": tasks, "targets": out}
