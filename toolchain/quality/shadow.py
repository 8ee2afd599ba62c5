"""Shadow mode's evidence: on calls both the student and the teacher (or the API it replaces) answered, how often
the student agrees, per task, with the verdict of the same paired one-sided gate eval uses
(toolchain.quality.stats.decide, rule noninferior): the teacher's answer is taken as right on every call, so the
retention tested is the student's agreement with it.

Agreement on a call: for a task the recipe scores with a metric that compares whole answers (label: the same
label; exact, number, json, chrf), the student's answer passes that metric with the teacher's answer as the gold;
for any other task (free text, or a metric whose gold is a fragment: contains, keywords, regex, judge) the two
answers' chrF is at least ``FREE_TEXT_CHRF`` — near-paraphrases agree, different content does not."""

from __future__ import annotations

from toolchain.quality.metrics import check, chrf_at_least, exact_agreement
from toolchain.quality.stats import decide

FLOOR = 0.9  # the agreement a task must be shown to keep when neither the command nor the recipe names one
WHOLE_ANSWER = ("label", "exact", "number", "json", "chrf")
FREE_TEXT_CHRF = 50.0


def measured_by(spec: dict | None) -> str:
    return spec["metric"] if spec and spec.get("metric") in WHOLE_ANSWER else f"chrF>={FREE_TEXT_CHRF:g}"


def agrees(spec: dict | None, student: str, teacher: str) -> bool:
    if spec and spec.get("metric") in WHOLE_ANSWER:
        return check({**spec, "max_words": None}, student, teacher)
    return exact_agreement(student, teacher) or chrf_at_least(student, teacher, FREE_TEXT_CHRF)


def verdicts(pairs: list[tuple[str, str, str]], specs: dict[str, dict], floors: dict[str, float],
             level: float = 0.05, default_floor: float | None = None) -> dict:
    """Per task (``pairs`` are (task, student's answer, teacher's answer)): n, agreement, its one-sided bounds at
    ``level``, the metric agreement was measured with, and the verdict."""
    by_task: dict[str, list[bool]] = {}
    for task, student, teacher in pairs:
        by_task.setdefault(task, []).append(agrees(specs.get(task), student, teacher))
    tables = {task: ([1] * len(agree), [int(a) for a in agree]) for task, agree in by_task.items()}
    floor_of = {task: floors.get(task, FLOOR if default_floor is None else default_floor) for task in tables}
    gate = decide(tables, floor_of, rule="noninferior", level=level)["tasks"] if tables else {}
    out = {}
    for task, agree in sorted(by_task.items()):
        g = gate.get(task, {})
        lower, upper = g.get("interval") or (None, None)
        decision = g.get("decision")
        if decision == "pass":
            verdict = "the student can take this task"
        elif decision == "fail":
            verdict = "no: below the floor"
        else:
            verdict = "not yet: n too small" + (f" ({g['note']})" if g.get("note") else "")
        out[task] = {"n": len(agree), "agreement": sum(agree) / len(agree), "lower": lower, "upper": upper,
                     "floor": floor_of[task], "measured_by": measured_by(specs.get(task)), "decision": decision,
                     "verdict": verdict}
    return {"level": level, "tasks": out}
