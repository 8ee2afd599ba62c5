"""The student cut from its source, in one place: distill cuts it (layers chosen by block influence, an optional
trimmed vocabulary) and records the cut in student.json; eval cuts the same untrained student again from that
record to score it before distillation. ``cfg`` is the recipe (toolchain.recipe sits a floor above this one).
"""

from __future__ import annotations

import torch

from toolchain.models import student, vocab, width
from toolchain.models.chat import context, messages_for, tokenize_pairs
from toolchain.models.references import load_torch_model, resolve
from toolchain.ui import console


def build(cfg, pairs: list[tuple[list[int], list[int]]]):
    """(student, teacher or None, info); the teacher is loaded only when pruning or online KD (in the task phase or
    distill.recovery's) needs it."""
    s = cfg.student
    info: dict = {"from": s.from_}
    teacher = None
    d = cfg.distill
    online = d.teacher_in_step() or d.recovery is not None  # recovery distills the teacher's logits on broad text
    if s.from_ == "teacher" or online:
        teacher = load_torch_model(resolve(cfg.teacher), dtype=d.teacher_dtype)
    if s.from_ == "teacher":
        n = len(student.decoder_layers(teacher))
        scores = None
        if s.select == "influence" and s.keep_layers is not None and s.keep_layers < n:
            sample = [ids for ids, _ in pairs[: s.influence_samples]]
            scores = student.block_influence(teacher, sample)
        keep = student.choose_layers(n, s.keep_layers, s.select, scores)
        model = student.prune(teacher, keep) if len(keep) < n else load_torch_model(resolve(cfg.teacher), d.dtype)
        info.update(teacher_layers=n, kept_layers=keep, select=s.select,
                    influence=[round(x, 5) for x in scores] if scores else None,
                    teacher_params=student.parameter_count(teacher))
        if any(x is not None for x in (s.intermediate_size, s.kv_heads, s.hidden_size)):  # ranked on the cut model
            sample = [ids for ids, _ in pairs[: s.influence_samples]]
            info["width"] = width.plan(model, sample, s.intermediate_size, s.kv_heads, s.hidden_size)
            model = width.apply(model, info["width"])
            c = model.config
            console.print(f"  width: {c.hidden_size} hidden, {c.intermediate_size} MLP channels, "
                          f"{c.num_attention_heads} heads ({c.num_key_value_heads} key/value) a layer")
    else:
        model = load_torch_model(resolve(s.from_), dtype=d.dtype)
        info.update(kept_layers=list(range(len(student.decoder_layers(model)))))
    model = model.to(getattr(torch, d.dtype))
    info["student_params"] = student.parameter_count(model)
    if teacher is not None:
        info.setdefault("teacher_params", student.parameter_count(teacher))
    if online:
        teacher.requires_grad_(False)
    return model, (teacher if online else None), info


def trim_vocabulary(cfg, model, tok, pairs, rows: list[dict], info: dict, prompts: list,
                    also: list[list[int]] = ()):
    """The student over a trimmed vocabulary (toolchain.models.vocab): the kept tokens cover every training
    sequence, every prompt of the recipe's files (``prompts``: train and held-out, chat-templated here), the
    teacher's answers and ``also`` (token sequences kept out of training, e.g. distill.validation's)."""
    prompts = [tok.apply_chat_template(messages_for(p.prompt, cfg.generate.system_prompt, context(p)), tokenize=False,
                                       add_generation_prompt=True) for p in prompts]
    sequences = ([ids for ids, _ in pairs] + list(also)
                 + [tok(t, add_special_tokens=False).input_ids for t in prompts])
    keep = vocab.plan(tok, sequences, cfg.student.vocab)
    before = len(tok)
    model, tok = vocab.model(model, keep), vocab.tokenizer(tok, keep)
    new_pairs, _, _ = tokenize_pairs(tok, rows, cfg.student_system_prompt(), cfg.distill.seq_len,
                                     bare=cfg.data.strip_instructions)
    old_to_new = {old: new for new, old in enumerate(keep)}
    if len(new_pairs) != len(pairs) or any([old_to_new[i] for i in a] != b for (a, _), (b, _) in zip(pairs, new_pairs)):
        raise RuntimeError("vocabulary trimming changed how a training sequence tokenizes")
    info.update(vocab_size=len(keep), teacher_vocab_size=before, student_params=student.parameter_count(model),
                vocab_kept=keep)
    console.print(f"  vocabulary: {len(keep)} of {before} tokens kept")
    return model, tok, new_pairs


def recut(cfg, info: dict):
    """The student as distill cut it (``info``: its student.json), before any training."""
    if cfg.student.from_ == "teacher":
        full = load_torch_model(resolve(cfg.teacher))
        keep = info["kept_layers"]
        model = student.prune(full, keep) if len(keep) < len(student.decoder_layers(full)) else full
        if info.get("width"):
            model = width.apply(model, info["width"])
    else:
        model = load_torch_model(resolve(cfg.student.from_))
    if info.get("vocab_kept"):  # the same trimmed vocabulary as the student, before training
        model = vocab.model(model, info["vocab_kept"])
    return model
