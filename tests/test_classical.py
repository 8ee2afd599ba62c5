"""The classical baseline of a label task: TF-IDF + logistic regression on the training rows' gold labels,
scored on the held-out prompts with the task's own metric, paired with the student."""

import csv

from tests.conftest import ROOT
from toolchain.quality import classical
from toolchain.quality import scores as em
from toolchain.render.markdown import ceiling_notes, label_markdown

SPEC = {"metric": "label", "labels": ["ham", "spam"]}


def _rows():
    with open(ROOT / "tests" / "data" / "messages.csv", newline="") as fh:
        rows = [{"id": r["msg_id"], "task": "sms", "prompt": r["body"], "gold": r["category"].upper()}
                for r in csv.DictReader(fh)]
    held = {r["id"] for label in ("HAM", "SPAM") for r in [r for r in rows if r["gold"] == label][::4]}
    return [r for r in rows if r["id"] not in held], [r for r in rows if r["id"] in held]  # 30 and 10, half each


def test_the_classifier_learns_the_labels_and_is_paired_with_the_student():
    train, held = _rows()
    student = {r["id"]: 0 for r in held}  # a student that gets every held-out prompt wrong
    out = classical.label_task(SPEC, train, held, student, usd_per_hour=0.10, iters=200, seed=0)
    assert out["train_rows"] == 30 and out["n"] == 10 and out["folds"] == 5 and out["C"] in classical.C_GRID
    assert set(out["predictions"]) == {r["id"] for r in held}
    assert set(out["predictions"].values()) <= {"ham", "spam"}  # the declared spelling, whatever the gold's case
    right = sum(out["predictions"][r["id"]] == r["gold"].lower() for r in held)
    assert out["accuracy"] == right / 10 and out["accuracy"] > 0.5  # spam is not hard to tell from ham by its words
    lo, hi = out["interval"]
    assert lo <= out["accuracy"] <= hi
    v = out["vs_student"]
    assert v["n"] == 10 and v["student_only"] == 0 and v["classical_only"] == right and v["student"] == 0.0
    assert v["p_student_below"] < 0.05 < v["p_classical_below"]
    assert out["seconds_per_call"] > 0 and out["usd_per_1k"] > 0 and out["model_bytes"] > 0

    # The same prompts with the student right on all of them: the test goes the other way.
    right_student = classical.label_task(SPEC, train, held, {r["id"]: 1 for r in held}, 0.10, 200, 0)
    assert right_student["vs_student"]["student_only"] == 10 - right
    assert right_student["predictions"] == out["predictions"]  # seeded: the same fit twice


def test_one_label_in_training_is_not_fitted_and_says_why():
    train, held = _rows()
    out = classical.label_task(SPEC, [r for r in train if r["gold"] == "HAM"], held, {}, 0.10, 200, 0)
    assert "skipped" in out and "two labels" in out["skipped"] and "15 training rows" in out["skipped"]


def test_too_few_rows_of_a_label_to_cross_validate_fits_at_the_default():
    train, held = _rows()
    few = [r for r in train if r["gold"] == "HAM"] + [r for r in train if r["gold"] == "SPAM"][:1]
    out = classical.label_task(SPEC, few, held, {}, 0.10, 200, 0)
    assert out["folds"] == 0 and out["C"] == 1.0 and out["cv_accuracy"] is None and "vs_student" not in out


def test_the_classifier_is_in_the_label_section_and_flagged_when_it_is_not_below_the_student():
    train, held = _rows()
    golds = {r["id"]: r["gold"] for r in held}
    results = {"student": {"samples": {"sms": [{"id": r["id"], "gold": 0.0, "response": "no idea"} for r in held]}}}
    labels = {"sms": {"labels": SPEC["labels"], "baselines": em.label_baselines(SPEC["labels"], list(golds.values())),
                      "student": em.label_report(SPEC["labels"], golds, {i: "no idea" for i in golds})}}
    labels = classical.label_tables(labels, {"sms": SPEC}, train, held, results, 0.10, 200, 0)
    c = labels["sms"]["classical"]
    assert sum(sum(row.values()) for row in c["confusion"].values()) == 10
    assert sum(c["confusion"][g].get(g, 0) for g in ("ham", "spam")) == round(10 * c["accuracy"])
    report = {"labels": labels, "retention": {"tasks": {"sms": {"teacher": 0.9, "ceiling": False}}}}
    text = "\n".join(label_markdown(report, {"sms": {"student_usd_per_1k": 0.5}}))
    assert "classical P / R" in text and "classical: gold (rows)" in text
    assert "trained on the 30 training rows' gold labels" in text and "against the student's $0.50000" in text
    assert any("'sms': a classical classifier" in n for n in ceiling_notes(report))
