"""``distillery promote``: a newer student replaces the one being served only when it is not worse.

Both files answer the recipe's newest held-out prompts that have a gold answer (for a recipe on traffic with
``data.reference_is_gold``, the newest calls' own answers), greedily through llama.cpp as they will be served, each
answer scored by the task's metric. The gate is the paired, one-sided non-inferiority test eval uses
(``stats.retention_bounds``): the candidate is promoted when the lower confidence bound of its retention of the
served file's right answers is at least ``1 - margin``. The served file is replaced by an atomic rename (a server
started with ``--watch`` re-opens it between calls), and every decision — promoted or not, with its numbers — is
appended to ``promotions.jsonl`` next to the served file. Each file's answers are kept in ``.answers/`` beside
it (by the file's and the prompts' digests), so the served file — usually the candidate of an earlier promotion —
is not asked again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from toolchain.backends.llama_cpp import LlamaCppEngine
from toolchain.data.formats import load_prompts
from toolchain.models.references import ModelError, file_sha256
from toolchain.pipeline.runs import write_json_atomic
from toolchain.quality.heldout import messages
from toolchain.quality.metrics import check
from toolchain.quality.stats import retention_bounds
from toolchain.recipe import Recipe, RecipeError
from toolchain.ui import console


def served_path(cfg: Recipe, runs_root, quant: str) -> Path:
    """Where a recipe's promoted student lives: runs/<recipe>/served/<recipe>-<quant>.gguf."""
    return Path(runs_root) / cfg.name / "served" / f"{cfg.name}-{quant}.gguf"


def _rows(cfg: Recipe, limit: int | None) -> list:
    heldout = [p for p in load_prompts(cfg)[1] if p.gold is not None]
    if not heldout:
        raise RecipeError("data.heldout: promote compares the two students on held-out prompts with gold answers, and "
                          "the recipe has none (a traffic recipe: data.reference_is_gold: true)")
    return heldout[-limit:] if limit else heldout  # the newest last, as the data lists them


def answers(path: Path, chats: list[list[dict]], max_tokens: int, cache: Path | None = None) -> list[str]:
    """Each chat's greedy answer from the GGUF at ``path`` (its own chat template, several decoded together).
    With ``cache`` (a folder), answers are kept by the file's and the prompts' digests: the served file was
    usually a candidate before, and its answers are not computed twice."""
    key = hashlib.sha256(json.dumps([file_sha256(path), chats, max_tokens]).encode()).hexdigest()[:24]
    kept = cache / f"{key}.json" if cache is not None else None
    if kept is not None and kept.is_file():
        return json.loads(kept.read_text(encoding="utf-8"))
    engine = LlamaCppEngine(path, n_ctx=4096)
    try:
        prompts = [engine.tokenize(engine.chat_text(m)) for m in chats]
        out = [engine.detokenize([t for t in toks if t not in engine.eos_ids]).strip()
               for toks in engine.greedy_batch(prompts, max_tokens)]
    finally:
        engine.close()  # the other file is opened next: one model in memory at a time
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(kept, out)
    return out


def compare(cfg: Recipe, candidate: Path, served: Path, margin: float, limit: int | None = None,
            cache: Path | None = None) -> dict:
    """Both files on the same held-out prompts: per-prompt right/wrong, the candidate's retention of the served
    file's right answers with its one-sided bounds at eval.gate_level, and the decision."""
    rows = _rows(cfg, limit)
    specs = cfg.task_specs([{"task": p.task, "gold": p.gold} for p in rows])
    chats = [messages(cfg, "student", {"prompt": p.prompt, **p.extras()}) for p in rows]  # as eval asks the student
    max_tokens = cfg.eval.max_new_tokens
    console.print(f"promote: {len(rows)} held-out prompts with gold answers, each file answering greedily")
    new = [check(specs[p.task], a, p.gold) for p, a in zip(rows, answers(candidate, chats, max_tokens, cache))]
    old = [check(specs[p.task], a, p.gold) for p, a in zip(rows, answers(served, chats, max_tokens, cache))]
    level = cfg.eval.gate_level
    if any(old):
        lower, upper = retention_bounds(old, new, level)
        promote = lower >= 1 - margin
        why = (f"lower bound {lower:.3f} {'>=' if promote else '<'} {1 - margin:.3f} (1 - margin) at level {level:g}")
    else:  # the served file gets nothing right: anything is at least as good
        lower = upper = None
        promote, why = True, "the served file answers none of the prompts right"
    return {"n": len(rows), "served_right": sum(old), "candidate_right": sum(new),
            "retention": sum(new) / sum(old) if any(old) else None, "lower": lower, "upper": upper,
            "margin": margin, "level": level, "promote": promote, "why": why}


def promote(cfg: Recipe, candidate: Path, target: Path, margin: float, limit: int | None = None) -> dict:
    """Compare ``candidate`` with the file at ``target`` and replace it when the candidate is not worse (or when
    nothing is served yet); the decision is appended to target's promotions.jsonl."""
    if not candidate.is_file():
        raise ModelError(f"{candidate}: no such GGUF file")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = file_sha256(candidate)
    record = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "recipe": cfg.name,
              "candidate": str(candidate), "candidate_sha256": digest, "served": str(target)}
    if not target.exists():
        decision = {"promote": True, "why": "nothing was served yet"}
    elif file_sha256(target) == digest:
        decision = {"promote": False, "why": "the candidate is the file already served"}
    else:
        decision = {"served_sha256": file_sha256(target),
                    **compare(cfg, candidate, target, margin, limit, target.parent / ".answers")}
    record |= decision
    if decision["promote"]:
        tmp = target.with_name(f".{target.name}.promoting")
        shutil.copyfile(candidate, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)  # a server watching the file sees the whole new one or the old one, never half
    with open(target.parent / "promotions.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")
        log.flush()
        os.fsync(log.fileno())
    return record
