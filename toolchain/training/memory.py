"""What a recipe's training takes, from the models' shapes alone (``models/sizes.py``; no weight is loaded): the
peak memory of one training process, part by part, the work of the run in floating-point operations, and which
settings make it fit a device (``distillery plan``).

The parts of a distill step (per process; FSDP shards the first four over the processes):

    student weights    parameters × bytes of distill.dtype
    gradients          trainable parameters × bytes of distill.dtype
    master copies      trainable parameters × 4 below float32 (AdamW steps on float32 copies)
    optimizer          trainable parameters × 8 (AdamW's two float32 moments)
    teacher weights    teacher parameters × bytes of distill.teacher_dtype, when the teacher runs in the step
                       (online or on-policy soft labels; an endpoint or a top-k cache keeps it out)
    activations        sequences × seq_len × layers × (10·hidden + 3·kv width + 4·intermediate) values kept for
                       backward (norm inputs, q/k/v and their rotated copies, attention output, residuals; the
                       MLP's gate, up, activation and product); with checkpointing one hidden state per layer
                       and token, plus one layer's worth recomputed in backward
    loss               rows in flight × vocabulary × 4 bytes × 4 tensors (logits, the log-probabilities of the
                       cross-entropy and of the divergence, the logits' gradient); + 2 of the teacher's vocabulary
                       for an online teacher's logits and log-probabilities. Rows in flight: the labelled positions
                       of a batch, or distill.loss_chunk of them (the chunked loss)
    runtime            the framework itself (measured: the Python process with torch and transformers imported)

Values at bfloat16 autocast or a 16-bit student are 2 bytes, else 4. Attention is taken as the fused kernel (no
sequence² scores kept). The top-k cache is on disk: positions × k × (id + float16 log-prob).
"""

from __future__ import annotations

import math
from itertools import combinations
from dataclasses import dataclass, replace

from toolchain.models.sizes import Shape
from toolchain.training.losses import auto_chunk

GB = 1024**3
RUNTIME_BYTES = 600 * 1024**2  # torch + transformers + tokenizers imported, measured RSS (docs/plan.md)
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Setting:
    """The recipe's training settings the memory depends on (a recipe's distill section, or what-ifs of it)."""

    method: str = "full"
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    dtype: str = "float32"
    teacher_dtype: str = "float32"
    bf16: bool = False
    checkpointing: bool = False
    train_embeddings: bool = False
    batch: int = 8  # sequences per step, all processes
    seq_len: int = 256
    labelled: int = 128  # labelled positions per sequence
    chunk: int | None = None  # distill.loss_chunk (None: auto, 0: never)
    teacher_in_step: bool = False  # online / on-policy soft labels
    processes: int = 1
    fsdp: bool = False
    mean_tokens: float | None = None  # per sequence, for the work (None: seq_len)
    mean_labelled: float | None = None

    @classmethod
    def of(cls, cfg, processes: int = 1, fsdp: bool = False) -> Setting:
        d = cfg.distill
        return cls(method=d.method, lora_r=d.lora.r, lora_targets=tuple(d.lora.targets), dtype=d.dtype,
                   teacher_dtype=d.teacher_dtype, bf16=d.bf16, checkpointing=d.gradient_checkpointing,
                   train_embeddings=d.train_embeddings, batch=d.batch_size, seq_len=d.seq_len,
                   labelled=min(d.seq_len, cfg.generate.max_new_tokens + 1), chunk=d.loss_chunk,
                   teacher_in_step=d.teacher_in_step() or d.recovery is not None,
                   processes=processes, fsdp=fsdp)


def trainable(student: Shape, s: Setting) -> int:
    if s.method == "lora":
        return student.lora(s.lora_r, list(s.lora_targets))
    frozen = 0 if s.train_embeddings else student.embedding + student.output_layer
    return student.params - frozen


