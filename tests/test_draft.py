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
