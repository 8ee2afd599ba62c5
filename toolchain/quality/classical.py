"""The cheapest student may not be a language model: for a ``label`` task, a TF-IDF + logistic-regression
classifier (scikit-learn) trained on the same training rows' gold labels, scored on the same held-out prompts as
teacher and student, with its interval, a paired test against the student and its measured cost per call.

Features: word uni- and bigrams and character 2-5-grams within words (spelling tricks, numbers, URLs), sublinear
term frequency. The regularisation ``C`` is chosen by stratified cross-validation on the training rows alone
(never on the held-out prompts it is reported on). A training set with fewer than two rows of some label in it
is fitted at C = 1 without the search.
"""

from __future__ import annotations

import pickle
import statistics
import time

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import FeatureUnion, Pipeline

from toolchain.quality import stats
from toolchain.quality.cost import local_per_call
from toolchain.quality.metrics import check, normalise
from toolchain.quality.scores import label_report

NAME = "TF-IDF (word 1-2 and character 2-5 grams) + logistic regression"
C_GRID = (0.1, 1.0, 10.0, 100.0)
FOLDS = 5
TIMED_CALLS = 200  # held-out prompts classified one at a time for the per-call wall time


def _pipeline(seed: int, c: float = 1.0) -> Pipeline:
    features = FeatureUnion([
        ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True)),
        ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, lowercase=True)),
    ])
    return Pipeline([("features", features), ("model", LogisticRegression(C=c, max_iter=2000, random_state=seed))])


def fit(texts: list[str], labels: list[str], seed: int) -> tuple[Pipeline, dict]:
    """The classifier fitted on ``texts`` -> ``labels`` and how it was chosen (C, cross-validated accuracy)."""
    counts = [labels.count(x) for x in set(labels)]
    folds = min(FOLDS, min(counts))
    if folds < 2:
        model = _pipeline(seed).fit(texts, labels)
        return model, {"C": 1.0, "cv_accuracy": None, "folds": 0}
    search = GridSearchCV(_pipeline(seed), {"model__C": list(C_GRID)},
                          cv=StratifiedKFold(folds, shuffle=True, random_state=seed), n_jobs=1)
    search.fit(texts, labels)
    return search.best_estimator_, {"C": float(search.best_params_["model__C"]),
                                     "cv_accuracy": float(search.best_score_), "folds": folds}


def seconds_per_call(model: Pipeline, texts: list[str]) -> float:
    """Median wall time of classifying one text at a time (a call as a server would see it)."""
    walls = []
    for text in texts[:TIMED_CALLS]:
        start = time.perf_counter()
        model.predict([text])
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


def label_task(spec: dict, train: list[dict], heldout: list[dict], student: dict[str, float | None],
               usd_per_hour: float, iters: int, seed: int) -> dict:
    """One label task: the classifier trained on ``train`` (rows with ``prompt`` and ``gold``), its prediction for
    every gold ``heldout`` row scored by the task's own metric, its accuracy with a bootstrap interval, McNemar
    against the student's 0/1 gold outcomes (``student``: id -> outcome) paired by prompt, and its cost per call.
    A task it cannot be trained for has ``skipped`` saying why."""
    labels = spec["labels"]
    name = {normalise(x): x for x in labels}
    rows = [(r["prompt"], name[normalise(r["gold"])]) for r in train
            if r.get("gold") is not None and normalise(r["gold"]) in name]
    if len({y for _, y in rows}) < 2:
        return {"skipped": f"{len(rows)} training rows with a gold label among the task's labels, "
                           f"{len({y for _, y in rows})} distinct: a classifier needs two labels or more"}
    start = time.perf_counter()
    model, chosen = fit([x for x, _ in rows], [y for _, y in rows], seed)
    fit_s = time.perf_counter() - start
    gold = [r for r in heldout if r.get("gold") is not None]
    predicted = [str(y) for y in model.predict([r["prompt"] for r in gold])] if gold else []
    right = {r["id"]: int(check(spec, p, r["gold"])) for r, p in zip(gold, predicted)}
    wall = seconds_per_call(model, [r["prompt"] for r in gold]) if gold else None
    out = {
        "method": NAME, "train_rows": len(rows), "n": len(gold), **chosen, "fit_s": fit_s,
        "predictions": {r["id"]: p for r, p in zip(gold, predicted)},
        "accuracy": sum(right.values()) / len(right) if right else None,
        "model_bytes": len(pickle.dumps(model)), "seconds_per_call": wall,
        "usd_per_1k": local_per_call(wall, usd_per_hour) * 1000 if wall is not None else None,
    }
    ids = [i for i in right if student.get(i) is not None]
    if ids:  # paired with the student: "teacher" below is the student, "student" the classifier
        s, c = [int(student[i]) for i in ids], [right[i] for i in ids]
        summary = stats.summarize({"task": (s, c)}, iters, seed)["tasks"]["task"]
        out["interval"] = summary["student"]
        out["vs_student"] = {"n": len(ids), "student": float(np.mean(s)), "classical": float(np.mean(c)),
                             "student_only": summary["teacher_only"],
                             "classical_only": summary["student_only"],
                             "p_classical_below": summary["p_student_below"],
                             "p_student_below": stats.mcnemar(c, s)["p_student_below"]}
    return out


def label_tables(labels: dict[str, dict], specs: dict[str, dict], train: list[dict], heldout: list[dict],
                 results: dict[str, dict], usd_per_hour: float, iters: int, seed: int) -> dict[str, dict]:
    """``labels`` (``scores.label_tables``) with a ``classical`` entry per task: ``label_task`` on the task's
    training and held-out rows, and the classifier's confusion matrix and per-label precision and recall in the
    form each model has."""
    for task, entry in labels.items():
        student = {s["id"]: s.get("gold") for s in results["student"]["samples"].get(task, [])}
        got = label_task(specs[task], [r for r in train if r["task"] == task],
                         [r for r in heldout if r["task"] == task], student, usd_per_hour, iters, seed)
        if "predictions" in got:
            golds = {r["id"]: r["gold"] for r in heldout if r["task"] == task and r["gold"] is not None}
            got.update(label_report(entry["labels"], golds, got["predictions"]))
        entry["classical"] = got
    return labels
