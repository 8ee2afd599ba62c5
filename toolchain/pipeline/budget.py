"""``distillery plan``: what a recipe needs before it runs — the peak memory of each stage from the models' shapes
alone (no weight loaded), the work of the training run, and which settings make it fit a device."""

from __future__ import annotations

import math
from dataclasses import replace

from toolchain.data.formats import load_prompts
from toolchain.models import sizes
from toolchain.data.rows import iter_jsonl
from toolchain.models.chat import IGNORE, context, messages_for, tokenize_pairs
from toolchain.models.references import load_tokenizer, resolve
from toolchain.pipeline.plans import finished
from toolchain.pipeline.runs import RunError
from toolchain.recipe import Recipe
from toolchain.training import memory
from toolchain.training.memory import GB, RUNTIME_BYTES, Setting, fmt_bytes, fmt_seconds


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def shapes(cfg: Recipe) -> tuple[sizes.Shape | None, sizes.Shape | None, list[str]]:
    """(teacher, student, notes): None for a model nothing local describes."""
    notes = []

    def shape(ref: str, role: str) -> sizes.Shape | None:
        if ref.startswith("openai:"):
            return None
        found = sizes.shape_of(ref if ref.startswith("hf:") else resolve(ref))
        if found is None:
            notes.append(f"{role} {ref}: its config.json is not on this machine (fetch it, or point at a local "
                         "folder); its parts are left out")
        return found

    teacher = shape(cfg.teacher, "teacher")
    if cfg.student.from_ == "teacher":
        student = teacher.with_layers(cfg.student.keep_layers or teacher.layers) if teacher else None
        st = cfg.student
        if student is not None and (st.intermediate_size or st.kv_heads or st.hidden_size):
            student = student.with_width(st.intermediate_size, st.kv_heads, st.hidden_size)
    else:
        student = shape(cfg.student.from_, "student")
    if student is not None and cfg.student.vocab is not None and cfg.student.vocab < student.vocab:
        student = student.with_vocab(cfg.student.vocab)
    return teacher, student, notes


def plan_lines(cfg: Recipe, capacity: int | None = None, gpus: int = 1, tflops: float | None = None,
               runs_root: str | None = None) -> list[str]:
    """The plan as printed; with ``runs_root`` a finished generate stage's answers give the sequence lengths."""
    teacher, student, notes = shapes(cfg)
    out = []
    for role, s in (("teacher", teacher), ("student", student)):
        if s is not None:
            out.append(f"{role}: {s.params / 1e6:,.1f}M weights ({'counted' if s.exact else 'from its config'}), "
                       f"{s.layers} layers × {s.hidden} wide (MLP {s.intermediate:,}, {s.heads} heads, {s.kv_heads} "
                       f"key/value), vocabulary {s.vocab:,}"
                       f"{', output layer tied' if s.tied else ''}")
    if cfg.teacher.startswith("openai:"):
        out.append("teacher: behind an endpoint (no memory here)")
    out += notes
    if student is None:
        return out
    setting = Setting.of(cfg, processes=gpus)
    answered = _answered(cfg, runs_root)
    if answered is not None:  # generate is done: its answers, as distill will tokenize them
        sequences = answered.pop("sequences")
        setting = replace(setting, **answered)
        out.append(f"(sequences measured on generate's {sequences:,} training pairs)")
    else:
        train, _ = load_prompts(cfg)
        longest = _longest_prompt(cfg, train)
        if longest is not None:  # the longest batch: the longest prompt with an answer of generate.max_new_tokens
            setting = replace(setting, seq_len=min(setting.seq_len, longest + setting.labelled))
        sequences = len(train) * cfg.generate.n
    out.append("")
    out.append(f"generate: {_generate(cfg, teacher)}")
    parts = memory.step_parts(student, teacher, setting)
    peak = sum(parts.values())
    where = f"per process ({gpus} processes)" if gpus > 1 else "one process"
    cut = memory.cut_bytes(student, teacher, setting) if cfg.student.from_ == "teacher" else 0
    out.append(f"distill, {where}: peak {fmt_bytes(max(peak, cut))}"
               + (f" (cutting the student from the teacher: {fmt_bytes(cut)})" if cut > peak else ""))
    out += [f"  {name:<16} {fmt_bytes(v):>10}" for name, v in parts.items() if v]
    if cfg.distill.flavour == "soft" and cfg.distill.soft.teacher_logits == "cache":
        positions = sequences * setting.labelled
        per = (2 if student.vocab < 65536 else 4) + 2
        out.append(f"  top-k cache on disk: at most {fmt_bytes(positions * cfg.distill.soft.top_k * per)} "
                   f"({positions:,} positions × k={cfg.distill.soft.top_k})")
    out.append(f"merge: peak {fmt_bytes(student.params * 4 * 2 + RUNTIME_BYTES)} (base and merged student, float32)")
    out.append(f"export: peak {fmt_bytes(student.params * 4 * 2 + RUNTIME_BYTES)} (the converter's float32 copy "
               "and the quantized file)")
    out.append(f"serve (q8_0): {fmt_bytes(student.params * 34 / 32 + _kv(student, cfg.serve.n_ctx))} "
               f"(the file + a {cfg.serve.n_ctx}-token KV cache)")
    out += _time(cfg, student, teacher, setting, tflops, sequences, answered is not None)
    if capacity is not None:
        out.append("")
        device = f"{gpus} × {capacity / GB:.0f} GB" if gpus > 1 else f"{capacity / GB:.0f} GB"
        if peak <= capacity:
            out.append(f"fits {device}: distill peaks at {fmt_bytes(peak)} per process")
        else:
            ways = memory.ways_to_fit(student, teacher, setting, capacity, gpus)
            out.append(f"does not fit {device}: distill peaks at {fmt_bytes(peak)} per process; "
                       + ("it fits with:" if ways else "no combination of the settings below makes it fit"))
            out += [f"  {name}: {fmt_bytes(p)}" for name, p in ways]
    return out


