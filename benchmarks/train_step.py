"""Where a distill step's time goes, and what sharing the prompt prefix and the fused AdamW save, side by side.

    python benchmarks/train_step.py runs/default/merge-*/model runs/default/generate-*/train.jsonl --steps 10

Trains a copy of the given model (a merged student: its layers, its vocabulary) on the given training pairs the
way distill does (response-only cross-entropy, frozen tied embeddings, batches of similar length), in two set-ups
that alternate every round so the machine's drift hits both alike:

- plain: every row runs the whole sequence; AdamW with torch's default (foreach) implementation;
- distill: the prefix every row shares (system prompt, chat header) runs once per step and is broadcast as a
  KV cache (``toolchain.training.step.decoder_hidden``); torch's fused AdamW.

Prints the forward, backward and optimizer seconds per step of each, the ratio, and the two losses of the first
batch (equal up to float rounding).
"""

from __future__ import annotations

import argparse
import copy
import glob
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from toolchain.models.chat import common_prefix, tokenize_pairs  # noqa: E402
from toolchain.data.rows import iter_jsonl  # noqa: E402
from toolchain.training.batches import batches_for_epoch, collate  # noqa: E402
from toolchain.training.step import step_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="an HF model directory (e.g. runs/default/merge-*/model)")
    ap.add_argument("pairs", help="a generate stage's train.jsonl")
    ap.add_argument("--steps", type=int, default=10, help="steps per set-up and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(glob.glob(args.model)[0])
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [r for _, r in iter_jsonl(Path(glob.glob(args.pairs)[0]))]
    pairs, _, _ = tokenize_pairs(tok, rows, None, 256)
    shared = max(0, len(common_prefix([ids for ids, _ in pairs])) - 1)
    batches = batches_for_epoch(len(pairs), args.batch, 0, 0, [len(ids) for ids, _ in pairs])[: args.steps]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    setups = {"plain": (0, False), "distill": (shared, True)}
    models, opts = {}, {}
    for name, (_, fused) in setups.items():
        m = copy.deepcopy(base).train()
        for p in m.parameters():
            p.requires_grad = p is not m.get_input_embeddings().weight
        models[name] = m
        opts[name] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5,
                                       fused=True if fused else None)
    times = {name: [0.0, 0.0, 0.0] for name in setups}
    first = {}
    for _ in range(args.rounds):
        for name, (prefix, _) in setups.items():
            m, opt = models[name], opts[name]
            for b in batches:
                batch = collate([pairs[i] for i in b], tok.pad_token_id)
                t0 = time.perf_counter()
                loss = step_loss(m, batch, shared=prefix)[0]
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                opt.step()
                opt.zero_grad(set_to_none=True)
                t3 = time.perf_counter()
                first.setdefault(name, float(loss.detach()))
                for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                    times[name][k] += dt
    n = args.steps * args.rounds
    print(f"{len(pairs)} pairs, shared prefix {shared} tokens, mean length "
          f"{sum(len(i) for i, _ in pairs) / len(pairs):.1f}, batch {args.batch}, {n} steps each")
    for name, (f, b, o) in times.items():
        print(f"{name:8s} forward {f / n:.3f} s  backward {b / n:.3f} s  optimizer {o / n:.3f} s  "
              f"step {(f + b + o) / n:.3f} s  first loss {first[name]:.6f}")
    print(f"distill / plain step time: {sum(times['distill']) / sum(times['plain']):.2f}x")


if __name__ == "__main__":
    main()
