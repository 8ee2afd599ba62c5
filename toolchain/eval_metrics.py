"""What the eval stage measures, as plain functions: lm-eval's per-doc hooks (named by the YAMLs in evals/),
their aggregations, retention against the teacher and the quality gate.

Per task and model: ``gold`` (accuracy on the gold answer, where the prompts have one), ``exact`` and ``chrf``
(agreement with the teacher's own held-out answers), ``perplexity`` (teacher-forced, per student token, on
the teacher's answers) and ``greedy`` (the teacher's whole answer is the model's greedy continuation).
"""

from __future__ import annotations

import math

from toolchain.chat import final_answer
from toolchain.scoring import answers_match, exact_agreement, score

QUALITY_CEILING = 0.5  # teacher gold accuracy below this: the teacher, not the student, limits the task


# --- lm-eval hooks (evals/*.yaml) -------------------------------------------------------------------------

def gold_check(doc: dict, response: str) -> bool | None:
    """The response against the doc's gold answer; None when there is none."""
    if doc.get("gold") is None:
        return None
    if doc.get("answer_pattern"):  # reasoning: only the final answer counts
        answer = final_answer(response, doc["answer_pattern"])
        return answer is not None and answers_match(answer, doc["gold"])
    return score(doc["task"], response, doc["gold"])


def process_generation(doc: dict, results: list[str]) -> dict:
    from sacrebleu import sentence_chrf

    response = results[0].strip()
    ok = gold_check(doc, response)
    return {
        "gold": None if ok is None else float(ok),
        "exact": float(exact_agreement(response, doc["teacher_response"])),
        "chrf": sentence_chrf(response, [doc["teacher_response"]]).score,
    }


def process_likelihood(doc: dict, results: list[tuple[float, bool]]) -> dict:
    loglik, is_greedy = results[0]
    return {"perplexity": (loglik, doc["target_tokens"]), "greedy": float(is_greedy)}


def mean_known(items: list) -> float | None:
    known = [x for x in items if x is not None]
    return sum(known) / len(known) if known else None


def token_perplexity(items: list[tuple[float, int]]) -> float:
    tokens = sum(n for _, n in items)
    return math.exp(-sum(ll for ll, _ in items) / max(tokens, 1))


# --- retention and the gate --------------------------------------------------------------------------------

def ratio(student: float | None, teacher: float | None) -> float | None:
    if student is None or teacher is None:
        return None
    if teacher == 0:
        return None if student == 0 else math.inf
    return student / teacher


def retention_table(scores: dict[str, dict[str, dict]], counts: dict[str, int]) -> dict:
    """Per task and overall: teacher and student gold accuracy, their ratio, and the ceiling flag.

    ``scores[model][task]`` holds the metric means; ``counts[task]`` the number of gold docs. Overall gold
    accuracy is pooled over every gold doc (micro), so small tasks weigh what their docs weigh.
    """
    t, s = scores["teacher"], scores["student"]
    rows = {}
    for task in sorted(t):
        tg, sg = t[task].get("gold"), s[task].get("gold")
        rows[task] = {"teacher": tg, "student": sg, "retention": ratio(sg, tg), "gold_docs": counts.get(task, 0),
                      "ceiling": tg is not None and tg < QUALITY_CEILING}
    gold_tasks = [k for k, r in rows.items() if r["teacher"] is not None]
    n = sum(rows[k]["gold_docs"] for k in gold_tasks)
    overall = {"gold_docs": n, "teacher": None, "student": None, "retention": None, "ceiling": False}
    if n:
        overall["teacher"] = sum(rows[k]["teacher"] * rows[k]["gold_docs"] for k in gold_tasks) / n
        overall["student"] = sum(rows[k]["student"] * rows[k]["gold_docs"] for k in gold_tasks) / n
        overall["retention"] = ratio(overall["student"], overall["teacher"])
        overall["ceiling"] = overall["teacher"] < QUALITY_CEILING
    return {"tasks": rows, "overall": overall}


def gate_failures(table: dict, min_retention: float, per_task: dict[str, float] | None = None) -> list[str]:
    """One line per task (and overall) whose retention is below its threshold (``per_task`` names tasks with
    their own, ``min_retention`` is everyone else's); empty means the gate passes."""
    unknown = sorted(set(per_task or {}) - set(table["tasks"]))
    if unknown:
        raise ValueError(f"eval.task_min_retention names {', '.join(unknown)}, not a held-out task "
                         f"(tasks: {', '.join(sorted(table['tasks']))})")
    failed = []
    for name, row in [*table["tasks"].items(), ("overall", table["overall"])]:
        r, floor = row["retention"], (per_task or {}).get(name, min_retention)
        if r is not None and r < floor - 1e-9:  # a ratio of exact counts, compared as such
            failed.append(f"{name}: retention {r:.3f} < {floor} "
                          f"(student {row['student']:.3f}, teacher {row['teacher']:.3f})")
    return failed
