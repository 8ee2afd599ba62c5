"""distill.recovery: before the task phase, the pruned student learns the teacher's next-token distribution on broad
text, to give back what the cut layers held (Minitron recovers a pruned model by distilling the teacher's logits on
pretraining text; a task's few hundred answers do not carry the world knowledge a `fact`-like task needs).

The text is either

  - the teacher's own: ``sequences`` samples, each from a random first token of the student's vocabulary, then
    ``GREEDY_FIRST`` greedy tokens, then sampled at ``temperature`` over that vocabulary (the data-free recipe of
    LLM-QAT: what the teacher writes unprompted is a sample of what it knows, and it needs no corpus on the
    machine), or
  - plain-text files the recipe names (.txt passages separated by a blank line, .jsonl with a ``text`` field).

Every position of every sequence is a target: forward KL at ``temperature`` from the online teacher's distribution
over the student's vocabulary (the teacher's logits at the kept ids when the vocabulary is trimmed). The phase is
an ordinary ``Trainer`` run with its own schedule and checkpoints (.resume/recovery/); when it ends its weights are
kept there, so a task phase killed later resumes without redoing it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from toolchain.data.rows import JsonlAppender, iter_jsonl, read_jsonl_resumable, write_jsonl
from toolchain.models.chat import IGNORE
from toolchain.recipe import Recipe
from toolchain.training.trainer import Trainer
from toolchain.ui import console, progress

DONE = "recovered.pt"
# LLM-QAT's hybrid: after the random first token the teacher's next few tokens are its top-1 (a random token alone
# starts mid-word in nowhere in particular; a few greedy steps settle on a topic), then it samples.
GREEDY_FIRST = 4
TEXT_BATCH = 64  # sequences of the teacher's text stepped together (and written to disk together)
PARTIAL = "teacher_text.partial.jsonl"  # the teacher's sequences so far, in its ids (gone once the text is written)


def chooser(allowed: list[int], n_vocab: int, temperature: float):
    """``choose(step, logits, u)`` for the teacher's text: over ``allowed`` only, the top-1 for the first
    ``GREEDY_FIRST`` steps, then a sample at ``temperature`` by inverse CDF at the uniforms ``u`` (one a row)."""
    mask = np.full(n_vocab, -np.inf, dtype=np.float32)
    mask[allowed] = 0.0

    def choose(step: int, logits: np.ndarray, u: np.ndarray) -> np.ndarray:
        z = logits + mask
        if step < GREEDY_FIRST:
            return z.argmax(-1)
        z = (z - z.max(-1, keepdims=True)) / temperature
        cdf = np.cumsum(np.exp(z), -1)
        return np.minimum((cdf < (u * cdf[:, -1])[:, None]).sum(-1), n_vocab - 1)

    return choose


def teacher_text(teacher, allowed: list[int], n: int, seq_len: int, temperature: float, seed: int,
                 batch: int = TEXT_BATCH, done: int = 0, emit=None) -> list[list[int]]:
    """``n`` sequences of ``seq_len`` teacher token ids, each from a random first token in ``allowed`` (no special
    token), then ``GREEDY_FIRST`` top-1 tokens, then sampled from the teacher at ``temperature``, over ``allowed``
    only; ``batch`` sequences stepped together on the teacher's KV cache. A pure function of the seed and the
    teacher's logits (each sequence draws its own uniforms, whatever the batch), so a run killed part-way goes on
    from sequence ``done`` and writes what an unbroken run writes; ``emit(rows)`` gets each batch as it is written.

    PyTorch, not llama.cpp: on 2 cores with the embedded 135M teacher (Q4_1 file, float32 in PyTorch) 64 sequences of
    128 tokens stepped together measured 302 tokens/s here and 149 in llama.cpp's batched decoding of the same file
    (the 49,152-row output layer dominates, and MKL's float GEMM beats the quantized kernels at that batch)."""
    device = next(teacher.parameters()).device
    rng = np.random.default_rng(seed)
    allowed = sorted(allowed)
    firsts = [allowed[i] for i in rng.integers(len(allowed), size=n)]
    uniforms = rng.random((n, seq_len))
    choose = chooser(allowed, teacher.get_output_embeddings().weight.shape[0], temperature)
    out: list[list[int]] = []
    with progress() as bar, torch.inference_mode():
        task = bar.add_task("recovery text", total=n, completed=done, info="the teacher writes")
        for start in range(done, n, batch):
            ids = torch.tensor(firsts[start:start + batch], dtype=torch.long, device=device)[:, None]
            past, step_ids = None, ids
            for k in range(seq_len - 1):
                res = teacher(input_ids=step_ids, past_key_values=past, use_cache=True)
                past = res.past_key_values
                picked = choose(k, res.logits[:, -1].float().cpu().numpy(), uniforms[start:start + len(ids), k])
                step_ids = torch.as_tensor(picked, dtype=torch.long, device=device)[:, None]
                ids = torch.cat([ids, step_ids], dim=1)
            out += ids.tolist()
            if emit is not None:
                emit(ids.tolist())
            bar.update(task, advance=len(ids))
    return out


def file_text(tok, paths: list[Path], n: int, seq_len: int) -> list[list[int]]:
    """The first ``n`` passages of the files as student token ids, each cut to ``seq_len``."""
    seqs: list[list[int]] = []
    for path in paths:
        if path.suffix == ".jsonl":
            passages = []
            for line_no, row in iter_jsonl(path):
                if not isinstance(row.get("text"), str):
                    raise ValueError(f"{path}:{line_no}: distill.recovery.text: expected a 'text' string field")
                passages.append(row["text"])
        else:
            passages = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
        for text in passages:
            ids = tok(text, add_special_tokens=False).input_ids[:seq_len]
            if len(ids) >= 2:
                seqs.append(ids)
            if len(seqs) == n:
                return seqs
    return seqs


def sequences(cfg: Recipe, tok, teacher, kept: list[int] | None, work: Path) -> list[list[int]]:
    """The recovery text in student token ids, written once to ``work``/recovery_text.jsonl (a resumed run reads it
    back; the teacher's ids and the decoded text for a reader). The teacher's sequences are appended to
    ``PARTIAL`` a batch at a time as they are sampled, so a kill loses at most one batch."""
    r = cfg.distill.recovery
    path = work / "recovery_text.jsonl"
    if path.exists():
        return [row["ids"] for _, row in iter_jsonl(path)]
    if r.text == "teacher":
        specials = set(tok.all_special_ids)
        student_ids = [i for i in range(len(tok)) if i not in specials]
        allowed = [kept[i] for i in student_ids] if kept is not None else student_ids
        before = [row["ids"] for row in read_jsonl_resumable(work / PARTIAL)][: r.sequences]
        if before:
            console.print(f"  recovery: {len(before)} of {r.sequences} sequences of the teacher's text written before")
        with JsonlAppender(work / PARTIAL) as out:
            raw = before + teacher_text(teacher, allowed, r.sequences, r.seq_len, r.temperature, cfg.distill.seed,
                                        batch=TEXT_BATCH, done=len(before),
                                        emit=lambda rows: out.write_many({"ids": x} for x in rows))
        to_student = {t: s for s, t in enumerate(kept)} if kept is not None else None
        seqs = [[to_student[t] for t in ids] for ids in raw] if to_student else raw
    else:
        seqs = file_text(tok, [cfg.data_path(p) for p in r.text], r.sequences, r.seq_len)
        if not seqs:
            raise ValueError(f"distill.recovery.text: no passage of {', '.join(r.text)} has two tokens or more")
    write_jsonl(path, [{"ids": ids, "text": tok.decode(ids)} for ids in seqs])
    (work / PARTIAL).unlink(missing_ok=True)
    return seqs


def phase_recipe(cfg: Recipe, n: int) -> Recipe:
    """The recipe of the recovery phase: pure forward KL on every token against the online teacher, its own
    steps and learning rate, no on-policy or quantization-aware steps."""
    d, r = cfg.distill, cfg.distill.recovery
    soft = d.soft.model_copy(update={"loss": "forward_kl", "temperature": r.temperature, "alpha": 1.0,
                                     "teacher_logits": "online"})
    steps = r.steps or -(-n // d.batch_size)
    return cfg.model_copy(update={"distill": d.model_copy(update={
        "flavour": "soft", "soft": soft, "on_policy": d.on_policy.model_copy(update={"fraction": 0.0}),
        "warmup_epochs": 0.0, "max_steps": steps,
        "lr": r.lr or d.lr, "seq_len": r.seq_len, "quantization_aware": None,
        "validation": None})})


def recover(cfg: Recipe, model, tok, teacher, kept: list[int] | None, resume_dir: Path) -> tuple[dict, list[dict]]:
    """Run the recovery phase on ``model`` in place (or load its finished weights); its figures for the manifest
    (``recovery_*``) and its train log rows."""
    work = resume_dir / "recovery"
    work.mkdir(parents=True, exist_ok=True)
    done = work / DONE
    if done.exists():
        state = torch.load(done, map_location="cpu", weights_only=True)
        model.load_state_dict(state["weights"])
        console.print(f"  recovery: finished before ({state['metrics']['recovery_steps']} steps), weights reloaded")
        return state["metrics"], state["log"]
    seqs = sequences(cfg, tok, teacher, kept, work)
    pairs = [(ids, [IGNORE] + ids[1:]) for ids in seqs]
    phase = phase_recipe(cfg, len(pairs))
    source = "the teacher's" if cfg.distill.recovery.text == "teacher" else "the files'"
    console.print(f"  recovery: {len(pairs)} sequences of {source} text, {phase.distill.max_steps} steps on the "
                  "teacher's distribution")
    trainer = Trainer(phase, model, tok, pairs, [f"recovery:{i}" for i in range(len(pairs))], teacher=teacher,
                      kept=kept)
    trainer.resume(work)
    trainer.train()
    m = trainer.metrics()
    metrics = {"recovery_sequences": len(pairs), "recovery_tokens": sum(len(s) for s in seqs),
               "recovery_steps": m["steps"], "recovery_first_loss": m["first_loss"],
               "recovery_final_loss": m["final_loss"], "recovery_s": m["train_s"]}
    log = [{**row, "phase": "recovery"} for row in trainer.log_rows]
    tmp = work / (DONE + ".tmp")
    torch.save({"weights": model.state_dict(), "metrics": metrics, "log": log}, tmp)
    tmp.replace(done)
    (work / "checkpoint.pt").unlink(missing_ok=True)
    return metrics, log
