"""Training batches: shuffled, length-grouped and deterministic in (seed, epoch) so a resumed run replays exactly;
padded into tensors; shared out between processes; and the cached teacher rows that go with them."""

from __future__ import annotations

import random

import torch

from toolchain.models.chat import IGNORE


def batches_for_epoch(n: int, batch_size: int, seed: int, epoch: int, lengths: list[int]) -> list[list[int]]:
    """Shuffled batches of similar length (less padding), deterministic in (seed, epoch)."""
    rng = random.Random(seed * 1000003 + epoch)
    order = list(range(n))
    rng.shuffle(order)
    chunk = batch_size * 16
    grouped = []
    for i in range(0, n, chunk):
        grouped += sorted(order[i:i + chunk], key=lambda j: lengths[j])
    batches = [grouped[i:i + batch_size] for i in range(0, n, batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def shard(batch_ids: list[int], rank: int, world: int) -> tuple[list[int], bool]:
    """This process's share of a global batch, and whether it is real. A process left without examples (a
    last batch smaller than the number of processes) still runs one, with weight 0, so the collectives match."""
    mine = batch_ids[rank::world]
    return (mine, True) if mine else (batch_ids[:1], False)


def cached_rows(cache, keys: list[str], batch: dict[str, torch.Tensor], lookup: torch.Tensor | None = None) -> tuple:
    """The cached teacher rows of a batch: (ids, log-probs), and with ``lookup`` (a trimmed student vocabulary,
    toolchain.models.vocab.lookup) the ids in the student's numbering plus the mask of the slots it has."""
    counts = (batch["labels"][:, 1:] != IGNORE).sum(dim=1).tolist()
    parts = [cache.rows_for(k, n) for k, n in zip(keys, counts)]
    ids, logp = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if lookup is None:
        return ids, logp
    mapped = lookup[ids.long()]
    return mapped.clamp(min=0), logp, mapped >= 0
