"""Soft labels between a teacher and a student whose tokenizers differ.

The teacher reads each training example in its own tokens (its own prompt, as generate asked it, then the answer
cut by its own tokenizer: llama.cpp's for a GGUF). The two cuts of the answer are aligned on character spans
(``models/alignment.py``), and every labelled student position gets one of three losses on top of cross-entropy:

- **mapped** (a one-to-one group: both sides are about to spell the same token after the same text): the recipe's
  divergence between the two next-token distributions on the tokens both vocabularies spell alike, each folded
  onto those tokens + one bucket for the rest of its mass (the top-k cache's k+1 form);
- **sorted** (any other token of a group): the universal logit distillation distance (Boizard et al. 2024): the
  L1 distance between the two distributions' probabilities sorted in decreasing order (the first ``top_k``),
  which needs no shared vocabulary; the i-th student token of a group is paired with the i-th teacher token
  (the last one when the teacher's side is shorter);
- **none**: the end-of-answer token and tokens outside every group: cross-entropy only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from toolchain.backends.llama_cpp import LlamaVocab
from toolchain.models import alignment
from toolchain.models.chat import IGNORE, context, flat_prompt, messages_for
from toolchain.models.references import ModelRef, load_tokenizer, resolve, vocabulary
from toolchain.training.losses import MAPPED, NONE, SORTED
from toolchain.training.step import FrozenTeacher


def hf_texts(tok) -> list[str | None]:
    """Each token's own text in a fast tokenizer, read after an anchor token so that a leading space survives the
    decoder (SentencePiece drops it at the start of a text); None for special tokens and byte pieces."""
    anchor = tok("a", add_special_tokens=False).input_ids[:1]
    head = tok.decode(anchor)
    special = set(tok.all_special_ids)
    decoded = tok._tokenizer.decode_batch([anchor + [i] for i in range(len(tok))], skip_special_tokens=False)
    return [None if i in special or not t.startswith(head) or "\ufffd" in t else t[len(head):] or None
            for i, t in enumerate(decoded)]


def hf_spans(tok, text: str) -> tuple[list[int], list[alignment.Span]]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(x) for x in enc["offset_mapping"]]


class TeacherText:
    """The teacher's own tokens: its prompt as generate asked it and an answer's tokens with their spans."""

    def __init__(self, cfg, vocab: LlamaVocab | None = None, tok=None):
        """One of ``vocab`` (a GGUF teacher: llama.cpp's tokenizer) and ``tok`` (a Hugging Face tokenizer)."""
        self.cfg, self.vocab, self.tok = cfg, vocab, tok

    @classmethod
    def of(cls, ref: ModelRef, cfg) -> TeacherText:
        return cls(cfg, vocab=LlamaVocab(ref.path)) if ref.kind == "gguf" else cls(cfg, tok=load_tokenizer(ref))

    def prompt_ids(self, row: dict) -> list[int]:
        g = self.cfg.generate
        if g.prompt_template:
            text = g.prompt_template.replace("{prompt}", flat_prompt(row["prompt"], context(row)))
            return self.vocab.tokenize(text, True) if self.vocab else self.tok(text).input_ids
        msgs = messages_for(row["prompt"], g.system_prompt, context(row))
        if self.vocab:
            return self.vocab.tokenize(self.vocab.chat_text(msgs), False)
        return list(self.tok.apply_chat_template(msgs, add_generation_prompt=True))

    def spans(self, text: str) -> tuple[list[int], list[alignment.Span]]:
        if self.vocab is None:
            return hf_spans(self.tok, text)
        ids = self.vocab.tokenize(text, False)
        return ids, alignment.spans_from_pieces(text, [self.vocab.piece(i) for i in ids])

    def texts(self) -> list[str | None]:
        if self.vocab is None:
            return hf_texts(self.tok)
        out = []
        for i in range(len(self.vocab)):
            try:
                out.append(self.vocab.piece(i).decode("utf-8") or None)
            except UnicodeDecodeError:
                out.append(None)
        return out

    def name(self, token: int) -> str:
        return self.vocab.llm.detokenize([token], special=True).decode("utf-8", "replace") if self.vocab \
            else self.tok.convert_ids_to_tokens(token)


@dataclass
class Example:
    """One training example as the teacher reads it: its tokens, and for each labelled student position (in
    order) the teacher position whose prediction it is compared with (-1: none) and how (NONE/MAPPED/SORTED)."""

    teacher_ids: list[int]
    positions: list[int]
    kinds: list[int]


def plan(teacher: TeacherText, tok, rows: list[dict], pairs: list[tuple[list[int], list[int]]],
         source: list[int], report: alignment.Report | None = None) -> list[Example]:
    """The teacher's view of every example (``source[i]``: the row pair i came from)."""
    out = []
    for (ids, labels), i in zip(pairs, source):
        row = rows[i]
        labelled = [j for j in range(1, len(ids)) if labels[j] != IGNORE]
        resp = [ids[j] for j in labelled]
        s_ids, s_spans = hf_spans(tok, row["response"])
        t_resp, t_spans = teacher.spans(row["response"])
        t_prompt = teacher.prompt_ids(row)
        positions, kinds = [-1] * len(labelled), [NONE] * len(labelled)
        n = min(len(s_ids), len(resp))
        if s_ids[:n] == resp[:n]:  # the student's answer tokens are the ones cut here (else: cross-entropy only)
            groups = report.add(row["response"], t_spans, s_spans, [teacher.name(t) for t in t_resp]) if report \
                else alignment.align(t_spans, s_spans)[0]
            for g in groups:
                for k, s in enumerate(g.b):
                    if s < n:
                        t = g.a[min(k, len(g.a) - 1)]
                        positions[s] = len(t_prompt) + t - 1
                        kinds[s] = MAPPED if g.one_to_one else SORTED
        last = max(positions, default=-1)
        out.append(Example((t_prompt + t_resp)[: last + 2], positions, kinds))
    return out


class AlignedTeacher(FrozenTeacher):
    """The frozen teacher of cross-tokenizer soft labels: ``hidden_at`` gives one teacher hidden state per
    labelled student position of the batch (zeros where there is none), ``project`` its logits; ``kinds`` says
    which loss each row takes and ``shared`` the (teacher ids, student ids) both vocabularies spell alike."""

    aligned = True

    def __init__(self, model, examples: list[Example], shared: tuple[list[int], list[int]], pad_id: int,
                 out_device=None):
        super().__init__(model, out_device)
        self.examples, self.pad_id = examples, pad_id
        self.t_shared = torch.tensor(shared[0], dtype=torch.long, device=self.device)
        self.s_shared = torch.tensor(shared[1], dtype=torch.long, device=self.device)
        self.kinds = torch.zeros(0, dtype=torch.long)

    @torch.no_grad()
    def hidden_at(self, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        device = self.head_weight.device
        chosen = [self.examples[i] for i in batch["example"].tolist()]
        width = max(1, max(len(e.teacher_ids) for e in chosen))
        ids = torch.full((len(chosen), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(chosen):
            ids[r, : len(e.teacher_ids)] = torch.tensor(e.teacher_ids, dtype=torch.long)
            mask[r, : len(e.teacher_ids)] = 1
        hidden = self.model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device),
                                          use_cache=False).last_hidden_state
        counts = keep.sum(1).tolist()  # labelled positions per row of the student batch
        rows, kinds = [], []
        for r, (e, c) in enumerate(zip(chosen, counts)):
            pos = torch.tensor(e.positions[:c] + [-1] * max(0, c - len(e.positions)), dtype=torch.long)
            kinds.append(torch.tensor(e.kinds[:c] + [NONE] * max(0, c - len(e.kinds)), dtype=torch.long))
            rows.append(hidden[r, pos.clamp(min=0).to(device)] * (pos >= 0).to(device)[:, None])
        self.kinds = torch.cat(kinds).to(self.device)
        self.seconds += time.perf_counter() - started
        return torch.cat(rows)


def same_vocabulary(cfg) -> bool:
    return vocabulary(resolve(cfg.teacher)) == vocabulary(resolve(cfg.student.from_))


def prepare(cfg, tok, rows: list[dict], pairs, source: list[int]) -> tuple[tuple, alignment.Report]:
    """(examples, shared ids) for the trainer, and the alignment report of the training answers."""
    teacher = TeacherText.of(resolve(cfg.teacher), cfg)
    report = alignment.Report()
    examples = plan(teacher, tok, rows, pairs, source, report)
    shared = alignment.shared_vocabulary(teacher.texts(), hf_texts(tok))
    if teacher.vocab is not None:
        teacher.vocab.close()
    return (examples, shared), report


def text_report(cfg, texts: list[str]) -> alignment.Report:
    """The alignment of ``texts`` (validate: the prompt files' gold answers, before any teacher has answered)."""
    teacher = TeacherText.of(resolve(cfg.teacher), cfg)
    tok = load_tokenizer(resolve(cfg.student.from_))
    report = alignment.Report()
    for text in texts:
        t_ids, t_spans = teacher.spans(text)
        report.add(text, t_spans, hf_spans(tok, text)[1], [teacher.name(t) for t in t_ids])
    if teacher.vocab is not None:
        teacher.vocab.close()
    return report
