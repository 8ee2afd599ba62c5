"""distill.validation: a slice of the training prompts kept out of training, answered greedily by the student at
each scoring and scored as eval scores held-out prompts (the task's metric against the gold, where the prompt has
one), with the teacher-forced loss on the teacher's answers beside it. Which weights ship (how many epochs were
worth it) is chosen on this slice, so the held-out figures eval reports were never used to choose anything.

The slice is a pure function of the prompt ids and the seed: a resumed run, and a rerun, holds out the same prompts.
"""

from __future__ import annotations

import hashlib
import json
import time

import torch
import torch.nn.functional as F

from toolchain.models.chat import IGNORE, tokenize_pairs
from toolchain.quality.scores import gold_check
from toolchain.recipe import Recipe, ValidationConfig
from toolchain.training import batches
from toolchain.training.on_policy import rollout

LOGITS_BYTES = 2 ** 28  # float32 logits per teacher-forced pass: as many sequences as fit in 256 MB (at least one)


def split(rows: list[dict], v: ValidationConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows): of each task's prompts, its share of ``v.fraction`` of all prompts (at most
    ``v.max_prompts`` in all, in proportion to the tasks' sizes, rounded; never all of a task's), ranked by a seeded
    hash of the id. Every sample of a chosen prompt is a validation row."""
    by_task: dict[str, dict[str, None]] = {}  # each task's prompt ids, once each, in order
    for r in rows:
        by_task.setdefault(r["task"], {})[r["id"]] = None
    total = sum(len(ids) for ids in by_task.values())
    want = min(v.max_prompts, v.fraction * total)
    chosen: set[str] = set()
    for ids in by_task.values():
        k = min(len(ids) - 1, round(want * len(ids) / total))
        chosen.update(sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())[:k])
    held = [r for r in rows if r["id"] in chosen]
    if not held:
        raise ValueError(f"distill.validation: {v.fraction:g} of {total} training prompt(s) holds none out; raise "
                         f"distill.validation.fraction or remove distill.validation")
    return [r for r in rows if r["id"] not in chosen], held


class Validator:
    """Scores a model on the validation rows: greedy answers against the gold, teacher-forced loss."""

    def __init__(self, cfg: Recipe, tok, rows: list[dict]):
        first: dict[str, dict] = {}
        for r in rows:
            first.setdefault(r["id"], r)
        rows = list(first.values())  # one answer to score per prompt; its first sample is the teacher's reference
        self.pairs, source, _ = tokenize_pairs(tok, rows, cfg.student_system_prompt(), cfg.distill.seq_len,
                                               bare=cfg.data.strip_instructions)
        specs = cfg.task_specs(rows)
        pattern = cfg.reasoning.answer_pattern if cfg.distill.flavour == "reasoning" else None
        self.docs = [{"task": rows[i]["task"], "gold": rows[i].get("gold"), "answer_pattern": pattern,
                      "metric": json.dumps(specs[rows[i]["task"]])} for i in source]
        self.teacher_right = [gold_check(doc, rows[i]["response"]) for doc, i in zip(self.docs, source)]
        self.prompts = [ids[:next(j for j, y in enumerate(labels) if y != IGNORE)] for ids, labels in self.pairs]
        self.tok, self.max_new_tokens, self.batch = tok, cfg.eval.max_new_tokens, cfg.eval.batch_size

    def __len__(self) -> int:
        return len(self.pairs)

    @torch.no_grad()
    def __call__(self, model) -> dict:
        """{gold, teacher_gold, n_gold, by_task, loss, seconds}: gold is the share of prompts with a gold answer
        the model's greedy answer gets right (None where none has one)."""
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            right = [gold_check(doc, text) for doc, text in zip(self.docs, self.answers(model))]
            loss = self.loss(model)
        finally:
            model.train(was_training)
        graded = [(d["task"], ok, t) for d, ok, t in zip(self.docs, right, self.teacher_right) if ok is not None]
        by_task: dict[str, list[bool]] = {}
        for task, ok, _ in graded:
            by_task.setdefault(task, []).append(ok)
        share = (lambda xs: round(sum(xs) / len(xs), 4) if xs else None)
        return {"gold": share([ok for _, ok, _ in graded]), "teacher_gold": share([bool(t) for _, _, t in graded]),
                "n_gold": len(graded), "by_task": {t: share(v) for t, v in sorted(by_task.items())},
                "loss": round(loss, 5), "seconds": round(time.perf_counter() - t0, 1)}

    def answers(self, model) -> list[str]:
        eos, out = self.tok.eos_token_id, []
        for start in range(0, len(self.prompts), self.batch):
            prompts = self.prompts[start:start + self.batch]
            for sample in rollout(model, prompts, max_new_tokens=self.max_new_tokens, temperature=0.0, eos_id=eos,
                                  pad_id=self.tok.pad_token_id, seed=0):
                out.append(self.tok.decode([t for t in sample if t != eos], skip_special_tokens=True).strip())
        return out

    def loss(self, model) -> float:
        """Mean cross-entropy per answer token of the teacher's answers, teacher-forced."""
        device = next(model.parameters()).device
        width = max(len(ids) for ids, _ in self.pairs) * model.get_output_embeddings().weight.shape[0] * 4
        step = max(1, LOGITS_BYTES // width)
        total, tokens = 0.0, 0
        for start in range(0, len(self.pairs), step):
            batch = batches.collate(self.pairs[start:start + step], self.tok.pad_token_id)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
            labels = batch["labels"][:, 1:].to(device)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=IGNORE, reduction="sum"))
            tokens += int((labels != IGNORE).sum())
        return total / max(tokens, 1)


def better(a: dict, b: dict | None) -> bool:
    """Whether scoring ``a`` beats ``b``: more right answers against the gold, then the lower loss."""
    if b is None:
        return True
    if a["gold"] is not None and b["gold"] is not None and a["gold"] != b["gold"]:
        return a["gold"] > b["gold"]
    return a["loss"] < b["loss"]
