"""Soft-label KD training speed: distillery vs TRL's GKDTrainer, same models, data, batch and loss.

    pip install -e '.[bench]'        # TRL is only needed here
    python benchmarks/train_speed.py --steps 12 --batch 8 --keep-layers 15
    python benchmarks/train_speed.py --on-policy --steps 8 --batch 8 --keep-layers 15 --max-new-tokens 64

--on-policy: every step is on-policy on both sides (distillery fraction 1, TRL lmbda=1): the student samples an
answer to each prompt of the batch (same max_new_tokens, temperature 1, no top-k), the teacher scores it, JSD(beta)
trains on it. Reported: tokens trained per second (prompt + sample, as each side feeds them), rollout tokens per
second (sampled tokens over the time spent sampling), and the rollout loop alone against transformers' generate on
the same student and prompts.

Both sides train the same student (the embedded teacher pruned to --keep-layers evenly spaced layers) from
the same teacher on the same teacher answers, with generalized JSD(beta) at temperature 1 (TRL's GKD loss
uses T=1), AdamW at the same learning rate, the same precision (float32, or bf16 autocast on both sides with
--bf16), the same torch threads. TRL runs offline (lmbda=0: the
dataset's answers, no student sampling). Tokens/s counts the non-padding tokens each side actually fed to
the models, over the wall time of all its steps; the ratio is printed from one run, side by side.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from toolchain.models.chat import messages_for, tokenize_pairs  # noqa: E402
from toolchain.data.rows import iter_jsonl  # noqa: E402
from toolchain.models.references import DEFAULT_TEACHER, load_tokenizer, load_torch_model, resolve  # noqa: E402
from toolchain.recipe import SoftConfig  # noqa: E402
from toolchain.models.chat import common_prefix  # noqa: E402
from toolchain.training.batches import batches_for_epoch, collate  # noqa: E402
from toolchain.training.on_policy import on_policy_batch, rollout  # noqa: E402
from toolchain.training.step import OnlineTeacher, step_loss  # noqa: E402
from toolchain.models.student import choose_layers, prune  # noqa: E402
from toolchain.training.topk_cache import teacher_topk  # noqa: E402


def _pairs_file(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    found = sorted(glob.glob(str(ROOT / "runs" / "*" / "generate-*" / "train.jsonl")), key=os.path.getmtime)
    if not found:
        sys.exit("no teacher answers found: run `distillery generate recipes/ci.yaml` first, or pass --pairs")
    return Path(found[-1])


def _topk_rows(teacher, pairs, k: int) -> tuple[list, float]:
    """What generate writes once for cached soft-label: top-k log-probs per response position (timed)."""
    started = time.perf_counter()
    rows = [teacher_topk(teacher, ids, labels, k, 1.0) for ids, labels in pairs]
    return [(ids, logp.half().float()) for ids, logp in rows], time.perf_counter() - started


def bench_distillery(student, teacher, tok, pairs, args, cached=None) -> tuple[float, int]:
    soft = SoftConfig(loss="jsd", beta=args.beta, temperature=1.0, alpha=1.0,
                      teacher_logits="cache" if cached else "online", top_k=args.top_k)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr)
    student.train()
    lengths = [len(ids) for ids, _ in pairs]
    batches = batches_for_epoch(len(pairs), args.batch, 0, 0, lengths)[: args.steps]
    tokens, started = 0, time.perf_counter()
    for b in batches:
        batch = collate([pairs[i] for i in b], tok.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            if cached:
                topk = (torch.cat([cached[i][0] for i in b]), torch.cat([cached[i][1] for i in b]))
                loss, _, _ = step_loss(student, batch, soft, topk=topk)
            else:
                loss, _, _ = step_loss(student, batch, soft, teacher=teacher)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    return time.perf_counter() - started, tokens


def bench_distillery_on_policy(student, teacher, tok, pairs, args) -> dict:
    from types import SimpleNamespace

    loss_cfg = SimpleNamespace(loss="jsd", beta=args.beta, temperature=1.0, alpha=1.0)
    op = SimpleNamespace(samples_per_prompt=1, max_new_tokens=args.max_new_tokens, temperature=1.0)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr)
    student.train()
    lengths = [len(ids) for ids, _ in pairs]
    batches = batches_for_epoch(len(pairs), args.batch, 0, 0, lengths)[: args.steps]
    tokens, sampled, rollout_s, started = 0, 0, 0.0, time.perf_counter()
    for step, b in enumerate(batches):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            examples, lens = on_policy_batch(student, pairs, b, op, seq_len=args.seq_len, eos_id=tok.eos_token_id,
                                             pad_id=tok.pad_token_id, seed=step)
        rollout_s += time.perf_counter() - t0
        batch = collate(examples, tok.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss, _, _ = step_loss(student, batch, loss_cfg, teacher=teacher)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        sampled += sum(lens)
    return {"wall_s": time.perf_counter() - started, "tokens": tokens, "sampled": sampled, "rollout_s": rollout_s}


def _gkd_trainer(student, teacher, tok, rows, args, out: str, **options):
    """TRL's GKDTrainer on the same answers, batch, steps, beta, learning rate and precision as distillery's side;
    ``options``: the GKDConfig fields that differ between the offline and on-policy runs."""
    from datasets import Dataset
    from trl import GKDConfig, GKDTrainer

    data = Dataset.from_list([{"messages": messages_for(r["prompt"], None) + [{"role": "assistant", "content": r["response"]}]}
                              for r in rows])
    cfg = GKDConfig(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps, beta=args.beta,
                    learning_rate=args.lr, max_length=args.seq_len, save_strategy="no", report_to=[],
                    logging_steps=10_000, use_cpu=True, seed=0, lr_scheduler_type="constant", warmup_steps=0,
                    dataloader_num_workers=0, bf16=args.bf16, fp16=False, **options)
    return GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=data, processing_class=tok)


def bench_trl_on_policy(student, teacher, tok, rows, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        trainer = _gkd_trainer(student, teacher, tok, rows, args, out, lmbda=1.0, temperature=1.0,
                               max_new_tokens=args.max_new_tokens)
        counted = {"tokens": 0, "sampled": 0, "rollout_s": 0.0}
        generate = trainer.generate_on_policy_outputs

        def timed(model, inputs, generation_config, pad_token_id=None):
            t0 = time.perf_counter()
            ids, mask, labels = generate(model, inputs, generation_config, pad_token_id)
            counted["rollout_s"] += time.perf_counter() - t0
            counted["tokens"] += int(mask.sum())
            counted["sampled"] += int(mask[:, inputs["prompts"].shape[1]:].sum())
            return ids, mask, labels

        trainer.generate_on_policy_outputs = timed
        started = time.perf_counter()
        trainer.train()
        return {"wall_s": time.perf_counter() - started, **counted}


def bench_rollout_engines(student, tok, pairs, args) -> dict:
    """The same prompts, batch and sampling length through distillery's loop and transformers' generate."""
    from transformers import GenerationConfig

    student.eval()
    prompts = [ids[: next(j for j, y in enumerate(labels) if y != -100)] for ids, labels in pairs[: args.batch]]
    out = {}
    never = len(tok) - 1  # an end token neither side will meet: both write batch × max_new_tokens tokens
    t0 = time.perf_counter()
    samples = rollout(student, prompts, max_new_tokens=args.max_new_tokens, temperature=0.0, eos_id=never,
                      pad_id=tok.pad_token_id, seed=0)
    out["distillery-rollout"] = (time.perf_counter() - t0, sum(len(x) for x in samples))
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    gen_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                               eos_token_id=never)
    t0 = time.perf_counter()
    with torch.no_grad():
        seq = student.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
    out["hf-generate"] = (time.perf_counter() - t0, int((seq.shape[1] - width) * len(prompts)))
    same = samples == seq[:, width:].tolist()
    return {k: {"wall_s": round(w, 2), "tokens": n, "tokens_per_s": round(n / w, 1)} for k, (w, n) in out.items()} | {
        "same_tokens": same}


def bench_trl(student, teacher, tok, rows, args) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as out:
        trainer = _gkd_trainer(student, teacher, tok, rows, args, out, lmbda=0.0)
        counted = {"tokens": 0}
        inner = trainer.data_collator

        def counting(features):
            batch = inner(features)
            counted["tokens"] += int(batch["attention_mask"].sum())
            return batch

        trainer.data_collator = counting
        started = time.perf_counter()
        trainer.train()
        return time.perf_counter() - started, counted["tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", help="train.jsonl from a generate stage (default: newest under runs/)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--keep-layers", type=int, default=15)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=32, help="k of the cached run")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (TRL: bf16=True)")
    ap.add_argument("--on-policy", action="store_true", help="every step on-policy on both sides (TRL lmbda=1)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="longest rollout (--on-policy)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ref = resolve(DEFAULT_TEACHER)
    tok, teacher = load_tokenizer(ref), load_torch_model(ref)
    teacher.requires_grad_(False)
    rows = [r for _, r in iter_jsonl(_pairs_file(args.pairs))][: args.steps * args.batch]
    pairs, source, _ = tokenize_pairs(tok, rows, None, args.seq_len)
    rows = [rows[i] for i in source]
    keep = choose_layers(len(teacher.model.layers), args.keep_layers, "even", None)
    base = prune(teacher, keep)
    print(f"student: {len(keep)} of {len(teacher.model.layers)} layers; {len(rows)} examples; batch {args.batch}; "
          f"{args.steps} steps; JSD beta={args.beta}, T=1; {args.threads} threads; "
          f"{'bf16 autocast' if args.bf16 else 'float32'} on both sides", flush=True)

    if args.on_policy:
        return main_on_policy(args, teacher, base, tok, pairs, rows)
    cached, build_s = _topk_rows(teacher, pairs, args.top_k)
    online_teacher = OnlineTeacher(teacher, common_prefix([ids for ids, _ in pairs]))  # what distill builds
    runs = (("distillery-online", lambda s: bench_distillery(s, online_teacher, tok, pairs, args)),
            ("distillery-cached", lambda s: bench_distillery(s, teacher, tok, pairs, args, cached)),
            ("trl-gkd", lambda s: bench_trl(s, teacher, tok, rows, args)))
    results = {}
    for name, fn in runs:
        torch.manual_seed(0)
        student = copy.deepcopy(base).requires_grad_(True)  # every weight trains on both sides
        wall, tokens = fn(student)
        results[name] = {"wall_s": round(wall, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1)}
        print(f"{name:18s} {tokens:7d} tokens in {wall:7.1f}s = {tokens / wall:8.1f} tokens/s", flush=True)
    trl = results["trl-gkd"]["tokens_per_s"]
    online = results["distillery-online"]["tokens_per_s"] / trl
    cached_ratio = results["distillery-cached"]["tokens_per_s"] / trl
    # The cache is built once (by generate) and reused every epoch: amortised over E epochs it costs build_s / E.
    per_epoch = {e: round(results["distillery-cached"]["tokens"] / (results["distillery-cached"]["wall_s"] + build_s / e)
                          / trl, 3) for e in (1, 2, 3)}
    print(f"top-{args.top_k} cache built in {build_s:.1f}s (once, in generate)")
    print(f"ratio vs trl-gkd: online {online:.2f}x, cached {cached_ratio:.2f}x "
          f"(cache build included: {per_epoch[1]:.2f}x at 1 epoch, {per_epoch[2]:.2f}x at 2, {per_epoch[3]:.2f}x at 3)")
    print(json.dumps({**results, "cache_build_s": round(build_s, 2), "ratio_online": round(online, 3),
                      "ratio_cached": round(cached_ratio, 3), "ratio_cached_with_build_by_epochs": per_epoch}))


def main_on_policy(args, teacher, base, tok, pairs, rows) -> None:
    online_teacher = OnlineTeacher(teacher, common_prefix([ids for ids, _ in pairs]))
    runs = (("distillery-on-policy", lambda s: bench_distillery_on_policy(s, online_teacher, tok, pairs, args)),
            ("trl-gkd-lmbda1", lambda s: bench_trl_on_policy(s, teacher, tok, rows, args)))
    results = {}
    for name, fn in runs:
        torch.manual_seed(0)
        r = fn(copy.deepcopy(base).requires_grad_(True))
        results[name] = {**{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()},
                         "tokens_per_s": round(r["tokens"] / r["wall_s"], 1),
                         "rollout_tokens_per_s": round(r["sampled"] / max(r["rollout_s"], 1e-9), 1)}
        print(f"{name:22s} {r['tokens']:6d} tokens in {r['wall_s']:6.1f}s = {r['tokens'] / r['wall_s']:7.1f} tokens/s; "
              f"{r['sampled']:5d} sampled in {r['rollout_s']:6.1f}s = {results[name]['rollout_tokens_per_s']:6.1f}/s",
              flush=True)
    torch.manual_seed(0)
    engines = bench_rollout_engines(copy.deepcopy(base), tok, pairs, args)
    for k in ("distillery-rollout", "hf-generate"):
        print(f"{k:22s} {engines[k]['tokens']:6d} tokens in {engines[k]['wall_s']:6.1f}s = "
              f"{engines[k]['tokens_per_s']:7.1f} tokens/s (greedy, batch {args.batch})")
    ours, trl = results["distillery-on-policy"], results["trl-gkd-lmbda1"]
    ratio = ours["tokens_per_s"] / trl["tokens_per_s"]
    rollout_ratio = ours["rollout_tokens_per_s"] / trl["rollout_tokens_per_s"]
    loop_ratio = engines["distillery-rollout"]["tokens_per_s"] / engines["hf-generate"]["tokens_per_s"]
    print(f"ratio vs trl-gkd (lmbda=1): trained tokens/s {ratio:.2f}x, rollout tokens/s {rollout_ratio:.2f}x; "
          f"rollout loop vs hf generate {loop_ratio:.2f}x (same tokens: {engines['same_tokens']})")
    print(json.dumps({**results, "engines": engines, "ratio_tokens": round(ratio, 3),
                      "ratio_rollout": round(rollout_ratio, 3), "ratio_loop_vs_generate": round(loop_ratio, 3)}))


if __name__ == "__main__":
    main()
