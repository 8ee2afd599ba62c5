"""Peak memory of one soft-label training step at a real vocabulary: unchunked vs chunked loss, float32 vs
bfloat16 weights, with and without gradient checkpointing, side by side in one run.

    python benchmarks/train_memory.py                       # 8 x 1,024 labelled positions, vocabulary 151,936
    python benchmarks/train_memory.py --positions 2048 --source online

Student and teacher are randomly initialised Llama models of Qwen2.5's vocabulary (151,936 output rows) with a
small hidden size and few layers, so they fit this machine: at this vocabulary the logits dominate either way
(8,192 positions x 151,936 x 4 bytes = 5.0 GB per float32 logits tensor). Each configuration runs in a fresh
process: build the models and the batch, note the resident memory, run one training step (distill's step_loss,
backward, AdamW step), and report the peak resident memory above that baseline (the loss path: logits,
softmaxes, gradients, activations, optimizer state) and the step time, with the loss so equal losses show.
--source cache: the teacher's top-k log-probs are given (the default recipe's path); online: the teacher runs
in the step and its logits are chunked too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def one(conf: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from toolchain.models.chat import IGNORE
    from toolchain.training.losses import auto_chunk
    from toolchain.recipe import SoftConfig
    from toolchain.training.step import MasterWeights, OnlineTeacher, step_loss

    torch.set_num_threads(conf["threads"])
    torch.manual_seed(0)
    vocab, dtype = conf["vocab"], getattr(torch, conf["dtype"])

    def model(layers: int):
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=conf["hidden"], intermediate_size=conf["hidden"] * 3,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=4096, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg)

    student = model(conf["layers"]).to(dtype).train()
    if conf["checkpointing"]:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher = model(conf["layers"] * 2).to(dtype).eval().requires_grad_(False)
    b, seq, prompt = conf["batch"], conf["seq"], 8
    ids = torch.randint(0, vocab, (b, seq + 1))
    labels = ids.clone()
    labels[:, :prompt] = IGNORE
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    n = int((labels[:, 1:] != IGNORE).sum())
    soft = SoftConfig(loss=conf["loss"], alpha=0.5, temperature=1.0, teacher_logits=conf["source"])
    online, topk = None, None
    if conf["source"] == "online":
        online = OnlineTeacher(teacher, [])
    else:
        g = torch.Generator().manual_seed(1)
        topk = (torch.randint(0, vocab, (n, 32), generator=g),
                torch.log_softmax(torch.randn(n, 33, generator=g), -1)[:, :32].half().float())
    masters = MasterWeights([p for p in student.parameters() if p.requires_grad])
    opt = torch.optim.AdamW(masters.masters, lr=1e-4)
    chunk = auto_chunk(vocab) if conf["chunked"] else None
    base = _kib("VmRSS")
    started = time.perf_counter()
    loss, _, _ = step_loss(student, batch, soft, teacher=online, topk=topk, chunk=chunk)
    loss.backward()
    masters.grads_in()
    opt.step()
    masters.weights_out()
    wall = time.perf_counter() - started
    return {"loss": float(loss.detach()), "peak_mb": round((_kib("VmHWM") - base) / 1024), "step_s": round(wall, 2),
            "positions": n, "chunk": chunk}


def planned(conf: dict) -> int:
    """What ``distillery plan`` (training/memory.py) says the same step adds above its models and batch (MB): the
    gradients, AdamW's moments, the activations and the loss path; every weight of this benchmark's student is
    trained, its embedding included, and the float32 master copies exist before the baseline is taken."""
    from toolchain.models.sizes import from_config
    from toolchain.training.memory import Setting, step_parts

    student = from_config({"hidden_size": conf["hidden"], "intermediate_size": conf["hidden"] * 3,
                           "num_hidden_layers": conf["layers"], "num_attention_heads": 4, "num_key_value_heads": 2,
                           "vocab_size": conf["vocab"], "tie_word_embeddings": True})
    setting = Setting(dtype=conf["dtype"], checkpointing=conf["checkpointing"], train_embeddings=True,
                      batch=conf["batch"], seq_len=conf["seq"] + 1, labelled=conf["seq"] - 7,
                      chunk=None if conf["chunked"] else 0, teacher_in_step=conf["source"] == "online")
    parts = step_parts(student, None, setting)
    return round(sum(parts[k] for k in ("gradients", "optimizer", "activations", "loss")) / 1024**2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2, help="student layers (the teacher has twice as many)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--positions", type=int, default=1024, help="labelled positions per sequence")
    ap.add_argument("--source", choices=["cache", "online"], default="cache")
    ap.add_argument("--loss", default="forward_kl")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    common = {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "batch": args.batch,
              "seq": args.positions + 8, "source": args.source, "loss": args.loss, "threads": args.threads}
    confs = [("unchunked fp32", dict(chunked=False, dtype="float32", checkpointing=False)),
             ("chunked fp32", dict(chunked=True, dtype="float32", checkpointing=False)),
             ("unchunked bf16", dict(chunked=False, dtype="bfloat16", checkpointing=False)),
             ("chunked bf16", dict(chunked=True, dtype="bfloat16", checkpointing=False)),
             ("chunked fp32 + ckpt", dict(chunked=True, dtype="float32", checkpointing=True)),
             ("chunked bf16 + ckpt", dict(chunked=True, dtype="bfloat16", checkpointing=True))]
    print(f"vocabulary {args.vocab}, hidden {args.hidden}, student {args.layers} / teacher {args.layers * 2} layers, "
          f"{args.batch} x {args.positions} labelled positions, {args.loss}, teacher {args.source}; "
          f"{args.threads} threads", flush=True)
    results = {}
    for name, c in confs:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps({**common, **c})], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
            results[name] = {"error": f"exit {proc.returncode}: {tail[:120]}"}
            print(f"{name:22s} failed ({results[name]['error']})", flush=True)
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[name]
        r["plan_mb"] = planned({**common, **c})
        print(f"{name:22s} peak +{r['peak_mb']:6d} MB  plan +{r['plan_mb']:6d} MB ({r['plan_mb'] / r['peak_mb']:.2f}x)"
              f"  step {r['step_s']:6.2f} s  loss {r['loss']:.5f}  (chunk {r['chunk']})", flush=True)
    ok = {k: v for k, v in results.items() if "error" not in v}
    if "unchunked fp32" in ok and "chunked fp32" in ok:
        u, c = ok["unchunked fp32"], ok["chunked fp32"]
        print(f"chunked / unchunked (fp32): memory {u['peak_mb'] / max(c['peak_mb'], 1):.1f}x lower, step time "
              f"{c['step_s'] / u['step_s']:.2f}x, loss difference {abs(c['loss'] - u['loss']):.2e}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
