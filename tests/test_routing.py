"""The cascade server's rules (from eval's cascade table or the recipe's own threshold), the shadow report's
agreement and verdicts, and the recipe's refusals of a cascade or shadow it cannot run."""

import math
import random

import pytest

from tests.conftest import distillery, recipe_copy
from toolchain.quality.shadow import agrees, verdicts
from toolchain.recipe import RecipeError, load
from toolchain.serve.routing import Rule, decision, rule_for, rules


def _eval_report(n: int = 80, seed: int = 0) -> dict:
    """Per-prompt gold outcomes and confidences of two tasks: 'sure' (the student wrong exactly where its label
    confidence is low) and 'noise' (confidence unrelated to being right)."""
    rng = random.Random(seed)
    paired, confidence = {}, {}
    for task in ("sure", "noise"):
        ids, teacher, student = [], [], []
        for i in range(n):
            pid = f"{task}-{i}"
            right = rng.random() < 0.7
            ids.append(pid)
            teacher.append(1)
            student.append(int(right))
            if task == "sure":
                confidence[pid] = {"label": 0.9 + rng.random() * 0.1 if right else rng.random() * 0.5,
                                   "mean_prob": rng.random(), "min_prob": rng.random(), "first_margin": rng.random()}
            else:
                confidence[pid] = {"mean_prob": rng.random(), "min_prob": rng.random(), "first_margin": rng.random()}
        paired[task] = {"ids": ids, "teacher": teacher, "student": student}
    return {"paired": paired, "confidence": confidence}


def test_rules_come_from_evals_cascade_table_at_the_served_target(tmp_path):
    cfg = load(recipe_copy(tmp_path, eval__cascade={"targets": [0.9, 0.98]}, serve__cascade={"target": 0.9},
                           serve__upstream="openai:http://127.0.0.1:9/v1"))
    got = rules(cfg, _eval_report(), ["sure", "noise"])
    assert got["sure"].score == "label"  # the score with the best AUROC on the calibration part
    assert 0.5 <= got["sure"].threshold <= 1.0  # above every wrong answer's confidence (all under 0.5)
    assert got["noise"].score != "label"  # only a label task has a label score
    assert None not in got  # a call that names no task has no measured rule
    # a target eval's table has no row for, and an eval without confidences, are one line naming the field
    with pytest.raises(RecipeError, match=r"serve\.cascade\.target: 0\.97 is not one of eval\.cascade\.targets"):
        rules(load(recipe_copy(tmp_path, serve__cascade={"target": 0.97},
                               serve__upstream="openai:http://127.0.0.1:9/v1")), _eval_report(), ["sure"])
    with pytest.raises(RecipeError, match="serve.cascade: the finished eval has no cascade table"):
        rules(cfg, {"paired": _eval_report()["paired"]}, ["sure"])


def test_a_fixed_threshold_routes_every_task_and_calls_naming_none(tmp_path):
    cfg = load(recipe_copy(tmp_path, serve__cascade={"score": "mean_prob", "threshold": 0.4},
                           serve__upstream="openai:http://127.0.0.1:9/v1"))
    got = rules(cfg, None, ["a", "b"])
    assert set(got) == {"a", "b", None} and all(r == Rule("mean_prob", 0.4) for r in got.values())


def test_rule_for_a_call_and_what_its_response_says():
    table = {"a": Rule("label", 0.8)}
    assert rule_for(table, "a") == table["a"]
    assert rule_for(table, None) == table["a"]  # the only task: a call naming none is that task's
    assert rule_for({**table, "b": Rule("mean_prob", 0.5)}, None) is None  # several: no rule, forwarded
    assert rule_for(table, "unknown") is None
    rule = Rule("label", 0.8)
    assert rule.keeps({"label": 0.8}) and not rule.keeps({"label": 0.79}) and not rule.keeps({"mean_prob": 0.99})
    assert not rule.keeps(None) and not Rule("label", math.inf).keeps({"label": 1.0})
    told = decision("a", Rule("label", math.inf), {"label": 0.5}, False)
    assert told == {"answered_by": "upstream", "task": "a", "score": "label", "threshold": None, "confidence": 0.5}


