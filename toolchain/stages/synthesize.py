"""synthesize: the teacher writes new training prompts like the seeds the data has (off unless the recipe has a
``synthesize:`` section).

Inputs: the recipe's training prompts (the seeds, after data.limit) and held-out prompts (for decontamination).
Outputs:
    candidates.jsonl  every prompt the teacher wrote, in order, with its job, seed, round, and why it was dropped
                      (appended as it is written: a killed run resumes after the last whole line)
    prompts.jsonl     the kept ones as an ordinary prompt file (id, prompt, task, gold, and the provenance
                      seed_id, method, round) that generate reads after the seeds

Filters, each counted in the manifest: empty, too short or too long (words), not matching the task's pattern,
an exact duplicate (after normalising case and spaces) of a seed or of a kept prompt, a near-duplicate (MinHash
LSH from datasketch over word 2-shingles: estimated Jaccard similarity at or above ``dedup_threshold``), and
contaminated: sharing at least ``decontaminate_threshold`` of its word n-grams with one held-out prompt.
With ``gold: teacher`` a task whose seeds have gold answers and whose metric compares a short answer gets its new
prompts labelled by the teacher ``samples`` times; prompts whose labels disagree are dropped (self-consistency) and
the agreement rate reported. Every teacher call has its own sampling seed from (synthesize.seed, job), so a resumed
run asks the same things; an openai: teacher gets generate.concurrency requests at once (with its retries and
pacing), and the files are the same at any concurrency.
"""

from __future__ import annotations

import random
import re
import zlib
from collections import Counter
from pathlib import Path

from toolchain.backends import asking
from toolchain.data.formats import load_prompts
from toolchain.data.rows import Prompt, read_jsonl_resumable, write_jsonl
from toolchain.data.similarity import Contamination, NearDuplicates, frames, normalise, words
from toolchain.models.chat import messages_for
from toolchain.pipeline.runs import Manifest
from toolchain.quality.metrics import normalise as norm_answer
from toolchain.recipe import Recipe
from toolchain.ui import console, progress

INSTRUCTIONS = {
    "self_instruct": "Here are inputs of one task:\n\n{examples}\n\nWrite one new input for the same task, on a "
                     "different subject than these, in the same style and format. Reply with the new input only.",
    "evolve": "Rewrite this input so that it is harder or more varied, staying the same kind of task in the same "
              "format:\n\n{seed}\n\nReply with the rewritten input only.",
    "paraphrase": "Paraphrase this input with different words, keeping its meaning and its format:\n\n{seed}\n\n"
                  "Reply with the paraphrase only.",
    "fill": "Here are examples of one kind of text:\n\n{examples}\n\nWrite one new text of the same kind, on a "
            "different subject than these, in the same style and length. Reply with the new text only.",
}
_LEAD = re.compile(r"^\s*(?:\*\*)?(?:new |rewritten |paraphrased )?(?:input|prompt|paraphrase|question|text|example)"
                   r"\s*:\s*(?:\*\*)?", re.IGNORECASE)


def _content(row: dict) -> str:
    """What duplicates are judged on: the text fill wrote, or the whole prompt."""
    return row.get("content", row["prompt"])


_ANSWER = re.compile(r"^\s*(?:\*\*)?(?:output|answer|response|label|solution)\s*:", re.IGNORECASE | re.MULTILINE)


