"""distill: train the student on the teacher's answers (hard-label, soft-label or reasoning traces).

Inputs: generate's train.jsonl (and teacher_topk.* for cached soft-label), the teacher when the student is
the pruned teacher or soft-label runs online.
Outputs:
    model/            full fine-tune: the trained student (safetensors + tokenizer)
    base/ + adapter/  LoRA: the (pruned) student base and the peft adapter; merge joins them
    student.json      kept layers, block-influence scores, parameter counts, kept token ids (student.vocab)
    train_log.jsonl   loss and tokens/s per optimizer step
    validation.jsonl  distill.validation: each scoring of the held-out slice of training prompts, the kept one marked
    recovery_log.jsonl  distill.recovery: the same per step of the recovery phase (its text: .resume/recovery/)

The student is cut in toolchain.models.cut and trained by toolchain.training.trainer (losses, batches, the
online teacher, on-policy rollouts live in toolchain.training). Checkpoints (trainable weights, optimizer,
scheduler, step, log) go to .resume/ every ``checkpoint_every`` steps; a resumed run replays exactly.
"""


from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from toolchain.data.formats import load_prompts
from toolchain.data.rows import iter_jsonl, write_jsonl
from toolchain.models import cut
from toolchain.models.chat import IGNORE, tokenize_pairs
from toolchain.models.references import load_tokenizer, resolve
from toolchain.pipeline.runs import RESUME_DIR, Manifest
from toolchain.recipe import Recipe
from toolchain.training import cross_vocab, recovery, validation
from toolchain.training.topk_cache import TopKCache, example_key
from toolchain.training.trainer import Trainer
from toolchain.ui import console, local_world_size


def run(cfg: Recipe, inputs: dict[str, Path], out_dir: Path) -> Manifest:
    d = cfg.distill
    torch.set_num_threads(d.threads or max(1, (os.cpu_count() or 1) // local_world_size()))
    torch.manual_seed(d.seed)
    rows = [r for _, r in iter_jsonl(inputs["generate"] / "train.jsonl")]
    if not rows:
        raise ValueError("generate kept no training pairs; check the teacher and generate.max_new_tokens")

    held = []
    if d.validation is not None:  # kept out of training, scored during it (training/validation.py)
        rows, held = validation.split(rows, d.validation, d.seed)
    student_ref = resolve(cfg.student_source())
    tok = load_tokenizer(student_ref)
    pairs, source, n_cut = tokenize_pairs(tok, rows, cfg.student_system_prompt(), d.seq_len,
                                          bare=cfg.data.strip_instructions)
    keys = [example_key(rows[i]) for i in source]
    cache = None
    if d.flavour == "soft" and d.soft.teacher_logits == "cache":
        cache = TopKCache(inputs["generate"])
        cache.check(min(d.soft.top_k, len(tok)), d.soft.temperature)
    console.print(f"  {len(pairs)} examples ({n_cut} cut to seq_len={d.seq_len})")

    model, teacher, info = cut.build(cfg, pairs)
    if cfg.student.vocab is not None:
        train, heldout = load_prompts(cfg, limits=False)
        also = [ids for ids, _ in tokenize_pairs(tok, held, cfg.student_system_prompt(), d.seq_len,
                                                 bare=cfg.data.strip_instructions)[0]]
        model, tok, pairs = cut.trim_vocabulary(cfg, model, tok, pairs, rows, info, train + heldout, also)
    console.print(f"  student: {len(info['kept_layers'])} layers, {info['student_params'] / 1e6:.1f}M parameters")

    aligned = None
    if teacher is not None and cfg.student.from_ != "teacher" and not cross_vocab.same_vocabulary(cfg):
        aligned, report = cross_vocab.prepare(cfg, tok, rows, pairs, source)
        for line in report.lines():
            console.print(f"  across tokenizers: {line}")
        info["alignment"] = report.as_dict()
    recovered = {}
    if d.recovery is not None:  # the teacher's distribution on broad text first, then the task
        recovered, recovery_log = recovery.recover(cfg, model, tok, teacher, info.get("vocab_kept"),
                                                   out_dir / RESUME_DIR)
        write_jsonl(out_dir / "recovery_log.jsonl", recovery_log)
        if not d.teacher_in_step():
            teacher = None  # loaded for the recovery only: the task phase reads its cache or the answers
    validator = None
    if held:
        validator = validation.Validator(cfg, tok, held)
        console.print(f"  validation: {len(validator)} training prompts held out of training, scored "
                      + (f"every {d.validation.every} steps" if d.validation.every else "after every epoch"))
    trainer = Trainer(cfg, model, tok, pairs, keys, teacher=teacher, cache=cache, kept=info.get("vocab_kept"),
                      aligned=aligned, validator=validator)
    trainer.resume(out_dir / RESUME_DIR)
    trainer.train()
    if not trainer.save(out_dir):
        return Manifest()
    (out_dir / "student.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    m = trainer.metrics()
    return Manifest(
        metrics={"examples": len(pairs), "cut": n_cut, "steps": m.pop("steps"), "final_loss": m.pop("final_loss"),
                 "prompt_tokens_mean": round(sum(sum(x == IGNORE for x in labels) for _, labels in pairs)
                                             / len(pairs), 1),
                 "first_loss": m.pop("first_loss"), "student_params": info["student_params"],
                 "student_layers": len(info["kept_layers"]), **m, **recovered},
        seeds={"distill": d.seed},
    )
