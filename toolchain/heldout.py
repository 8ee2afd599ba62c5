"""Held-out scoring: the student's greedy answers to the held-out prompts, next to the teacher's.

Gold accuracy per task (toolchain.scoring) and exact agreement with the teacher's own held-out answers.
Answers are generated in left-padded batches with transformers (greedy, so batching does not change them).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from toolchain.chat import messages_for
from toolchain.data import iter_jsonl
from toolchain.scoring import exact_agreement, score
from toolchain.ui import progress


@torch.inference_mode()
def generate_batched(model, tok, prompts: list[str], system_prompt: str | None, max_new_tokens: int,
                     batch_size: int = 16) -> list[str]:
    tok.padding_side = "left"
    texts = [tok.apply_chat_template(messages_for(p, system_prompt), add_generation_prompt=True, tokenize=False)
             for p in prompts]
    out: list[str] = []
    with progress(transient=True) as bar:
        task = bar.add_task("answer held-out", total=len(texts), info="")
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                out.append(tok.decode(row, skip_special_tokens=True).strip())
            bar.update(task, advance=len(texts[i:i + batch_size]))
    return out


def score_rows(rows: list[dict], answers: list[str]) -> dict:
    """Per task: gold accuracy (where gold exists) of the teacher and the student, and agreement."""
    per = defaultdict(lambda: {"n": 0, "gold_n": 0, "teacher_gold": 0, "student_gold": 0, "agree": 0})
    for r, a in zip(rows, answers):
        t = per[r["task"]]
        t["n"] += 1
        t["agree"] += exact_agreement(a, r["response"])
        s_ok, t_ok = score(r["task"], a, r["gold"]), score(r["task"], r["response"], r["gold"])
        if s_ok is not None:
            t["gold_n"] += 1
            t["student_gold"] += s_ok
            t["teacher_gold"] += t_ok
    total = {k: sum(v[k] for v in per.values()) for k in ("n", "gold_n", "teacher_gold", "student_gold", "agree")}
    return {"tasks": dict(per), "total": total}


def evaluate(model, tok, heldout_jsonl: Path, system_prompt: str | None, max_new_tokens: int,
             limit: int | None = None) -> tuple[dict, list[str], list[dict]]:
    rows = [r for _, r in iter_jsonl(heldout_jsonl)][:limit]
    answers = generate_batched(model, tok, [r["prompt"] for r in rows], system_prompt, max_new_tokens)
    return score_rows(rows, answers), answers, rows
