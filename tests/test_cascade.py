"""The cascade's statistics (AUROC, the curve, a threshold chosen on one part of the prompts and reported on the
other) and the student's confidence from its own log-probabilities."""

import math
import random

import pytest
import torch

from toolchain.quality.cascade import Case, at, auroc, choose, curve, from_eval, split, thresholds
from toolchain.quality.confidence import answer_scores, label_probability


def _cases(n: int, seed: int, separation: float) -> list[Case]:
    """A teacher right on 80 % of prompts; the student right on 90 % of those, its confidence higher on its right
    answers by ``separation``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        teacher = rng.random() < 0.8
        student = teacher and rng.random() < 0.9
        conf = min(1.0, max(0.0, rng.gauss(0.5 + (separation if student else 0.0), 0.15)))
        out.append(Case(task=("a", "b")[i % 2], confidence=conf, student_right=student, teacher_right=teacher))
    return out


def test_auroc_is_one_for_a_perfect_separator_and_none_without_both_classes():
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.6], [True, True]) is None
    assert 0.85 < auroc(*zip(*[(c.confidence, c.student_right) for c in _cases(400, 0, 0.4)])) <= 1.0


def test_curve_runs_from_keep_all_to_keep_none_with_costs():
    cases = _cases(200, 1, 0.4)
    rows = curve(cases, student_usd=0.00001, teacher_usd=0.001)
    assert rows[0]["kept"] == 1.0 and rows[-1]["kept"] == 0.0
    student = sum(c.student_right for c in cases) / len(cases)
    assert rows[0]["combined"] == pytest.approx(student)  # all kept: the student's own quality
    assert rows[-1]["combined"] == rows[-1]["teacher"] and rows[-1]["retention"] == 1.0  # none kept: the teacher's
    assert rows[0]["usd_per_1k"] == pytest.approx(0.01) and rows[-1]["usd_per_1k"] == pytest.approx(0.01 + 1.0)
    kept = [r["kept"] for r in rows]
    assert kept == sorted(kept, reverse=True)  # a higher threshold never keeps more
    assert all(r["lower"] <= r["retention"] <= r["upper"] for r in rows)
    assert thresholds([Case("a", 0.3, True, True), Case("a", 0.3, False, True)]) == [0.0, 0.3, float("inf")]


def test_a_threshold_chosen_on_calibration_holds_on_the_report_part():
    cases = _cases(1200, 2, 0.4)
    calibration, report = split(cases, 0.5, seed=0)
    assert len(calibration) == 600 and {c.task for c in calibration} == {"a", "b"}
    assert not set(map(id, calibration)) & set(map(id, report))
    t = choose(calibration, 0.98)
    chosen = at(calibration, t, 0.0, 0.0)
    assert chosen["lower"] >= 0.98 and 0.3 < chosen["kept"] < 1.0  # a separating confidence keeps many calls
    looser = at(calibration, thresholds(calibration)[thresholds(calibration).index(t) - 1], 0.0, 0.0)
    assert looser["lower"] < 0.98  # the lowest threshold that reaches the target
    held = at(report, t, 0.0, 0.0)
    assert held["retention"] > 0.95 and held["kept"] > 0.3
    # a confidence that says nothing keeps only what the target can lose at random: far fewer calls
    blind = _cases(1200, 3, 0.0)
    cal, _ = split(blind, 0.5, seed=0)
    assert at(cal, choose(cal, 0.98), 0.0, 0.0)["kept"] < min(0.3, chosen["kept"] / 2)
    assert choose(cal, 1.5) == float("inf")
    assert choose(calibration, 0.98, rule="point") <= t  # the point estimate is less demanding than its bound


def test_confidence_scores_match_the_models_log_probabilities(tiny_llama):
    model = tiny_llama.eval()
    prompt, answer = [1, 5, 9, 14], [22, 7, 3]
    s = answer_scores(model, prompt, answer)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + answer])).logits[0].float(), dim=-1)
    own = [float(logp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(answer)]
    assert s["min_prob"] == pytest.approx(math.exp(min(own)), rel=1e-5)
    assert s["mean_prob"] == pytest.approx(math.exp(sum(own) / len(own)), rel=1e-5)
    first = logp[len(prompt) - 1].exp().sort(descending=True).values
    assert s["first_margin"] == pytest.approx(float(first[0] - first[1]), rel=1e-5)
    assert all(0.0 <= v <= 1.0 for v in s.values())
    assert answer_scores(model, prompt, []) == {"min_prob": 0.0, "mean_prob": 0.0, "first_margin": 0.0}
    labels = [[22, 7], [30], [41, 2, 3]]
    probs = [label_probability(model, prompt, labels, k) for k in range(3)]
    assert sum(probs) == pytest.approx(1.0) and label_probability(model, prompt, labels, None) == 0.0


def test_the_cascade_table_of_an_eval_report_chooses_on_one_part_and_reports_the_other():
    """From an eval report's per-prompt table and the student's confidences: per task the AUROC of every score
    and the one chosen on the calibration part; per target the pooled result on the report part."""
    rng = random.Random(5)
    paired, confidence = {}, {}
    for task in ("a", "b"):
        ids, teacher, student = [], [], []
        for i in range(600):
            pid = f"{task}{i}"
            t = rng.random() < 0.8
            s = t and rng.random() < 0.85
            ids.append(pid), teacher.append(int(t)), student.append(int(s))
            good = min(1.0, max(0.0, rng.gauss(0.75 if s else 0.35, 0.12)))
            confidence[pid] = {"mean_prob": good, "min_prob": rng.random(), "first_margin": rng.random()}
        paired[task] = {"ids": ids, "teacher": teacher, "student": student}
    table = from_eval({"paired": paired, "confidence": confidence}, [0.95, 0.98, 1.0])
    for task in ("a", "b"):
        t = table["tasks"][task]
        assert t["n"] == 600 and t["score"] == "mean_prob" and t["auroc"]["mean_prob"] > 0.8
        assert 0.3 < t["auroc"]["min_prob"] < 0.7  # noise separates nothing
    rows = {r["target"]: r for r in table["targets"]}
    assert all(r["n"] == 600 for r in rows.values())  # the report halves of both tasks
    assert rows[0.95]["kept"] >= rows[0.98]["kept"] >= rows[1.0]["kept"]
    assert rows[0.95]["kept"] > 0.3 and rows[0.95]["retention"] > 0.9
    assert rows[1.0]["kept"] == 0.0 and rows[1.0]["retention"] == 1.0  # a lower bound never reaches 1 unless better
    # few prompts cannot certify a target by its lower bound; the point rule keeps calls (and says less)
    few = {t: {k: v[:60] for k, v in p.items()} for t, p in paired.items()}
    assert from_eval({"paired": few, "confidence": confidence}, [0.95])["targets"][0]["kept"] == 0.0
    assert from_eval({"paired": few, "confidence": confidence}, [0.95], rule="point")["targets"][0]["kept"] > 0.3
    assert from_eval({"paired": paired}, [0.98]) is None  # an eval without confidences: no table
    assert from_eval({"paired": {}, "confidence": confidence}, [0.98]) is None  # no task with gold answers


def test_a_label_task_beside_a_free_text_task_routes_each_on_its_own_scores():
    """Only a label task has a ``label`` score: the free-text task must not be routed on it (it would read 0 for
    every answer), and the AUROC table shows it as missing there."""
    from toolchain.render.markdown import cascade_markdown

    rng = random.Random(7)
    paired, confidence = {}, {}
    for task in ("labels", "text"):
        ids, teacher, student = [], [], []
        for i in range(200):
            pid, right = f"{task}{i}", rng.random() < 0.7
            ids.append(pid), teacher.append(1), student.append(int(right))
            confidence[pid] = {"mean_prob": rng.random(), "min_prob": rng.random(), "first_margin": rng.random()}
            if task == "labels":
                confidence[pid]["label"] = rng.uniform(0.8, 1.0) if right else rng.uniform(0.0, 0.6)
        paired[task] = {"ids": ids, "teacher": teacher, "student": student}
    table = from_eval({"paired": paired, "confidence": confidence}, [0.9])
    assert table["tasks"]["labels"]["score"] == "label" and table["tasks"]["text"]["score"] != "label"
    assert "label" not in table["tasks"]["text"]["auroc"]
    text_row = next(line for line in cascade_markdown(table) if line.startswith("| text |"))
    assert text_row.split("|")[4].strip() == "-"  # the label column (after first_margin) is empty for free text