def test_agreement_uses_the_tasks_metric_where_it_compares_whole_answers():
    label = {"metric": "label", "labels": ["positive", "negative"]}
    assert agrees(label, "Positive.", "positive") and not agrees(label, "negative", "positive")
    assert agrees({"metric": "number", "tolerance": 1e-6}, "It is 42.", "42")
    # free text (and fragment metrics such as keywords): the same answer in other words agrees, another does not
    teacher = "The council approved a new park by the river after a long debate."
    assert agrees({"metric": "keywords"}, "The council approved a new park by the river after long debates.", teacher)
    assert not agrees(None, "Rain delayed the final match.", teacher)


def test_the_shadow_verdict_is_the_paired_gates():
    rng = random.Random(0)
    pairs = [("good", "positive", "positive")] * 300 + [("bad", "negative", "positive")] * 60 + \
            [("bad", "positive", "positive")] * 40 + [("few", "positive", "positive")] * 5
    pairs += [("close", "positive" if rng.random() < 0.9 else "negative", "positive") for _ in range(50)]
    label = {"metric": "label", "labels": ["positive", "negative"]}
    out = verdicts(pairs, {t: label for t in ("good", "bad", "few", "close")}, {}, 0.05)["tasks"]
    assert out["good"]["n"] == 300 and out["good"]["agreement"] == 1.0
    assert out["good"]["verdict"] == "the student can take this task"
    assert out["bad"]["verdict"] == "no: below the floor" and out["bad"]["agreement"] == pytest.approx(0.4)
    assert out["few"]["verdict"].startswith("not yet: n too small")
    assert out["close"]["decision"] in ("undecided", "fail")  # ~0.9 against a floor of 0.9: not shown above it
    assert out["good"]["floor"] == 0.9
    lower = verdicts(pairs, {"bad": label}, {"bad": 0.3}, 0.05)["tasks"]["bad"]
    assert lower["floor"] == 0.3 and lower["verdict"] == "the student can take this task"


@pytest.mark.parametrize("serve, field", [
    ({"route": "cascade", "cascade": {"score": "mean_prob", "threshold": 1.5}, "upstream": "openai:http://h/v1"},
     "serve.cascade.threshold"),
    ({"route": "cascade", "cascade": {"score": "mean_prob", "threshold": -0.1}, "upstream": "openai:http://h/v1"},
     "serve.cascade.threshold"),
    ({"route": "cascade"}, "serve.upstream"),
    ({"shadow": 0.1, "upstream": "openai:http://h/v1"}, "serve.store"),
    ({"route": "cascade", "upstream": "http://h/v1"}, "serve.upstream"),
    ({"route": "cascade", "upstream": "openai:http://h/v1", "cascade": {"threshold": 0.5}}, "serve.cascade"),
])
def test_a_cascade_or_shadow_it_cannot_run_is_one_line_naming_the_field(tmp_path, serve, field):
    proc = distillery("validate", str(recipe_copy(tmp_path, serve=serve)), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, option", [
    (["promote", "r.yaml", "--margin", "nan"], "--margin"),
    (["promote", "r.yaml", "--margin", "1"], "--margin"),
    (["traffic", "t.db", "--agreement", "--floor", "nan"], "--floor"),
    (["traffic", "t.db", "--agreement", "--floor", "-0.1"], "--floor"),
])
def test_a_margin_or_floor_that_is_no_share_is_refused_before_anything_runs(args, option):
    """NaN passes every comparison of a range: a floor of NaN would have told every task it can be taken."""
    proc = distillery(*args, check=False)
    assert proc.returncode == 2 and f"Invalid value for '{option}'" in proc.stderr, proc.stderr
