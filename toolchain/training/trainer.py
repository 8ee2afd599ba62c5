"""distill's training loop as named phases, in the shape of torchtune's KD recipe: ``setup`` (trainable weights,
accelerator, optimizer, schedule, online teacher, cached-teacher lookup), ``resume`` (a checkpoint under the stage's
.resume/), ``train`` (``step`` after ``step``, each written down by ``log``, checkpointed every
``distill.checkpoint_every``) and ``save`` (the adapter and base, or the whole model).

The loss is cross-entropy on response tokens only (or the soft-label mix), and the vocabulary projection runs only
at those positions: with a 49k vocabulary the lm_head is most of the FLOPs. Batches are a pure function of (seed,
epoch) and rollouts of (seed, step), so a resumed run replays exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch

from toolchain.data.rows import write_jsonl
from toolchain.models import families, student, vocab
from toolchain.models.chat import IGNORE, common_prefix
from toolchain.recipe import Recipe
from toolchain.training import batches, qat, validation
from toolchain.training.cross_vocab import AlignedTeacher
from toolchain.training.losses import auto_chunk
from toolchain.training.on_policy import is_on_policy, on_policy_batch
from toolchain.training.step import MasterWeights, OnlineTeacher, TrainStep, fused_adamw, total
from toolchain.ui import console, progress


def trainable(model, cfg: Recipe):
    d = cfg.distill
    if d.method == "lora":
        from peft import LoraConfig, get_peft_model

        norms = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if "norm" in type(m).__name__.lower()})
        lcfg = LoraConfig(r=d.lora.r, lora_alpha=d.lora.alpha, lora_dropout=d.lora.dropout,
                          target_modules=families.lora_targets(model, list(d.lora.targets)), bias="none",
                          task_type="CAUSAL_LM",
                          modules_to_save=norms if d.train_norms else None)
        return get_peft_model(model, lcfg)
    tied = student.embeddings_tied(model)
    for name, p in model.named_parameters():
        is_embed = p is model.get_input_embeddings().weight or (not tied and p is model.get_output_embeddings().weight)
        p.requires_grad = d.train_embeddings or not is_embed
    return model


def trained_weights(model) -> dict[str, torch.Tensor]:
    """A copy of the weights training changes, by their plain names."""
    return {qat.plain_name(n): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trained_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Put back weights ``trained_weights`` copied."""
    named = {qat.plain_name(n): p for n, p in model.named_parameters()}
    for n, w in weights.items():
        named[n].copy_(w)


