"""generate: the teacher answers the recipe's prompts.

Inputs: the recipe's prompt files (train + held-out) and the teacher model.
Outputs:
    responses.jsonl  every teacher answer, append-only: id, split, sample, task, prompt, gold, response,
                     finish_reason, prompt_tokens, completion_tokens
    train.jsonl      the training pairs kept: non-empty answers that stopped on their own
    heldout.jsonl    the teacher's answers to the held-out prompts (the reference the student is compared to)

Resume: answers already in responses.jsonl (from a killed run) are kept and their prompts are not asked
again; a partial last line is cut off. Sampling seeds depend on (seed, prompt id, sample index), not on
order, so a resumed run gives the same data as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from toolchain.backends import open_engine
from toolchain.data import JsonlAppender, read_jsonl_resumable, read_prompts, write_jsonl
from toolchain.models import resolve
from toolchain.runs import Manifest
from toolchain.ui import console, progress


def messages_for(prompt: str, system_prompt: str | None) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": prompt}]


def _sample_seed(seed: int, pid: str, sample: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{pid}:{sample}".encode()).digest()[:4], "little")


def load_all_prompts(cfg):
    train = read_prompts([cfg.data_path(p) for p in cfg.data.train], "train", cfg.data.limit)
    heldout = read_prompts([cfg.data_path(p) for p in cfg.data.heldout], "heldout", cfg.data.heldout_limit)
    ids = {p.id for p in train}
    clash = next((p.id for p in heldout if p.id in ids), None)
    if clash:
        from toolchain.data import DataError

        raise DataError(f"prompt id '{clash}' is in both the train and held-out files")
    return train, heldout


def run(cfg, inputs: dict[str, Path], out_dir: Path) -> Manifest:
    g = cfg.generate
    train, heldout = load_all_prompts(cfg)
    jobs = [(p, s) for p in train for s in range(g.n)] + [(p, 0) for p in heldout]

    out_path = out_dir / "responses.jsonl"
    done = {(r["id"], r["sample"]) for r in read_jsonl_resumable(out_path)}
    todo = [(p, s) for p, s in jobs if (p.id, s) not in done]
    if done:
        console.print(f"  resuming: {len(done)} answers kept from the interrupted run, {len(todo)} to go")

    if todo:
        engine = open_engine(resolve(cfg.teacher), g.backend, n_ctx=g.n_ctx, threads=g.threads, seed=g.seed)
        started, new_tokens = time.time(), 0
        with JsonlAppender(out_path) as sink, progress() as bar:
            task = bar.add_task("generate", total=len(jobs), completed=len(done), info="")
            for p, s in todo:
                c = engine.chat(
                    messages_for(p.prompt, g.system_prompt),
                    max_tokens=g.max_new_tokens,
                    temperature=g.temperature,
                    top_p=g.top_p,
                    seed=_sample_seed(g.seed, p.id, s),
                )
                sink.write({
                    "id": p.id, "split": p.split, "sample": s, "task": p.task, "prompt": p.prompt, "gold": p.gold,
                    "response": c.text.strip(), "finish_reason": c.finish_reason,
                    "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                })
                new_tokens += c.completion_tokens
                rate = new_tokens / max(time.time() - started, 1e-9)
                bar.update(task, advance=1, info=f"{rate:.0f} tok/s")
        engine.close()
        wall = time.time() - started
        console.print(f"  teacher: {new_tokens} tokens in {wall:.0f}s ({new_tokens / max(wall, 1e-9):.0f} tok/s)")

    rows = read_jsonl_resumable(out_path)
    order = {(p.id, s): i for i, (p, s) in enumerate(jobs)}
    rows.sort(key=lambda r: order[(r["id"], r["sample"])])  # same file order whatever the interruptions
    write_jsonl(out_path, rows)

    kept, empty, truncated = [], 0, 0
    for r in rows:
        if r["split"] != "train":
            continue
        if not r["response"]:
            empty += 1
        elif r["finish_reason"] != "stop":
            truncated += 1
        else:
            kept.append(r)
    write_jsonl(out_dir / "train.jsonl", kept)
    write_jsonl(out_dir / "heldout.jsonl", [r for r in rows if r["split"] == "heldout"])
    console.print(
        f"  kept {len(kept)} training pairs; dropped {empty} empty and {truncated} truncated "
        f"(max_new_tokens={g.max_new_tokens})"
    )
    tokens = sum(r["completion_tokens"] for r in rows)
    return Manifest(
        metrics={
            "prompts_train": len(train), "prompts_heldout": len(heldout), "answers": len(rows),
            "kept": len(kept), "dropped_empty": empty, "dropped_truncated": truncated,
            "completion_tokens": tokens,
        },
        seeds={"generate": g.seed},
    )
