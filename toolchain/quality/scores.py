"""What the eval stage measures, as plain functions: lm-eval's per-doc hooks (named by the YAMLs in evals/),
their aggregations, retention against the teacher and the quality gate.

Per task and model: ``gold`` (accuracy on the gold answer, where the prompts have one), ``exact`` and ``chrf``
(agreement with the teacher's own held-out answers), ``perplexity`` (teacher-forced, per student token, on
the teacher's answers) and ``greedy`` (the teacher's whole answer is the model's greedy continuation).
"""

from __future__ import annotations

import json
import math

from toolchain.models.chat import final_answer
from toolchain.quality.metrics import answers_match, check, exact_agreement, first_label, normalise
from toolchain.quality.stats import mcnemar

QUALITY_CEILING = 0.5  # teacher gold accuracy below this: the teacher, not the student, limits the task


# --- lm-eval hooks (evals/*.yaml) -------------------------------------------------------------------------

def gold_check(doc: dict, response: str) -> bool | None:
    """The response against the doc's gold answer under the task's declared metric; None without a gold."""
    spec = json.loads(doc["metric"]) if doc.get("metric") else {"metric": "exact"}
    if doc.get("gold") is None or spec["metric"] == "judge":
        return None
    if doc.get("answer_pattern"):  # reasoning: only the final answer counts
        answer = final_answer(response, doc["answer_pattern"])
        return answer is not None and answers_match(answer, doc["gold"])
    return check(spec, response, doc["gold"])


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


def paired_tables(results: dict[str, dict], tasks: list[str]) -> dict[str, dict]:
    """Per task with gold answers: the prompt ids and teacher's and student's 0/1 gold outcomes, paired by id
    (the per-prompt table every interval and the gate are computed from)."""
    out = {}
    for task in tasks:
        teacher = {s["id"]: s.get("gold") for s in results["teacher"]["samples"].get(task, [])}
        student = {s["id"]: s.get("gold") for s in results["student"]["samples"].get(task, [])}
        ids = [i for i in teacher if teacher[i] is not None and student.get(i) is not None]
        if ids:
            out[task] = {
                "ids": ids,
                "teacher": [int(teacher[i]) for i in ids],
                "student": [int(student[i]) for i in ids],
            }
    return out


def against(paired: dict[str, dict], samples: dict[str, list[dict]]) -> dict:
    """An exported file's per-prompt gold outcomes against the PyTorch student's (eval's ``paired`` tables),
    paired by id as ``paired_tables`` pairs them, pooled over the gold tasks: McNemar's exact test of "the file
    is below the PyTorch student"."""

    pytorch = {t: [{"id": i, "gold": g} for i, g in zip(v["ids"], v["student"])] for t, v in paired.items()}
    tables = paired_tables({"teacher": {"samples": pytorch}, "student": {"samples": samples}}, list(paired))
    ref = [g for v in tables.values() for g in v["teacher"]]
    got = [g for v in tables.values() for g in v["student"]]
    test = mcnemar(ref, got)
    return {"n": len(ref), "pytorch_only": test["teacher_only"], "file_only": test["student_only"],
            "p_below_pytorch": test["p_student_below"]}


# --- label tasks: which label was given for which ---------------------------------------------------------

NO_LABEL = "(none)"


def label_report(labels: list[str], golds: dict[str, str], responses: dict[str, str | None]) -> dict:
    """One model on a label task: the confusion matrix (gold label -> the label its answer names first, as the
    ``label`` metric reads it, or "(none)") and per-label precision, recall and support. Accuracy alone hides a
    model that answers the majority label to everything."""
    name = {normalise(x): x for x in labels}
    confusion: dict[str, dict[str, int]] = {x: {} for x in labels}
    for pid, gold in golds.items():
        said = first_label(responses.get(pid) or "", labels)
        row = confusion.setdefault(name.get(normalise(gold), gold), {})
        col = name[said] if said is not None else NO_LABEL
        row[col] = row.get(col, 0) + 1
    per_label = {}
    for x in labels:
        hit = confusion.get(x, {}).get(x, 0)
        predicted = sum(r.get(x, 0) for r in confusion.values())
        support = sum(confusion.get(x, {}).values())
        per_label[x] = {
            "precision": hit / predicted if predicted else None,
            "recall": hit / support if support else None,
            "support": support,
        }
    return {"confusion": confusion, "per_label": per_label}


def label_baselines(labels: list[str], golds: list[str]) -> dict:
    """What no model at all scores: always the most frequent gold label, and a label drawn uniformly."""
    counts: dict[str, int] = {}
    for g in golds:
        counts[normalise(g)] = counts.get(normalise(g), 0) + 1
    top = max(counts, key=lambda k: (counts[k], k)) if counts else None
    name = {normalise(x): x for x in labels}
    return {"majority_label": name.get(top, top), "majority": counts[top] / len(golds) if golds else None,
            "uniform": 1 / len(labels) if labels else None}


def label_tables(specs: dict[str, dict], rows: list[dict], results: dict[str, dict]) -> dict[str, dict]:
    """Per label task with gold answers: the baselines and each model's ``label_report``."""
    out = {}
    for task, spec in specs.items():
        if spec.get("metric") != "label":
            continue
        golds = {r["id"]: r["gold"] for r in rows if r["task"] == task and r["gold"] is not None}
        if not golds:
            continue
        entry = {"labels": spec["labels"], "baselines": label_baselines(spec["labels"], list(golds.values()))}
        for role, res in results.items():
            responses = {s["id"]: s.get("response") for s in res["samples"].get(task, [])}
            entry[role] = label_report(spec["labels"], golds, responses)
        out[task] = entry
    return out


def flagged_files(export_report: dict) -> dict[str, str]:
    """Exported files whose held-out answers are significantly worse than the PyTorch student's (McNemar, paired
    by prompt, at the eval.gate_level export ran with): file (as export.json names it) -> why. Such a file is left
    out of publish and refused by serve unless asked for by name with --include-flagged."""
    level = export_report.get("gate_level", 0.05)
    out = {}
    for r in export_report.get("files", []):
        v = r.get("vs_pytorch")
        if v and v["n"] and v["p_below_pytorch"] < level:
            out[r["file"]] = (f"below the PyTorch student on held-out prompts ({v['pytorch_only']} right only in "
                              f"PyTorch, {v['file_only']} only in the file, of {v['n']}; p = "
                              f"{v['p_below_pytorch']:.2g} < {level:g})")
    return out