def _answered(cfg: Recipe, runs_root: str | None) -> dict | None:
    """The longest and mean sequence of generate's finished training pairs in the student's tokens."""
    if runs_root is None:
        return None
    try:
        folder = finished(cfg, runs_root, "generate")
    except RunError:
        return None
    rows = [r for _, r in iter_jsonl(folder / "train.jsonl")]
    tok = _student_tokenizer(cfg)
    if not rows or tok is None:
        return None
    pairs, _, _ = tokenize_pairs(tok, rows, cfg.student_system_prompt(), cfg.distill.seq_len,
                                 bare=cfg.data.strip_instructions)
    lengths = [len(ids) for ids, _ in pairs]
    labelled = [sum(x != IGNORE for x in labels) for _, labels in pairs]
    return {"seq_len": max(lengths), "labelled": max(labelled), "mean_tokens": sum(lengths) / len(pairs),
            "mean_labelled": sum(labelled) / len(pairs), "sequences": len(pairs)}


def _student_tokenizer(cfg: Recipe):
    """The student's tokenizer, or None where it is not on this machine (a Hub model, a folder with its config
    alone: enough to plan)."""
    ref = cfg.student_source()
    if ref.startswith(("hf:", "openai:")):
        return None
    model = resolve(ref)
    if model.kind == "hf_dir" and not any((model.path / f).is_file() for f in TOKENIZER_FILES):
        return None
    return load_tokenizer(model)


def _longest_prompt(cfg: Recipe, train) -> int | None:
    """Tokens of the longest training prompt in the student's chat template (None: its tokenizer is not local)."""
    tok = _student_tokenizer(cfg)
    if tok is None:
        return None
    system = cfg.student_system_prompt()
    return max((len(tok.apply_chat_template(messages_for(p.prompt, system, context(p)), add_generation_prompt=True))
                for p in train), default=0)


def _kv(s: sizes.Shape, context: int) -> int:
    return s.layers * 2 * s.kv_heads * s.head_dim * context * 2


def _generate(cfg: Recipe, teacher: sizes.Shape | None) -> str:
    if cfg.teacher.startswith("openai:"):
        return "the teacher answers behind its endpoint (no memory here)"
    if teacher is None:
        return "teacher size unknown"
    ref = resolve(cfg.teacher)
    weights = ref.path.stat().st_size if ref.kind == "gguf" else teacher.params * 4
    kv = _kv(teacher, cfg.generate.max_new_tokens + cfg.distill.seq_len) * max(1, cfg.generate.batch)
    return f"peak {fmt_bytes(weights + kv + RUNTIME_BYTES)} (weights {fmt_bytes(weights)}, KV cache {fmt_bytes(kv)})"


def _time(cfg: Recipe, student, teacher, setting: Setting, tflops: float | None, sequences: int,
          measured: bool) -> list[str]:
    d = cfg.distill
    steps = d.max_steps or max(1, math.ceil(math.ceil(sequences / d.batch_size) * d.epochs))
    flops = memory.step_flops(student, teacher, setting) * steps
    rate = memory.matmul_rate() * memory.CPU_UTILISATION
    length = (f"{setting.mean_tokens:.0f} tokens on average" if measured
              else f"{setting.seq_len} tokens (answers at generate.max_new_tokens: an upper bound)")
    out = [f"training work: {flops / 1e12:,.1f} TFLOP over {steps} steps of {d.batch_size} sequences of {length}",
           f"  on this machine: about {fmt_seconds(flops / rate)} ({rate / 1e9:.0f} GFLOP/s sustained: "
           f"{memory.CPU_UTILISATION:.0%} of its measured matmul rate)"]
    if tflops:
        out.append(f"  at {tflops:g} TFLOP/s sustained per GPU × {setting.processes}: "
                   f"{fmt_seconds(flops / (tflops * 1e12 * setting.processes))}")
    return out
