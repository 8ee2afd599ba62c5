"""Intervals and tests of toolchain.quality.stats against values computed by hand on tiny tables."""

import math

import numpy as np
import pytest

from toolchain.quality import stats


def test_mcnemar_exact_one_sided():
    # 5 prompts only the teacher gets right, 1 only the student: P(X >= 5), X ~ Bin(6, 1/2) = (6 + 1) / 64
    t = [1, 1, 1, 1, 1, 0, 1, 0]
    s = [0, 0, 0, 0, 0, 1, 1, 0]
    m = stats.mcnemar(t, s)
    assert (m["teacher_only"], m["student_only"]) == (5, 1)
    assert m["p_student_below"] == pytest.approx(7 / 64)
    assert stats.mcnemar([1, 0], [1, 0])["p_student_below"] == 1.0  # no discordant prompt: no evidence
    # 3 vs 0: 1/8; the student better (0 vs 3): P(X >= 0) = 1
    assert stats.mcnemar([1, 1, 1], [0, 0, 0])["p_student_below"] == pytest.approx(1 / 8)
    assert stats.mcnemar([0, 0, 0], [1, 1, 1])["p_student_below"] == 1.0


def test_identical_models_have_a_zero_width_retention_interval():
    # paired resampling: whatever prompts are drawn, the two models score the same, so retention is exactly 1
    t = [1, 0, 1, 1, 0, 1, 1, 0, 1, 1]
    out = stats.summarize({"a": (t, list(t))}, iters=2000, seed=0)["tasks"]["a"]
    assert out["retention"] == (1.0, 1.0)
    assert out["teacher"] == out["student"] and out["teacher"][0] < 0.7 < out["teacher"][1]


def test_retention_interval_is_the_binomial_quantiles_when_the_teacher_is_always_right():
    # teacher right on all 10, student on 7: a resample's retention is Bin(10, 0.7) / 10. By hand:
    # P(X <= 3) = 0.0106, P(X <= 4) = 0.0473 -> the 2.5 % quantile is 4; P(X <= 9) = 0.9718 -> the 97.5 % is 10
    t, s = [1] * 10, [1] * 7 + [0] * 3
    out = stats.summarize({"a": (t, s)}, iters=20_000, seed=5)["tasks"]["a"]
    assert out["retention"] == (0.4, 1.0)
    assert out["student"] == (0.4, 1.0) and out["teacher"] == (1.0, 1.0)


def test_resamples_without_a_right_teacher_answer_are_left_out():
    # teacher right on 1 of 2 prompts, student on the same one: a resample of [wrong, wrong] (1/4 of them) has
    # no retention; every other resample gives exactly 1
    r = stats.resample({"a": ([1, 0], [1, 0])}, iters=4000, seed=1)["a"]
    ret = r.retention()
    assert np.isnan(ret).mean() == pytest.approx(0.25, abs=0.03)
    assert stats.interval(ret) == (1.0, 1.0)


def test_the_pool_is_stratified_by_task():
    tables = {"a": ([1] * 4, [1] * 4), "b": ([1, 0], [0, 0])}
    res = stats.resample(tables, iters=500, seed=2)
    assert res["overall"].n == 6
    np.testing.assert_array_equal(res["overall"].teacher, res["a"].teacher + res["b"].teacher)
    # task a always contributes 4 right answers: the pooled teacher count lies in 4..6, never below
    assert res["overall"].teacher.min() >= 4


def test_the_same_seed_gives_the_same_intervals():
    tables = {"a": ([1, 1, 0, 1, 0, 1], [1, 0, 0, 1, 0, 0])}
    assert stats.summarize(tables, 1000, 9) == stats.summarize(tables, 1000, 9)
    assert stats.summarize(tables, 1000, 9)["seed"] == 9


def test_needed_prompts_scale_with_the_square_of_the_width():
    assert stats.needed_n(24, 0.2, 0.1) == 96
    assert stats.needed_n(100, 0.05, 0.1) == 100  # already narrow enough
    assert stats.needed_n(10, math.inf, 0.1) == 10


def test_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="eval.gate must be one of point, confident"):
        stats.decide({"a": ([1], [1])}, {"a": 0.9}, rule="vibes")