def clean_reply(text: str, pattern: str | None = None) -> str:
    """The new prompt in a reply: a leading "New input:" label, leading lines that end in a colon ("Here is a new
    one:"), an answer the teacher appended on a line of its own ("Answer: ...") and wrapping quotes removed; with
    the task's ``pattern``, a preamble before the first line or sentence from which it matches is cut too."""
    out = _LEAD.sub("", text.strip()).strip()
    lines = out.splitlines()
    while len(lines) > 1 and (lines[0].rstrip().endswith(":") or not lines[0].strip()):  # "Here is a new one:"
        lines = lines[1:]
    out = _LEAD.sub("", "\n".join(lines).strip()).strip()
    cut = _ANSWER.search(out)
    if cut and cut.start() > 0:
        out = out[:cut.start()].strip()
    if pattern and not re.search(pattern, out):
        starts = [m.end() for m in re.finditer(r"\n\s*|[.!?:]\s+", out)]  # each line and sentence start, in order
        start = next((k for k in starts if re.search(pattern, out[k:].strip())), None)
        if start is not None:
            out = _LEAD.sub("", out[start:].strip()).strip()
    if len(out) >= 2 and out[0] == out[-1] and out[0] in "\"'`":
        out = out[1:-1].strip()
    return out


def _seeds(cfg: Recipe, train: list[Prompt]) -> dict[str, list[Prompt]]:
    s = cfg.synthesize
    by_task: dict[str, list[Prompt]] = {}
    for p in train:
        if s.tasks is None or p.task in s.tasks:
            by_task.setdefault(p.task, []).append(p)
    return by_task


def quotas(cfg: Recipe, train: list[Prompt]) -> dict[str, int]:
    """New prompts wanted per task: the target shared among the tasks as their seeds are (seeds counted)."""
    by_task = _seeds(cfg, train)
    total = len(train)
    return {t: max(0, round(cfg.synthesize.target * len(ps) / total) - len(ps)) for t, ps in by_task.items()}


def _ask(s, seed: Prompt, others: list[Prompt], content=lambda p: p.prompt) -> str:
    template = s.instruction or INSTRUCTIONS[s.method]
    label = "Text" if s.method == "fill" else "Input"
    examples = "\n\n".join(f"{label}: {content(p)}" for p in [seed, *others])
    return template.replace("{examples}", examples).replace("{seed}", content(seed))


GOLD_METRICS = ("label", "exact", "contains", "number")  # metrics whose gold is a short answer the teacher can give


def _labels(engine, cfg: Recipe, prompt: Prompt, spec: dict, job: str) -> tuple[str | None, float]:
    """The teacher's label for a new prompt by self-consistency: (the label all samples agree on or None, the
    share of samples that gave the most common label)."""

    s = cfg.synthesize
    answers = []
    for k in range(s.samples):
        c = engine.chat(messages_for(prompt.prompt, cfg.generate.system_prompt), max_tokens=cfg.generate.max_new_tokens,
                        temperature=s.gold_temperature, top_p=s.top_p, seed=_job_seed(s.seed, f"{job}/gold{k}"))
        text = (c.text or "").strip()
        if spec.get("labels"):
            low = norm_answer(text)
            text = next((label for label in spec["labels"] if norm_answer(label) in low), text)
        answers.append(norm_answer(text))
    top, n = Counter(answers).most_common(1)[0]
    return (top if n == s.samples and top else None), n / s.samples


def _job_seed(seed: int, job: str) -> int:
    return zlib.crc32(f"{seed}:{job}".encode()) & 0x7FFFFFFF


