"""What lets a real pair fit in memory: the chunked loss, low-precision weights with float32 masters, gradient
checkpointing, and teacher/student pairs whose output layers differ only by padding rows."""

import copy

import pytest
import torch

from toolchain.models.chat import IGNORE
from toolchain.recipe import SoftConfig
from toolchain.training.step import MasterWeights, OnlineTeacher, step_loss
from toolchain.training.batches import collate

from tests.conftest import tiny_model_dir, tiny_recipe, tiny_train

EXAMPLES = [([1, 5, 9, 13, 2, 7, 7, 3, 40, 41, 42], [IGNORE] * 4 + [2, 7, 7, 3, 40, 41, 42]),
            ([1, 5, 9, 16, 32, 1, 8], [IGNORE] * 3 + [16, 32, 1, 8]),
            ([1, 5, 9, 22, 23, 24, 25, 26, 27], [IGNORE] * 3 + [22, 23, 24, 25, 26, 27])]


def _pair(tiny, trimmed: bool):
    """(student, teacher, batch, kept ids or None) in float64: the reference precision."""
    from toolchain.models import vocab

    torch.manual_seed(5)
    teacher = copy.deepcopy(tiny).double()
    student = copy.deepcopy(teacher)
    kept = None
    examples = EXAMPLES
    if trimmed:
        kept = sorted({i for ids, _ in EXAMPLES for i in ids} | set(range(0, 128, 3)))
        student = vocab.model(student, kept)
        new = {old: n for n, old in enumerate(kept)}
        examples = [([new[i] for i in ids], [y if y == IGNORE else new[y] for y in labels]) for ids, labels in EXAMPLES]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student.train()
    return student, teacher, collate(examples, pad_id=0), kept


def _topk(teacher, batch, kept, k=16):
    """A top-k cache's rows for the batch, from the teacher's own logits (teacher ids; with ``kept``, mapped)."""
    from toolchain.models import vocab

    ids = batch["input_ids"] if kept is None else torch.tensor(kept)[batch["input_ids"]]
    at = batch["labels"][:, 1:] != IGNORE
    with torch.no_grad():
        logits = teacher(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1][at]
    top = torch.log_softmax(logits.float(), -1).topk(k)
    if kept is None:
        return top.indices, top.values
    mapped = vocab.lookup(kept, 128)[top.indices]
    return mapped.clamp(min=0), top.values, mapped >= 0


def _loss_and_grads(student, batch, soft, teacher, topk, chunk):
    student.zero_grad(set_to_none=True)
    loss, n, parts = step_loss(student, batch, soft, teacher=teacher, topk=topk, chunk=chunk)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}, parts


@pytest.mark.parametrize("trimmed", [False, True], ids=["full-vocab", "trimmed-vocab"])
@pytest.mark.parametrize("source", ["online", "cache"])
@pytest.mark.parametrize("kind", ["ce", "forward_kl", "reverse_kl", "jsd"])
def test_chunked_loss_equals_the_unchunked_loss_and_gradients(tiny_llama, kind, source, trimmed):
    student, teacher, batch, kept = _pair(tiny_llama, trimmed)
    soft = None if kind == "ce" else SoftConfig(loss=kind, temperature=2.0, alpha=0.7, beta=0.3)
    online = OnlineTeacher(teacher, [], kept) if soft is not None and source == "online" else None
    topk = _topk(teacher, batch, kept) if soft is not None and source == "cache" else None
    whole, g_whole, parts_whole = _loss_and_grads(student, batch, soft, online, topk, None)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    for chunk in (1, 4, n - 1):
        part, g_part, parts = _loss_and_grads(student, batch, soft, online, topk, chunk)
        assert abs(float(part) - float(whole)) <= 1e-6 * max(1.0, abs(float(whole)))
        assert g_part.keys() == g_whole.keys() and len(g_whole) > 0
        for k in g_whole:
            torch.testing.assert_close(g_part[k], g_whole[k], atol=1e-6, rtol=1e-6)
        assert parts == pytest.approx(parts_whole, rel=1e-6)


