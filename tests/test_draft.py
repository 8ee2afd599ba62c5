"""The student as its teacher's draft model in llama.cpp's speculative decoding (backends/speculative.py,
`distillery draft`)."""

import json

import pytest

from tests.test_families import SMOLLM2, _model
from toolchain.artifacts import gguf_io
from toolchain.backends import speculative
from toolchain.models import vocab
from toolchain.models.references import load_tokenizer, resolve

TEACHER = resolve(SMOLLM2).path
PROMPT = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"


def _gguf(tmp, name: str, keep: list[int] | None = None):
    model, tok = _model("llama3"), load_tokenizer(resolve(SMOLLM2))
    if keep is not None:
        model, tok = vocab.model(model, keep), vocab.tokenizer(tok, keep)
    folder = tmp / name
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return gguf_io.build_float(folder, tmp / f"{name}.gguf", TEACHER, {})


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory):
    """A random 4-layer model over the teacher's whole tokenizer: a draft llama.cpp accepts, rarely right."""
    return _gguf(tmp_path_factory.mktemp("draft"), "draft")


def test_the_pair_check_takes_a_draft_with_the_teachers_vocabulary_and_refuses_a_trimmed_one(random_draft, tmp_path):
    assert speculative.incompatibility(TEACHER, random_draft) is None
    assert speculative.incompatibility(TEACHER, TEACHER) is None
    tok = load_tokenizer(resolve(SMOLLM2))
    trimmed = _gguf(tmp_path, "trimmed", vocab.plan(tok, [tok("Name a colour.").input_ids], 300))
    why = speculative.incompatibility(TEACHER, trimmed)
    assert why and "tokens" in why and "student.vocab" in why


def test_speculative_decoding_gives_the_teachers_own_greedy_text_whatever_the_draft(random_draft):
    rows = speculative.measure(TEACHER, random_draft, [PROMPT, "<|im_start|>user\nSay hello.<|im_end|>\n"
                                                       "<|im_start|>assistant\n"], 16, [3], threads=2)
    alone, spec = rows
    assert (alone["draft_max"], spec["draft_max"]) == (0, 3)
    assert alone["drafted"] == 0 and alone["tokens_per_teacher_pass"] == 1.0
    assert spec["drafted"] > 0 and 0 <= spec["accepted"] <= spec["drafted"]
    assert spec["same_text_as_teacher"] == 2  # a random draft changes the speed, never the answer
    # the teacher as its own draft: (almost) every proposed token is accepted, several tokens per teacher pass
    own = speculative.measure(TEACHER, TEACHER, [PROMPT], 16, [4], threads=2)[1]
    assert own["acceptance"] >= 0.9 and own["tokens_per_teacher_pass"] > 2 and own["same_text_as_teacher"] == 1
    # the draft alone timed beside it: the teacher as its own draft costs about one teacher token a token
    assert 0.5 < own["draft_token_cost"] < 2 and own["predicted_speedup"] > 0


def test_distillery_draft_refuses_a_trimmed_student_and_bad_lengths_in_one_line(tmp_path):
    from click.testing import CliRunner

    from toolchain.cli import main

    tok = load_tokenizer(resolve(SMOLLM2))
    trimmed = _gguf(tmp_path, "trimmed", vocab.plan(tok, [tok("Say it.").input_ids], 300))
    recipe = tmp_path / "r.yaml"
    data = tmp_path / "h.jsonl"
    data.write_text(json.dumps({"id": "h1", "prompt": "Say it.", "task": "t"}) + "\n")
    recipe.write_text(f"name: r\nteacher: {SMOLLM2}\nstudent: {{from: teacher, keep_layers: 4}}\n"
                      f"data: {{train: [{data}], heldout: [{data}]}}\nexport: {{quants: [q4_1]}}\n")
    runner = CliRunner()
    res = runner.invoke(main, ["draft", str(recipe), "--student", str(trimmed), "--quant", "q4_1"])
    assert res.exit_code != 0 and "cannot draft" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["draft", str(recipe), "--draft-max", "2,x"])
    assert res.exit_code == 2 and "--draft-max" in res.output


def _teacher_choices_within(engine, ids: list[int], tokens: list[int], gap: float) -> bool:
    """Every token is the teacher's greedy choice after the tokens before it, or within ``gap`` logits of it
    (llama.cpp's one-token and batched kernels may order a near tie differently)."""
    for i, tok in enumerate(tokens):
        engine._kv = None
        engine._prime(ids + tokens[:i])
        logits = engine.step_logits()
        if logits[tok] < logits.max() - gap:
            return False
    return True


def test_a_served_engine_with_a_draft_decodes_the_teachers_greedy_tokens(random_draft):
    from toolchain.backends.llama_cpp import LlamaCppEngine

    teacher, check = LlamaCppEngine(TEACHER, threads=2), LlamaCppEngine(TEACHER, threads=2)
    ids = teacher.tokenize(PROMPT)
    alone = list(teacher.stream(ids, 24))
    teacher.attach_draft(LlamaCppEngine(random_draft, threads=2), 4)
    with_random = list(teacher.stream(ids, 24))
    assert teacher.speculation["drafted"] > 0
    assert _teacher_choices_within(check, ids, with_random, 0.1) and len(with_random) == len(alone)
    teacher.attach_draft(LlamaCppEngine(TEACHER, threads=2), 4)  # a draft that is always right
    teacher.speculation = {"passes": 0, "drafted": 0, "accepted": 0}
    with_itself = list(teacher.stream(ids, 24))
    s = teacher.speculation
    assert _teacher_choices_within(check, ids, with_itself, 0.1)
    assert s["accepted"] >= 0.8 * s["drafted"] and len(with_itself) / s["passes"] > 2  # several tokens a pass