def run(cfg: Recipe, inputs: dict[str, Path], out_dir: Path) -> Manifest:
    s = cfg.synthesize
    train, _ = load_prompts(cfg)
    _, heldout = load_prompts(cfg, limits=False)
    by_task = _seeds(cfg, train)
    if not by_task:
        raise ValueError(f"synthesize.tasks: no training prompt of {', '.join(s.tasks or [])}")
    want = quotas(cfg, train)
    specs = cfg.task_specs([{"task": p.task, "gold": p.gold} for p in train + heldout])
    gold_tasks = {t for t, ps in by_task.items() if s.gold == "teacher" and any(p.gold is not None for p in ps)
                  and specs[t].get("metric", "exact") in GOLD_METRICS}

    # fill: each seed's fixed wording (shared with other seeds of its task) and the content the teacher rewrites;
    # duplicates are judged on that content (the wording alone would make every prompt of a task alike).
    frame = {p.id: ("", "") for p in train}
    if s.method == "fill":
        for seeds in by_task.values():
            frame.update(zip((p.id for p in seeds), frames([p.prompt for p in seeds])))

    def content(p: Prompt) -> str:
        head, tail = frame.get(p.id, ("", ""))
        return p.prompt[len(head):len(p.prompt) - len(tail)]

    exact = {normalise(content(p)) for p in train}
    near = NearDuplicates(s.dedup_threshold)
    for p in train:
        near.add(f"seed:{p.id}", content(p))
    dirty = Contamination([p.prompt for p in heldout], s.decontaminate_ngram, s.decontaminate_boilerplate)
    log = asking.AnswerLog(out_dir / "candidates.jsonl", key=lambda r: r["job"])
    done, asked = log.rows, log.done
    kept = {t: 0 for t in by_task}

    def keep(row: dict) -> None:
        kept[row["task"]] += 1
        exact.add(normalise(_content(row)))
        near.add(row["id"], _content(row))

    for r in done:  # the state a killed run had: dedup and counts rebuilt from its decisions
        if r["kept"]:
            keep(r)
    if done:
        console.print(f"  resuming: {len(done)} prompts written before, {sum(kept.values())} kept")

    pool = asking.Pool(cfg, seed=s.seed)
    engine = pool.engine
    counts = Counter(r["reason"] for r in done)
    agreement: list[float] = [r["agreement"] for r in done if r.get("agreement") is not None]
    total_want = sum(want.values())

    def jobs():
        for rnd in range(s.max_rounds):
            for task, seeds in by_task.items():
                for seed in seeds:
                    for j in range(s.per_seed):
                        if f"{rnd}:{seed.id}:{j}" not in asked:
                            yield rnd, task, seed, j

    def write(job) -> dict:
        rnd, task, seed, j = job
        key = f"{rnd}:{seed.id}:{j}"
        rng = random.Random(_job_seed(s.seed, key))
        framed = any(frame[seed.id])
        kin = [p for p in by_task[task] if p is not seed and (not framed or frame[p.id] == frame[seed.id])]
        others = rng.sample(kin, min(2, len(kin)))
        how = s if framed or s.method != "fill" else s.model_copy(update={"method": "self_instruct",
                                                                         "instruction": None})
        c = engine.chat(messages_for(_ask(how, seed, others, content), None), max_tokens=s.max_new_tokens,
                        temperature=s.temperature, top_p=s.top_p, seed=_job_seed(s.seed, key))
        row = {"job": key, "id": f"syn-{seed.id}-r{rnd}-{j}", "task": task, "seed_id": seed.id, "method": s.method,
               "round": rnd}
        if not framed:
            return {**row, "prompt": clean_reply(c.text or "", s.patterns.get(task))}
        text = clean_reply(c.text or "")
        if not any("\n" in content(p) for p in [seed, *others]):  # one-line contents: the reply's first line
            text = clean_reply(next((line for line in text.splitlines() if line.strip()), ""))
        head, tail = frame[seed.id]
        return {**row, "prompt": f"{head}{text}{tail}" if text else "", "content": text}

    def label(row: dict) -> tuple[str | None, float]:
        return _labels(engine, cfg, Prompt(id=row["id"], prompt=row["prompt"], task=row["task"]),
                       specs[row["task"]], row["job"])

    def full(task: str) -> bool:
        return kept[task] >= want[task]

    # Jobs go out `workers` at a time (an openai: teacher's concurrency; one for local engines) and are decided in
    # job order against what was kept before them, as one at a time would: a job whose task filled up meanwhile is
    # dropped unwritten, as if never asked, and labels asked ahead for a prompt that then fails a filter are unused.
    # So the files do not depend on the concurrency, and a resumed run continues the same sequence.
    try:
        with progress() as bar, log:
            task_bar = bar.add_task("synthesize", total=total_want, completed=min(total_want, sum(kept.values())),
                                    info="")
            for window in asking.windows(jobs(), pool.workers, wanted=lambda job: not full(job[1])):
                rows = pool.map(write, window)
                ahead = [r for r in rows if r["task"] in gold_tasks and _filter(s, r, exact, near, dirty) is None]
                labels = dict(zip((r["job"] for r in ahead), pool.map(label, ahead)))
                for row in rows:
                    task = row["task"]
                    if full(task):
                        continue
                    reason = _filter(s, row, exact, near, dirty)
                    if reason is None and task in gold_tasks:
                        gold, share = labels[row["job"]] if row["job"] in labels else label(row)
                        row.update(gold=gold, agreement=share)
                        agreement.append(share)
                        reason = None if gold is not None else "labels disagree"
                    row.update(kept=reason is None, reason=reason or "kept")
                    log.write(row)
                    counts[row["reason"]] += 1
                    if reason is None:
                        keep(row)
                        bar.update(task_bar, advance=1)
                    dropped = sum(v for k, v in counts.items() if k != "kept")
                    bar.update(task_bar, info=f"kept {sum(kept.values())} · dropped {dropped}")
                if all(full(t) for t in want):
                    break
    finally:
        pool.close()

    rows = read_jsonl_resumable(log.path)
    out = [{"id": r["id"], "prompt": r["prompt"], "task": r["task"], **({"gold": r["gold"]} if r.get("gold") else {}),
            "seed_id": r["seed_id"], "method": r["method"], "round": r["round"]} for r in rows if r["kept"]]
    write_jsonl(out_dir / "prompts.jsonl", out)
    written = len(rows)
    reasons = Counter(r["reason"] for r in rows)
    metrics = {"seeds": len(train), "written": written, "kept": len(out),
               "target": s.target, "reached": all(full(t) for t in want),
               **{f"dropped_{k.replace(' ', '_')}": v for k, v in sorted(reasons.items()) if k != "kept"},
               "duplicate_rate": round((reasons["exact duplicate"] + reasons["near duplicate"]) / max(written, 1), 4),
               "contamination_rate": round(reasons["contaminated"] / max(written, 1), 4)}
    if agreement:
        metrics["label_agreement"] = round(sum(agreement) / len(agreement), 4)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(reasons.items()) if k != "kept") or "none"
    console.print(f"  kept {len(out)} new prompts of {written} written (target {s.target} with the {len(train)} "
                  f"seeds); dropped: {summary}")
    if not metrics["reached"]:
        console.print(f"  [yellow]the target was not reached in {s.max_rounds} rounds; raise synthesize.max_rounds "
                      "or lower synthesize.dedup_threshold[/]")
    return Manifest(metrics=metrics, seeds={"synthesize": s.seed})


def _filter(s, row: dict, exact: set[str], near: NearDuplicates, dirty: Contamination) -> str | None:
    """Why a new prompt is dropped, or None to keep it (duplicates judged on its content: what fill wrote)."""
    text, key = row["prompt"], _content(row)
    n = len(words(text))
    if not text.strip() or not key.strip():
        return "empty"
    if n < s.min_words:
        return "too short"
    if n > s.max_words:
        return "too long"
    pattern = s.patterns.get(row["task"])
    if pattern and not re.search(pattern, text):
        return "wrong format"
    if s.reject and re.search(s.reject, key):
        return "rejected"
    if normalise(key) in exact:
        return "exact duplicate"
    if near.similar(key) is not None:
        return "near duplicate"
    if dirty.overlap(text) >= s.decontaminate_threshold:
        return "contaminated"
    return None


def preview(out_dir: Path, n: int) -> tuple[list[dict], list[dict]]:
    """The first ``n`` kept and ``n`` dropped prompts of a finished (or interrupted) synthesize stage."""
    rows = read_jsonl_resumable(out_dir / "candidates.jsonl")
    return [r for r in rows if r["kept"]][:n], [r for r in rows if not r["kept"]][:n]