def save_checkpoint(path: Path, model, opt, sched, step: int, log: list[dict], masters: MasterWeights,
                    scored: list[dict] | None = None, best: dict | None = None) -> None:
    """Everything a resumed run needs, written atomically; ``scored`` and ``best``: distill.validation's scorings so
    far and the weights of the one that ships (kept with the checkpoint, so the two always agree)."""
    state = {
        "weights": trained_weights(model),
        "masters": [m.detach().clone() for m in masters.masters] if masters.copies else None,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": step,
        "log": log,
        "validation": scored or [],
        "best": best,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint intact


class Trainer:
    """One student's training: built by ``setup``, run by ``train``, written by ``save``."""

    def __init__(self, cfg: Recipe, model, tok, pairs: list[tuple[list[int], list[int]]], keys: list[str],
                 teacher=None, cache=None, kept: list[int] | None = None, aligned=None,
                 validator: validation.Validator | None = None):
        """``aligned``: (examples, shared ids) of a teacher with another tokenizer (training/cross_vocab.py);
        ``validator``: the distill.validation slice, scored as distill.validation says."""
        self.cfg, self.d, self.tok, self.pairs, self.keys, self.cache = cfg, cfg.distill, tok, pairs, keys, cache
        self.aligned = aligned
        self.validator, self.scored, self.best = validator, [], None
        self.soft = self.d.soft if self.d.flavour == "soft" else None
        self.step_no, self.log_rows = 0, []
        self.setup(model, teacher, kept)

    def setup(self, model, teacher, kept: list[int] | None) -> None:
        """Trainable weights, the accelerator, AdamW on float32 masters, the warm-up + cosine schedule, the online
        teacher with its shared-prefix cache, and how cached teacher ids map onto the student's rows."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        d = self.d
        model = trainable(model, self.cfg)
        model.train()
        self.accelerator = accelerator = Accelerator(cpu=not torch.cuda.is_available())
        if d.gradient_checkpointing:
            # Non-reentrant: works with frozen embeddings (no input that requires grad) and LoRA.
            (model.get_base_model() if hasattr(model, "get_base_model") else model).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.masters = MasterWeights([p for p in model.parameters() if p.requires_grad])
        self.params = self.masters.masters
        # The fused kernel: one pass over each tensor instead of a chain of foreach ops (0.04 s instead of 0.15-0.37 s
        # per step for 71M float32 parameters on 2 cores, measured); same update rule.
        opt = torch.optim.AdamW(self.params, lr=d.lr, weight_decay=d.weight_decay, fused=fused_adamw(self.params))
        self.steps_per_epoch = math.ceil(len(self.pairs) / d.batch_size)
        self.total = d.max_steps or max(1, math.ceil(self.steps_per_epoch * d.epochs))
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_at)
        prefix = common_prefix([ids for ids, _ in self.pairs])
        if teacher is not None and self.aligned is not None:
            examples, shared = self.aligned
            teacher = AlignedTeacher(teacher.to(d.teacher_device or accelerator.device), examples, shared,
                                     pad_id=0, out_device=accelerator.device)
        elif teacher is not None:
            teacher = OnlineTeacher(teacher.to(d.teacher_device or accelerator.device), prefix, kept,
                                    out_device=accelerator.device)
        self.teacher = teacher
        rows = model.get_output_embeddings().weight.shape[0]  # the student's output layer (padding rows included)
        self.lookup = None
        if self.cache is not None:
            cached_vocab = int(self.cache.header["vocab_size"])
            padded = "pad_id" in self.cache.header  # empty slots (an endpoint's short rows) hold id vocab_size
            # trimmed, a teacher whose output layer has padding rows, or empty slots: ids the student lacks carry
            # no mass
            if kept is not None or cached_vocab > rows or padded:
                self.lookup = vocab.lookup(kept if kept is not None else list(range(min(rows, cached_vocab))),
                                           cached_vocab + padded)
        # at least one token of each row left; checkpointed layers take no KV cache, so no shared prefix with them
        shared = 0 if d.gradient_checkpointing else max(0, len(prefix) - 1)
        chunk = auto_chunk(rows) if d.loss_chunk is None else d.loss_chunk
        self.model = model
        self.train_step, self.opt = accelerator.prepare(TrainStep(model, teacher, shared, chunk), opt)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        # FSDP shards the weights: resume checkpoints (whole trainable weights from rank 0) are DDP/1-process only.
        self.fsdp = accelerator.distributed_type == DistributedType.FSDP
        if self.world > 1:
            console.print(f"  {self.world} processes ({accelerator.distributed_type.value}), "
                          f"{d.batch_size} sequences per step in all")
        if self.fsdp and self.validator is not None:
            raise ValueError("distill.validation: answers the slice with the whole student, which FSDP shards; "
                             "remove distill.validation or train without FSDP")
        if self.fsdp:
            console.print("  FSDP: no resume checkpoints (the sharded weights are not gathered mid-run); "
                          "a killed run starts this stage over")
        op = d.on_policy
        # On-policy steps: the divergence alone on the student's samples (its own tokens are no target for CE).
        self.on_soft = None if self.soft is None else SimpleNamespace(
            loss=op.loss, temperature=self.soft.temperature, beta=self.soft.beta, alpha=1.0)
        self.warm_steps = round(d.warmup_epochs * self.steps_per_epoch)
        self.lengths = [len(ids) for ids, _ in self.pairs]
        q = d.quantization_aware
        self.qat_start = None if q is None else max(0, self.total - q.steps)
        self.qat: list | None = None  # the fake-quantized weights, once the quantization-aware steps begin
        self.work = None

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth of the peak."""
        d = self.d
        if step < d.warmup_steps:
            return (step + 1) / (d.warmup_steps + 1)
        done = (step - d.warmup_steps) / max(1, self.total - d.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    def resume(self, resume_dir: Path) -> None:
        """Carry on from the last checkpoint of a killed run (weights, masters, optimizer, schedule, log)."""
        resume_dir.mkdir(exist_ok=True)
        self.work = resume_dir
        self.checkpoint = resume_dir / "checkpoint.pt"
        if not self.checkpoint.exists():
            return
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)  # tensors, numbers, lists only
        load_trained_weights(self.model, state["weights"])
        with torch.no_grad():
            for m, w in zip(self.masters.masters, state.get("masters") or []):
                m.copy_(w)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step_no, self.log_rows = state["step"], state["log"]
        self.scored, self.best = state.get("validation", []), state.get("best")
        console.print(f"  resuming from step {self.step_no}/{self.total}")

    def train(self) -> None:
        """Every step left, with a progress line (loss, tokens/s, on-policy and teacher time)."""
        log = self.log_rows
        self.timing = {"rollout_s": sum(r.get("rollout_s", 0.0) for r in log),
                       "teacher_s": sum(r.get("teacher_s", 0.0) for r in log)}
        self.n_on = sum(1 for r in log if r.get("on_policy"))
        self.started, self.tokens_seen = time.time(), 0
        began = time.perf_counter()
        with progress() as bar:
            task = bar.add_task("distill", total=self.total, completed=self.step_no, info="")
            while self.step_no < self.total:
                if self.qat_start is not None and self.step_no >= self.qat_start and self.qat is None:
                    self.start_qat(bar, task)
                row, extra, on_policy = self.step()
                bar.update(task, advance=1, info=self.log(row, extra, on_policy))
                if self.validation_due():
                    bar.update(task, info=f"validation: {len(self.validator)} prompts")
                    self.validate()
                d = self.d
                if (self.accelerator.is_main_process and not self.fsdp
                        and self.step_no % d.checkpoint_every == 0 and self.step_no < self.total):
                    save_checkpoint(self.checkpoint, self.model, self.opt, self.sched, self.step_no, self.log_rows,
                                    self.masters, self.scored, self.best)
        self.timing["train_s"] = time.perf_counter() - began  # this process's steps (a resumed run: the rest)

    def keeps_best(self) -> bool:
        return self.validator is not None and self.d.validation.keep == "best"

    def validation_due(self) -> bool:
        """After every epoch (or every distill.validation.every steps) and after the last step."""
        if self.validator is None:
            return False
        every = self.d.validation.every or self.steps_per_epoch
        return self.step_no % every == 0 or self.step_no == self.total

    def kept_scoring(self) -> dict | None:
        """The scoring whose weights ship: the best so far (keep: best) or the last."""
        kept = None
        for row in self.scored:
            kept = row if not self.keeps_best() or validation.better(row, kept) else kept
        return kept

    def validate(self) -> None:
        """Score the slice now; under keep: best, hold on to these weights if they beat every earlier scoring (the
        next checkpoint keeps them with the scorings, so a resumed run ships the same weights)."""
        row = {"step": self.step_no, "epoch": round(self.step_no / self.steps_per_epoch, 3),
               **self.validator(self.model)}
        was = self.kept_scoring()
        self.scored.append(row)
        best = self.keeps_best() and validation.better(row, was)
        if best:
            self.best = trained_weights(self.model)
        gold = "" if row["gold"] is None else (f"gold {row['gold']:.1%} of {row['n_gold']} (the teacher's answers "
                                               f"{row['teacher_gold']:.1%}), ")
        console.print(f"  validation after step {self.step_no} (epoch {row['epoch']:g}): {gold}loss "
                      f"{row['loss']:.3f}{' · best so far' if best else ''} ({row['seconds']:.0f}s)")

    def start_qat(self, bar, task) -> None:
        """From here on the forward pass reads every weight as the GGUF of distill.quantization_aware.type will
        hold it (training/qat.py)."""
        kind = self.d.quantization_aware.type
        bar.update(task, info=f"quantization-aware: which type llama.cpp gives each tensor for {kind}")
        types = qat.plan(self.model, kind, self.work)
        self.qat = qat.attach(self.model, types)
        counts = Counter(t.name.lower() for t in types.values())
        console.print(f"  quantization-aware from step {self.step_no + 1}: {len(types)} weights as llama.cpp stores "
                      f"them for {kind} (" + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")")

    def _examples(self, batch_ids: list[int], on_policy: bool) -> tuple[list, dict]:
        """The batch's training sequences: the teacher's answers, or on an on-policy step the student's own."""
        if not on_policy:
            return [self.pairs[i] for i in batch_ids], {}
        d, t0 = self.d, time.perf_counter()
        examples, sampled = on_policy_batch(
            self.model, self.pairs, batch_ids, d.on_policy, seq_len=d.seq_len, eos_id=self.tok.eos_token_id,
            pad_id=self.tok.pad_token_id, seed=(d.seed * 1_000_003 + self.step_no) * 1_009 + self.rank)
        return examples, {"rollout_s": time.perf_counter() - t0, "sampled_len": sum(sampled) / len(sampled),
                          "rollout": hashlib.sha256(json.dumps([e[0] for e in examples]).encode()).hexdigest()[:12]}

    def step(self) -> tuple[dict, dict, bool]:
        """One optimizer step over this process's share of the global batch; returns its log row."""
        d, acc, step = self.d, self.accelerator, self.step_no
        epoch, index = divmod(step, self.steps_per_epoch)
        batch_ids, real = batches.shard(
            batches.batches_for_epoch(len(self.pairs), d.batch_size, d.seed, epoch, self.lengths)[index],
            self.rank, self.world)
        warm = step < self.warm_steps
        on_policy = self.soft is not None and not warm and is_on_policy(step, d.on_policy.fraction)
        examples, extra = self._examples(batch_ids, on_policy)
        batch = {k: v.to(acc.device) for k, v in batches.collate(examples, self.tok.pad_token_id).items()}
        if self.aligned is not None:
            batch["example"] = torch.tensor(batch_ids, dtype=torch.long)
        topk = None
        if self.cache is not None and not on_policy and not warm:
            rows = batches.cached_rows(self.cache, [self.keys[i] for i in batch_ids], batch, self.lookup)
            topk = tuple(t.to(acc.device) for t in rows)
        loss_cfg = None if warm else self.on_soft if on_policy else self.soft
        quantize_s = None
        if self.qat is not None:  # the weights the last step changed, quantized again by llama.cpp
            t0 = time.perf_counter()
            qat.refresh(self.qat, self.d.threads)
            quantize_s = time.perf_counter() - t0
        teacher_before = self.teacher.seconds if self.teacher is not None else 0.0
        n_local = int((batch["labels"][:, 1:] != IGNORE).sum()) if real else 0
        n_global = total(acc, [n_local])[0] if self.world > 1 else n_local
        with torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=d.bf16):
            loss, _, parts = self.train_step(batch, topk, loss_cfg)
        # Every label token of the global batch weighs the same, however the batch was split: this process's mean
        # × its share of the tokens × the number of processes (DDP averages the gradients).
        acc.backward(loss * (n_local * self.world / n_global))
        self.masters.grads_in()
        acc.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.masters.weights_out()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        names = sorted(parts)
        sums = total(acc, [float(loss.detach()) * n_local, *(parts[k] * n_local for k in names),
                           int(batch["attention_mask"].sum()) if real else 0])
        self.tokens_seen += int(sums[-1])
        row = {"step": self.step_no, "epoch": epoch, "loss": round(sums[0] / n_global, 5),
               "lr": self.sched.get_last_lr()[0], "tokens": int(n_global),
               **{k: round(v / n_global, 5) for k, v in zip(names, sums[1:-1])}}
        if self.teacher is not None:
            row["teacher_s"] = round(self.teacher.seconds - teacher_before, 3)
        if warm:
            row["warmup"] = True
        if quantize_s is not None:
            row["quantize_s"] = round(quantize_s, 3)
        return row, extra, on_policy

    def log(self, row: dict, extra: dict, on_policy: bool) -> str:
        """Add a step's row to the train log (on-policy fields where on-policy is on); the progress line."""
        rate = self.tokens_seen / max(time.time() - self.started, 1e-9)
        info = f"loss {row['loss']:.3f} · {rate:.0f} tok/s"
        if self.teacher is not None:
            self.timing["teacher_s"] += row["teacher_s"]
        if self.d.on_policy.fraction > 0:
            self.n_on += on_policy
            self.timing["rollout_s"] += extra.get("rollout_s", 0.0)
            warm = row.pop("warmup", None)
            row.update(on_policy=on_policy, **{k: round(v, 3) if isinstance(v, float) else v for k, v in extra.items()})
            if warm:
                row["warmup"] = True
            info += (f" · on-policy {self.n_on}/{self.step_no} · rollouts {self.timing['rollout_s']:.0f}s"
                     f" · teacher {self.timing['teacher_s']:.0f}s")
        elif self.teacher is not None:
            info += f" · teacher {self.timing['teacher_s']:.0f}s"
        self.log_rows.append(row)
        return info

    def save(self, out_dir: Path) -> bool:
        """LoRA: adapter/ and base/ (the base without the adapter layers); full: model/. False on every process but
        the first, which alone writes (FSDP's shards are gathered by all of them first)."""
        acc, d = self.accelerator, self.d
        acc.wait_for_everyone()
        full_state = None
        if self.fsdp:  # sharded weights: every process takes part in gathering them, rank 0 writes them
            full_state = {k.removeprefix("model."): v for k, v in acc.get_state_dict(self.train_step).items()}
        if not acc.is_main_process:
            return False
        model = self.model
        model.eval()
        if self.qat is not None:  # the trained float weights are saved; export's quantizer gives what training saw
            qat.detach(self.qat)
        kept = self.kept_scoring()
        if self.best is not None and kept is not None and kept["step"] != self.step_no:
            load_trained_weights(model, self.best)
            console.print(f"  validation: the weights after step {kept['step']} (epoch {kept['epoch']:g}) are kept, "
                          f"not the last step's")
        if d.method == "lora":
            base = model.get_base_model()
            model.save_pretrained(out_dir / "adapter", save_embedding_layers=False, state_dict=full_state)
            # The base weights must be saved without the adapter layers injected: unload a copy.
            clean = model.unload() if hasattr(model, "unload") else base
            clean.save_pretrained(out_dir / "base", safe_serialization=True)
            self.tok.save_pretrained(out_dir / "base")
        else:
            model.save_pretrained(out_dir / "model", safe_serialization=True, state_dict=full_state)
            self.tok.save_pretrained(out_dir / "model")
        write_jsonl(out_dir / "train_log.jsonl", self.log_rows)
        if self.validator is not None:
            write_jsonl(out_dir / "validation.jsonl", ({**row, "kept": row is kept} for row in self.scored))
        return True

    def metrics(self) -> dict:
        """The manifest's figures of the run: steps, first and final loss, on-policy and teacher time."""
        log = self.log_rows
        tail = [r["loss"] for r in log[-max(1, min(20, len(log))):]]
        out = {"steps": self.step_no, "final_loss": round(sum(tail) / len(tail), 4),
               "first_loss": log[0]["loss"] if log else None, "train_s": round(self.timing["train_s"], 1)}
        if self.d.on_policy.fraction > 0:
            out.update(on_policy_steps=self.n_on, rollout_s=round(self.timing["rollout_s"], 1))
        if self.teacher is not None:
            out["teacher_s"] = round(self.timing["teacher_s"], 1)
        quantized = [r["quantize_s"] for r in log if "quantize_s" in r]
        kept = self.kept_scoring()
        if kept is not None:
            out.update(validation_prompts=len(self.validator), validation_kept_step=kept["step"],
                       validation_kept_epoch=kept["epoch"], validation_gold=kept["gold"],
                       validation_teacher_gold=kept["teacher_gold"], validation_loss=kept["loss"])
        if self.d.quantization_aware is not None:
            out.update(quantization_aware=self.d.quantization_aware.type, quantization_aware_steps=len(quantized),
                       quantize_s=round(sum(quantized), 1))
        return out