def test_a_chunk_holds_only_its_own_logits(tiny_llama):
    """What chunking is for: the projection never makes a [positions, vocabulary] tensor beyond one chunk."""
    student, teacher, batch, _ = _pair(tiny_llama, False)
    soft = SoftConfig(loss="jsd", alpha=1.0)
    heads = {student.get_output_embeddings().weight.data_ptr(), teacher.get_output_embeddings().weight.data_ptr()}
    widest = {"rows": 0, "calls": 0}
    real_linear = torch.nn.functional.linear

    def watching(x, w, b=None):
        out = real_linear(x, w, b)
        if w.data_ptr() in heads:
            widest["rows"] = max(widest["rows"], out.reshape(-1, out.shape[-1]).shape[0])
            widest["calls"] += 1
        return out

    torch.nn.functional.linear = watching
    try:
        _loss_and_grads(student, batch, soft, OnlineTeacher(teacher, []), None, 4)
    finally:
        torch.nn.functional.linear = real_linear
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert widest["rows"] == 4 and widest["calls"] == 2 * -(-n // 4)  # student and teacher, every chunk


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama):
    student, _, batch, _ = _pair(tiny_llama, False)
    plain, g_plain, _ = _loss_and_grads(student, batch, None, None, None, None)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    again, g_again, _ = _loss_and_grads(student, batch, None, None, None, None)
    assert float(again) == pytest.approx(float(plain), rel=1e-9)
    for k in g_plain:
        torch.testing.assert_close(g_again[k], g_plain[k], atol=1e-9, rtol=1e-7)


def test_master_weights_keep_updates_bfloat16_would_round_away():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    masters = MasterWeights([p])
    opt = torch.optim.SGD(masters.masters, lr=1e-4)
    for _ in range(100):
        p.grad = torch.ones_like(p)
        masters.grads_in()
        opt.step()
        masters.weights_out()
    # each step moves 1e-4, below bfloat16's resolution at 1.0 (2^-7): without masters the weight never moves
    assert float(masters.masters[0][0].detach()) == pytest.approx(0.99, abs=1e-5)
    assert float(p[0]) == pytest.approx(0.99, abs=4e-3) and float(p[0]) < 1.0


def test_bfloat16_student_and_teacher_train_and_the_loss_falls(tiny_dir, tmp_path):
    """bfloat16 weights (float32 masters in the optimizer), chunked loss and checkpointing: the loss falls as it
    does in float32, step for step within 1 %."""
    curves = {}
    for dtype in ("float32", "bfloat16"):
        (tmp_path / dtype).mkdir()
        cfg = tiny_recipe(tiny_dir, tmp_path / dtype, dtype=dtype, teacher_dtype=dtype, epochs=10, lr=3e-3,
                          train_embeddings=True, loss_chunk=8, gradient_checkpointing=True)
        _, log, weights = tiny_train(cfg, tmp_path / dtype, "run")
        assert all(w.dtype == getattr(torch, dtype) for w in weights.values())
        curves[dtype] = [r["loss"] for r in log]
    low = curves["bfloat16"]
    assert sum(low[-3:]) / 3 < 0.85 * sum(low[:3]) / 3
    assert low == pytest.approx(curves["float32"], rel=1e-2)


def test_a_teacher_with_padding_rows_teaches_soft_label(tiny_dir, tmp_path):
    """The teacher's output layer has 8 rows more than the student's (one tokenizer): online soft-label uses the
    rows both have, validate says so in one line; a student whose tokenizer differs is still refused."""
    from toolchain.pipeline.runner import preflight

    padded = tiny_model_dir(tmp_path / "padded-teacher", extra_rows=8)
    cfg = tiny_recipe(padded, tmp_path, student={"from": str(tiny_dir)})
    manifest, log, _ = tiny_train(cfg, tmp_path, "padded")
    assert all(r["kd"] > 0 for r in log) and manifest.metrics["steps"] == 2

    from toolchain.ui import console

    with console.capture() as captured:
        preflight(cfg)
    assert "the divergence uses the 49152 both have" in captured.get()

    from transformers import AutoTokenizer

    from toolchain.recipe import RecipeError

    other = tiny_model_dir(tmp_path / "other-tokenizer", extra_rows=1)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<another_token>"])  # one more token: a different vocabulary, not padding
    tok.save_pretrained(other)
    # another vocabulary: soft labels across tokenizers, online only; validate reports the alignment
    across = tiny_recipe(padded, tmp_path, student={"from": str(other)})
    with console.capture() as captured:
        preflight(across)
    assert "100.0% of" in captured.get() and "one-to-one token pairs" in captured.get()
    cached = across.model_copy(update={"distill": across.distill.model_copy(update={
        "soft": across.distill.soft.model_copy(update={"teacher_logits": "cache"})})})
    with pytest.raises(RecipeError, match="teacher_logits: .* tokenize differently"):
        preflight(cached)
