"""A trimmed vocabulary for the student: it reads and writes only the tokens its task needs.

In a small model with a large vocabulary the output layer is a big share of every decode step: SmolLM2-135M
projects onto 49,152 tokens with a 576-wide matrix (28M of its 135M parameters, read in full for every token).
A student for one well-defined task uses a few thousand of them. ``plan`` keeps

  - the special (added) tokens and the single-character byte tokens (any text can still be written),
  - the first ``size`` tokens of the BPE (merge order: the most frequent pieces of the teacher's corpus),
  - every token in the task's own token sequences,
  - each kept word in its other form: after a space (``Ġword``) and at the start of a text or line (``word``),
  - the tokens every kept token's merges are built from,

and ``tokenizer`` rebuilds the BPE over that set: a merge survives when its two parts and its result are kept.
A BPE applies, at each step, the lowest-ranked merge available; removing merges that never applied cannot
change that choice, so every text whose tokens were kept tokenizes exactly as before (tested), and any other
text still tokenizes, into smaller pieces. ``model`` takes the matching rows of the (tied) embedding.

Why both forms of a word: a chat answer starts without a space, so a word the training answers only use
mid-sentence (`` Asia``) is a different token at the start of an answer (``Asia``, a rare merge with a late
id). Without it the student must spell the word from pieces it never produced. On the default recipe's
held-out facts it makes 13 more of 48 gold answer forms writable as the teacher writes them, for 2,200 tokens.

Soft-label over a trimmed vocabulary matches the teacher's distribution conditioned on the kept tokens (the
teacher's logits at the kept ids, renormalised): what the student can write, in the teacher's proportions.
``lookup`` maps a top-k cache's teacher ids to student ids.
"""

from __future__ import annotations

import json

RULES = 2  # the version of what ``plan`` keeps: part of the distill stage's key when the vocabulary is trimmed


def plan(tok, sequences, size: int) -> list[int]:
    """Old token ids to keep, ascending: specials, byte tokens, the first ``size`` ids, the ids in
    ``sequences`` (lists of token ids), the other space form of each kept word, and what builds them."""
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    vocab, merges = model["vocab"], [_pair(m) for m in model["merges"]]
    built_from = {a + b: (a, b) for a, b in merges}
    inverse = {i: t for t, i in vocab.items()}
    keep: set[int] = {i for i in tok.all_special_ids} | set(tok.added_tokens_decoder)
    keep |= {i for t, i in vocab.items() if len(t) == 1 or i < size}
    keep |= {i for seq in sequences for i in seq if i in inverse}
    keep |= {vocab[f] for f in (_other_form(inverse[i]) for i in keep if i in inverse) if f in vocab}
    stack, seen = [inverse[i] for i in keep if i in inverse], set()
    while stack:  # close over merges: the parts of every kept token are kept
        t = stack.pop()
        if t not in seen:
            seen.add(t)
            keep.add(vocab[t])
            stack += built_from.get(t, ())
    return sorted(keep)


def tokenizer(tok, keep: list[int]):
    """A fast tokenizer over the kept ids (renumbered 0..len-1 in the same order), same specials and template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tok.backend_tokenizer.to_str())
    new_id = {old: new for new, old in enumerate(keep)}
    vocab = spec["model"]["vocab"]
    kept_vocab = {t: new_id[i] for t, i in vocab.items() if i in new_id}
    spec["model"]["vocab"] = kept_vocab
    spec["model"]["merges"] = [[a, b] for a, b in map(_pair, spec["model"]["merges"])
                               if a in kept_vocab and b in kept_vocab and a + b in kept_vocab]
    missing = [a["content"] for a in spec["added_tokens"] if a["id"] not in new_id]
    if missing:
        raise ValueError(f"vocabulary trimming would drop special tokens {missing[:3]}")
    for added in spec["added_tokens"]:
        added["id"] = new_id[added["id"]]
    _remap_ids(spec.get("post_processor"), new_id)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token, unk_token=tok.unk_token,
        additional_special_tokens=[t for t in tok.additional_special_tokens],
    )
    fast.chat_template = tok.chat_template
    fast.add_bos_token = getattr(tok, "add_bos_token", False)
    fast.model_max_length = tok.model_max_length
    return fast


def model(m, keep: list[int]):
    """The model with only the kept rows of its embedding (and of an untied output layer); config ids renumbered."""
    import torch

    index = torch.tensor(keep, dtype=torch.long)
    new_in = m.get_input_embeddings()
    tied = m.get_output_embeddings() is not None and m.get_output_embeddings().weight is new_in.weight
    # the family's own embedding module keeps its class (Gemma's scales its output by sqrt(hidden size)): only its
    # table is cut
    new_in.weight = torch.nn.Parameter(new_in.weight.data[index].clone())
    new_in.num_embeddings = len(keep)
    new_in.padding_idx = None  # as before the cut's own: every kept row trains
    out = m.get_output_embeddings()
    if out is not None:
        if tied:
            out.weight = new_in.weight
        else:
            out.weight = torch.nn.Parameter(out.weight.data[index].clone())
        out.out_features = len(keep)
    m.config.vocab_size = len(keep)
    new_id = {old: new for new, old in enumerate(keep)}
    for holder in (m.config, getattr(m, "generation_config", None)):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(holder, name, None) if holder is not None else None
            if isinstance(value, int):
                setattr(holder, name, new_id.get(value))
            elif isinstance(value, list):
                setattr(holder, name, [new_id[v] for v in value if v in new_id])
    return m


def lookup(keep: list[int], teacher_vocab: int):
    """Teacher id -> student id over a trimmed vocabulary, -1 for a token the student does not have."""
    import torch

    table = torch.full((teacher_vocab,), -1, dtype=torch.long)
    table[torch.tensor(keep, dtype=torch.long)] = torch.arange(len(keep))
    return table


def _other_form(token: str) -> str | None:
    """``Ġword`` ↔ ``word`` for a token that is a word (letters after an optional byte-level space)."""
    word = token[1:] if token.startswith("Ġ") else token
    if len(word) < 2 or not word.isalpha():
        return None
    return word if token.startswith("Ġ") else "Ġ" + word


def _pair(merge) -> tuple[str, str]:
    if isinstance(merge, str):
        a, b = merge.split(" ", 1)
        return a, b
    return merge[0], merge[1]


def _remap_ids(node, new_id: dict[int, int]) -> None:
    """Token ids inside a post-processor (TemplateProcessing's special_tokens)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ids" and isinstance(value, list):
                node[key] = [new_id[v] for v in value]
            else:
                _remap_ids(value, new_id)
    elif isinstance(node, list):
        for item in node:
            _remap_ids(item, new_id)
