"""How sure the student is of an answer, from its own log-probabilities (one forward pass over prompt + answer),
as numbers in [0, 1] a cascade can threshold:

    min_prob      exp of the lowest log-probability of any answer token (the weakest step of the answer)
    mean_prob     exp of the mean token log-probability (the geometric mean probability of the answer)
    first_margin  the first answer token's probability minus the runner-up's at that position
    label         for a label task: the probability of the answer's label among the task's labels (each label's
                  sequence probability, normalised over the labels, as constrained decoding would choose)

Which separates right from wrong answers best is measured per task (AUROC, ``toolchain.quality.cascade.auroc``).
"""

from __future__ import annotations

import math

import torch

from toolchain.quality.metrics import first_label

SCORES = ("min_prob", "mean_prob", "first_margin")


@torch.no_grad()
def _answer_logprobs(model, prompt_ids: list[int], answer_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities of the answer tokens, the full log-softmax at each answer position)."""
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(1, torch.tensor(answer_ids).unsqueeze(1)).squeeze(1), logp


def from_logprobs(chosen: list[float], first_two: tuple[float, float] | None) -> dict[str, float]:
    """``SCORES`` from the log-probabilities of an answer's tokens and the two highest probabilities at its first
    position: the one definition eval (PyTorch) and the server (the engine's logits, token by token) share. All 0
    for an empty answer: nothing said, nothing to trust."""
    if not chosen or first_two is None:
        return {name: 0.0 for name in SCORES}
    return {"min_prob": math.exp(min(chosen)), "mean_prob": math.exp(sum(chosen) / len(chosen)),
            "first_margin": first_two[0] - first_two[1]}


def label_share(totals: list[float], chosen: int | None) -> float:
    """The probability of label ``chosen`` among labels whose answers have the sequence log-probabilities
    ``totals`` (0 when the answer named none of them)."""
    if chosen is None:
        return 0.0
    top = max(totals)
    weights = [math.exp(t - top) for t in totals]
    return weights[chosen] / sum(weights)


def answer_scores(model, prompt_ids: list[int], answer_ids: list[int]) -> dict[str, float]:
    """``SCORES`` of one answer under a PyTorch model."""
    if not answer_ids:
        return from_logprobs([], None)
    chosen, logp = _answer_logprobs(model, prompt_ids, answer_ids)
    top = torch.topk(logp[0].exp(), 2).values
    return from_logprobs([float(x) for x in chosen], (float(top[0]), float(top[1])))


def label_probability(model, prompt_ids: list[int], labels: list[list[int]], chosen: int | None) -> float:
    """The probability of label ``chosen`` (an index into ``labels``, token ids of each label's answer) among all
    the labels; an answer that is none of them (``chosen`` None) gets 0."""
    if chosen is None:
        return 0.0
    return label_share([float(_answer_logprobs(model, prompt_ids, ids)[0].sum()) for ids in labels], chosen)


def held_out(model, tok, items: list[tuple[str, list[dict], str, list[str] | None]]) -> dict[str, dict]:
    """Every score of each held-out answer: ``items`` are (prompt id, the chat messages the student was asked,
    its answer, the task's labels or None). A label task's answer also gets ``label`` (0 when it names no label)."""
    out = {}
    for pid, messages, answer, labels in items:
        prompt_ids = list(tok.apply_chat_template(messages, add_generation_prompt=True))
        answer_ids = tok(answer, add_special_tokens=False).input_ids
        scores = answer_scores(model, prompt_ids, answer_ids)
        if labels:
            named = first_label(answer, labels)
            label_ids = [tok(label, add_special_tokens=False).input_ids for label in labels]
            scores["label"] = label_probability(model, prompt_ids, label_ids,
                                                labels.index(named) if named in labels else None)
        out[pid] = scores
    return out
