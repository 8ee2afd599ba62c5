"""On-policy steps (GKD): which steps train on the student's own samples, the seeded rollout with the student's
KV cache, and the batch of sampled sequences labelled on the sampled tokens only."""

from __future__ import annotations

import math

import torch

from toolchain.models.chat import IGNORE


def is_on_policy(step: int, fraction: float) -> bool:
    """Whether optimizer step ``step`` (0-based) trains on the student's samples: exactly ``fraction`` of the
    steps, spread evenly (at 0.25 every fourth), a pure function of the step, so a resumed run agrees."""
    return fraction > 0 and math.floor((step + 1) * fraction) > math.floor(step * fraction)


@torch.no_grad()
def rollout(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, eos_id: int, pad_id: int,
            seed: int) -> list[list[int]]:
    """The student's answers to ``prompts`` (token ids), sampled with its KV cache in one left-padded batch.

    Sampling draws from a generator seeded with ``seed`` only, so the same weights and seed give the same tokens
    (a resumed run replays its rollouts). Each answer ends with ``eos_id`` unless it ran out of tokens; a finished
    answer leaves the batch (its rows of the KV cache too), so the others do not pay for it. Measured against
    ``transformers``' generate on the default student: benchmarks/train_speed.py --on-policy.
    """
    gen = torch.Generator().manual_seed(seed)
    b, width = len(prompts), max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    samples: list[list[int]] = [[] for _ in range(b)]
    alive = list(range(b))  # rows still writing, in batch order; a finished row leaves the batch and its cache
    last = positions[:, -1:]
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float().cpu()
        if temperature > 0:
            picked = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen)[:, 0]
        else:
            picked = logits.argmax(-1)
        keep = []
        for j, t in enumerate(picked.tolist()):
            samples[alive[j]].append(t)
            if t != eos_id:
                keep.append(j)
        if not keep:
            break
        past = out.past_key_values
        if len(keep) < len(alive):
            rows = torch.tensor(keep, device=device)
            past.batch_select_indices(rows)
            mask, last, picked = mask[rows], last[rows], picked[keep]
            alive = [alive[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        last = last + 1
        out = model(input_ids=picked[:, None].to(device), attention_mask=mask, position_ids=last,
                    past_key_values=past, use_cache=True)
    return samples


def on_policy_batch(model, pairs: list[tuple[list[int], list[int]]], batch_ids: list[int], op, *, seq_len: int,
                    eos_id: int, pad_id: int, seed: int) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """The student's own training sequences for a batch: ``op.samples_per_prompt`` rollouts of each of the first
    len(batch) / samples_per_prompt prompts (as many sequences as the batch has), labelled on the sampled tokens
    only. Returns (examples, sampled lengths)."""
    n = len(batch_ids)
    chosen = [batch_ids[i // op.samples_per_prompt] for i in range(n)]
    prompts = []
    for i in chosen:
        ids, labels = pairs[i]
        start = next(j for j, y in enumerate(labels) if y != IGNORE)
        prompts.append(ids[:start])
    room = max(1, min(op.max_new_tokens, seq_len - max(len(p) for p in prompts)))
    was_training = model.training
    model.eval()
    try:
        samples = rollout(model, prompts, max_new_tokens=room, temperature=op.temperature, eos_id=eos_id,
                          pad_id=pad_id, seed=seed)
    finally:
        model.train(was_training)
    examples = [(p + x, [IGNORE] * len(p) + x) for p, x in zip(prompts, samples)]
    return examples, [len(x) for x in samples]