def test_serve_with_a_draft_answers_through_the_openai_client_and_refuses_a_trimmed_one(random_draft, tmp_path):
    import sys

    import httpx
    from openai import OpenAI

    from tests.conftest import ROOT
    from toolchain.backends.llama_cpp import LlamaCppEngine
    from toolchain.serve.targets import start_child_server, stop_child_server

    recipe = ROOT / "recipes" / "ci.yaml"
    proc, port = start_child_server(lambda p: [sys.executable, "-m", "toolchain.cli", "serve", str(recipe), "--model",
                                               "teacher", "--draft", str(random_draft), "--draft-max", "3", "--port",
                                               str(p)], "/health", "the teacher with a draft", 300)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        messages = [{"role": "user", "content": "Name a colour."}]
        got = client.chat.completions.create(model="ci-teacher", messages=messages, max_tokens=16, temperature=0)
        page = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        counts = {k: float(line.rsplit(" ", 1)[1]) for line in page.splitlines() for k in
                  ("draft_passes_total", "draft_tokens_total", "draft_tokens_accepted_total")
                  if line.startswith(f"distillery_{k}{{")}
    finally:
        stop_child_server(proc)
    engine = LlamaCppEngine(TEACHER, threads=2)  # the same speculative decoding in process gives the same answer
    engine.attach_draft(LlamaCppEngine(random_draft, threads=2), 3)
    served = engine.tokenize(engine.chat_text(messages))
    assert got.choices[0].message.content == engine.detokenize(list(engine.stream(served, 16))).strip()
    assert counts["draft_passes_total"] >= 1 and counts["draft_tokens_total"] >= counts["draft_passes_total"]
    assert counts == {"draft_passes_total": engine.speculation["passes"], "draft_tokens_total":
                      engine.speculation["drafted"], "draft_tokens_accepted_total": engine.speculation["accepted"]}

    tok = load_tokenizer(resolve(SMOLLM2))
    trimmed = _gguf(tmp_path, "trimmed", vocab.plan(tok, [tok("Name a colour.").input_ids], 300))
    from click.testing import CliRunner

    from toolchain.cli import main

    res = CliRunner().invoke(main, ["serve", str(recipe), "--model", "teacher", "--draft", str(trimmed)])
    assert res.exit_code != 0 and "cannot draft" in res.output and "Traceback" not in res.output


def test_the_report_sets_the_teacher_with_its_draft_beside_the_teacher_and_the_student():
    """The "teacher with draft" columns come from one `distillery draft` run (both teacher columns measured side by
    side), priced per call at the bench's machine price; the teacher with a draft has the teacher's quality."""
    from toolchain.render.markdown import draft_markdown

    D = speculative.Decoded
    rows = speculative._rows(0.0, {0: [D(40, 1.0, 0, 0, "a")], 2: [D(40, 0.8, 30, 20, "a")],
                                   4: [D(40, 0.5, 40, 30, "a")]}, draft_tps=160.0)
    # a draft token costs 40/160 = 0.25 teacher tokens; length 4: 10 passes of 4 drafted tokens, 4 tokens each
    assert rows[2]["draft_token_cost"] == 0.25 and rows[2]["predicted_speedup"] == pytest.approx(4 / (1 + 4 * 0.25))
    assert rows[2]["predicted_speedup_large_pair"] == pytest.approx(4 / (1 + 4 * 0.5 / 7), abs=1e-3)
    assert "predicted_speedup" not in rows[0]
    draft = {"rows": rows, "threads": 2}
    assert speculative.best(rows)["draft_max"] == 4 and speculative.best(rows)["speedup"] == pytest.approx(2.0)
    bench = {"settings": {"usd_per_hour": 0.36}, "per_call": {"all": {"answer_tokens": 50}},
             "quality": {"teacher_gold": 0.7, "student_gold": 0.5},
             "summary": {"student": {"decode_tps": {"median": 100.0}}}}
    text = "\n".join(draft_markdown(draft, bench))
    assert "teacher + draft (length 4)" in text and "80.0 (2.00×)" in text  # 40 tokens in 0.5 s
    # 50 tokens at 40 / 80 / 100 tok/s, $0.36 an hour: 1,000 calls cost $0.125 / $0.0625 / $0.05
    assert "| 0.12500 | 0.06250 | 0.05000 |" in text
    assert "75 %, 4.00" in text  # 30 of 40 drafted tokens accepted; 40 tokens from 10 teacher passes
    assert "| 70.0 | 70.0 (the teacher's greedy output: 1/1" in text and text.rstrip().endswith("draft length).")
    assert draft_markdown(None, bench) == []
    assert draft_markdown({"rows": rows[:1], "threads": 2}, bench) == []  # no draft length measured