def step_parts(student: Shape, teacher: Shape | None, s: Setting) -> dict[str, int]:
    """Bytes of each part of one training process at its peak (module docstring)."""
    wb = BYTES[s.dtype]
    t = trainable(student, s)
    shard = s.processes if s.fsdp else 1
    act = 2 if (s.bf16 or wb == 2) else 4
    seqs = math.ceil(s.batch / s.processes)
    tokens = seqs * s.seq_len
    per_layer = 10 * student.hidden + 3 * student.kv_heads * student.head_dim + 4 * student.intermediate
    if s.checkpointing:
        activations = act * (tokens * student.layers * student.hidden + tokens * per_layer)
    else:
        activations = act * tokens * student.layers * per_layer
    rows = seqs * s.labelled
    chunk = auto_chunk(student.vocab) if s.chunk is None else s.chunk
    in_flight = min(rows, chunk) if chunk else rows
    teacher_vocab = teacher.vocab if teacher is not None else student.vocab
    loss = in_flight * 4 * (4 * student.vocab + (2 * teacher_vocab if s.teacher_in_step else 0))
    parts = {
        "student weights": student.params * wb // shard,
        "gradients": t * wb // shard,
        "master copies": (t * 4 if wb < 4 else 0) // shard,
        "optimizer": t * 8 // shard,
        "teacher weights": teacher.params * BYTES[s.teacher_dtype] if s.teacher_in_step and teacher else 0,
        "activations": activations,
        "loss": loss,
        "runtime": RUNTIME_BYTES,
    }
    return parts


def cut_bytes(student: Shape, teacher: Shape | None, s: Setting) -> int:
    """Building the student from the teacher (the layer cut, block influence): both in memory at once."""
    return (teacher.params * BYTES[s.teacher_dtype] if teacher else 0) + student.params * BYTES[s.dtype] \
        + RUNTIME_BYTES


def step_flops(student: Shape, teacher: Shape | None, s: Setting) -> float:
    """Floating-point operations of one optimizer step (all processes): 2 per weight per token forward, twice that
    backward (once for LoRA: no weight gradients of the frozen layers), one more forward with checkpointing; the
    output layer only at labelled positions; an online teacher's forward."""
    body = student.params - student.embedding - student.output_layer
    tokens = s.batch * (s.mean_tokens or s.seq_len)
    rows = s.batch * (s.mean_labelled or s.labelled)
    passes = (2 if s.method == "lora" else 3) + (1 if s.checkpointing else 0)
    flops = 2 * body * tokens * passes + 2 * student.hidden * student.vocab * rows * 3
    if s.teacher_in_step and teacher is not None:
        flops += 2 * (teacher.params - teacher.embedding - teacher.output_layer) * tokens
        flops += 2 * teacher.hidden * teacher.vocab * rows
    return float(flops)


# What-ifs offered when the recipe does not fit, in order of how little they change.
WHAT_IFS = [
    ("gradient checkpointing", {"checkpointing": True}),
    ("bfloat16 weights and autocast", {"dtype": "bfloat16", "teacher_dtype": "bfloat16", "bf16": True}),
    ("a chunked loss (distill.loss_chunk)", {"chunk": None}),
    ("the teacher behind an endpoint / its top-k cache", {"teacher_in_step": False}),
    ("LoRA (r=16)", {"method": "lora"}),
]


def ways_to_fit(student: Shape, teacher: Shape | None, s: Setting, capacity: int,
                gpus: int = 1) -> list[tuple[str, int]]:
    """The smallest sets of what-ifs (one, then two, ...) under which a process fits ``capacity`` bytes, each with
    its peak; FSDP across ``gpus`` is one more what-if when there are several."""
    options = list(WHAT_IFS)
    if gpus > 1:
        options.append((f"FSDP across {gpus} GPUs", {"fsdp": True, "processes": gpus}))
    found: list[tuple[str, int]] = []
    for size in range(1, len(options) + 1):
        for combo in combinations(options, size):
            changed = replace(s, **{k: v for _, change in combo for k, v in change.items()})
            if changed == s:
                continue
            peak = sum(step_parts(student, teacher, changed).values())
            if peak <= capacity:
                found.append((" + ".join(n for n, _ in combo), peak))
        if found:
            break
    return found


def matmul_rate(seconds: float = 0.5) -> float:
    """This machine's float32 matrix-multiply rate (FLOP/s), measured with torch on 1,024² matrices."""
    import time

    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - start)


# The share of the measured matmul rate that a distill step reaches on a CPU: set from the default recipe's run
# (36.8 TFLOP in 249 s at a measured 201 GFLOP/s: 0.74), checked on two others (docs/plan.md).
CPU_UTILISATION = 0.74


def fmt_bytes(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1024**2:.0f} MB"


def fmt_seconds(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"
