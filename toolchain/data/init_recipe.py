"""``distillery init``: a commented recipe from a data file — its format, columns, tasks, label sets and size.

What is inferred (and printed for the user to check):
    format     as ``toolchain.data.formats`` detects it
    columns    a table's text column (a column named like text/prompt/message/..., else the one with the
               longest values) and gold column (label/gold/answer/category/...)
    metric     per task, from its gold values: few distinct short values -> label (that label set); all numbers
               -> number; all JSON objects -> json; short answers -> exact; longer ones -> chrf
    held-out   20 % of the rows (seeded, stratified by task) when there are 20 or more
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from toolchain.data.formats import detect, read_prompts, records, source_path, split_source
from toolchain.data.rows import DataError
from toolchain.data.tasks import infer_metric, stored_tasks
from toolchain.models.references import DEFAULT_TEACHER
from toolchain.recipe import DataConfig

TEXT_NAMES = ("text", "prompt", "message", "content", "input", "question", "query", "sentence", "body", "review",
              "comment", "utterance", "document")
GOLD_NAMES = ("label", "gold", "answer", "category", "class", "target", "intent", "sentiment", "output", "expected")


def _pick(names: list[str], wanted: tuple[str, ...]) -> str | None:
    lower = {n.lower(): n for n in names}
    return next((lower[w] for w in wanted if w in lower), None)


def table_columns(sample: list[dict]) -> dict:
    """data.columns for a table, from the names and values of its first records."""
    names = list(sample[0])
    text = _pick(names, TEXT_NAMES)
    gold = _pick([n for n in names if n != text], GOLD_NAMES)
    if text is None:  # the column with the longest values
        lengths = {n: sum(len(str(r.get(n) or "")) for r in sample) for n in names if n != gold}
        text = max(lengths, key=lengths.get) if lengths else None
    cols = {"text": text, "gold": gold}
    for field in ("task", "id", "system", "reference"):
        found = _pick(names, (field,))
        if found is not None and found not in (text, gold):
            cols[field] = found
    return {k: v for k, v in cols.items() if v is not None}


def _yaml(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def inspect(source: str, name: str) -> dict:
    """What init infers from a data file: format, columns, rows, tasks with their golds, references (rows
    that name no task are task ``name``)."""

    path = source_path(split_source(source)[0])
    sample = []
    for _, rec in records(source, path, "train"):
        sample.append(rec)
        if len(sample) >= 200:
            break
    if not sample:
        raise DataError(f"{source}: no examples in it")
    fmt = detect(sample[0], path)
    columns = table_columns(sample) if fmt == "table" else {}
    if fmt == "table" and "text" not in columns:
        raise DataError(f"{source}: no column holds text (columns: {', '.join(sample[0])}); write the recipe's "
                        "data.columns by hand")
    rows = read_prompts([source], "train", DataConfig(train=[source], columns=columns, task=name))
    golds: dict[str, list[str]] = defaultdict(list)
    counts: Counter = Counter()
    references = sum(p.reference is not None for p in rows)
    # a log of a strong model's answers (every row answered, no gold): the answers are what the student should
    # match, so they are the training answers and the golds
    logged = references == len(rows) and not any(p.gold is not None for p in rows)
    for p in rows:
        counts[p.task] += 1
        if p.gold is not None or logged:
            golds[p.task].append(p.gold if p.gold is not None else p.reference.strip())
    return {"source": source, "format": fmt, "columns": columns, "rows": len(rows), "tasks": dict(counts),
            "golds": dict(golds), "references": references, "logged_answers": logged,
            "multi_turn": sum(bool(p.history) for p in rows), "own_system": sum(p.system is not None for p in rows)}


def inspect_traffic(store: Path, task: str | None) -> dict:
    """What init infers from one task of a gateway's traffic store: its calls as chat rows (the logged answers
    are the training answers and the golds), the newest fifth held out (traffic drifts, so the held-out calls are
    the latest), the window fixed at the newest call so later traffic does not change the recipe's data, and who
    wrote the answers (the upstream and the model the application asked for)."""
    tasks = stored_tasks(store)
    if task is None or task not in tasks:
        known = ", ".join(f"{t} ({len(m)} calls)" for t, m in tasks.items()) or "none"
        raise DataError(f"{store}: {'name a task with --task' if task is None else f'no task {task!r}'} "
                        f"(tasks: {known}; distillery traffic {store} shows what each is)")
    calls = sorted((c for c in tasks[task] if c.answer and c.answer.strip()), key=lambda c: c.started_at)
    if len(calls) < 2:
        raise DataError(f"{store}: task {task!r} has {len(calls)} answered call(s); a recipe needs two or more")
    held = max(1, round(0.2 * len(calls)))
    split_at, until = calls[-held].started_at, calls[-1].started_at
    base = f"traffic:{Path(store).resolve()}#task={task}"
    train, heldout = f"{base}&before={split_at!r}&until={until!r}", f"{base}&from={split_at!r}&until={until!r}"
    requested = Counter(c.requested or c.model for c in calls).most_common(1)[0][0]
    upstream = Counter(c.upstream for c in calls).most_common(1)[0][0]
    found = inspect(train, task)
    for t, golds in inspect(heldout, task)["golds"].items():  # a label seen only in the newest calls is a label too
        found["golds"].setdefault(t, []).extend(golds)
    found.update(source=str(store),
                 traffic={"train": train, "heldout": heldout, "held": held, "calls": len(calls),
                          "answers_from": f"openai:{upstream}#{requested}" if upstream else None})
    return found


SYNTHESIZE_BELOW = 500  # fewer training rows than this: init offers a synthesize: section


def recipe_text(found: dict, name: str, teacher: str | None) -> tuple[str, list[str]]:
    """(the recipe YAML with comments, what the user should check)."""
    check: list[str] = []
    n = found["rows"]
    lines = [f"# Made by `distillery init {found['source']}` from {n} rows ({found['format']} format). Check the",
             "# lines marked CHECK, then: distillery validate <this file> && distillery run <this file>",
             f"name: {name}",
             f"teacher: {teacher or DEFAULT_TEACHER}" + ("" if teacher else "   # the embedded default; any GGUF, "
                                                          "model folder, hf: or openai: reference"),
             "student:", "  from: teacher", "  keep_layers: 20          # of the teacher's layers, by block influence",
             "  # the cut by measurement: distillery sweep <this file> --shapes 20,20x768,14 (docs/student.md)",
             "  select: influence",
             ("  vocab: 4096              # the output layer keeps the teacher's first 4,096 tokens + every token "
              "the task uses: faster decode" if teacher is None else
              "  # vocab: 4096            # a BPE teacher: trim the output layer to the task's tokens (faster decode)"),
             "data:"]
    traffic = found.get("traffic")
    lines.append(f"  train: [{_yaml(traffic['train'] if traffic else found['source'])}]")
    tasks = {t: infer_metric(g) for t, g in sorted(found["golds"].items()) if g}
    labels_only = bool(tasks) and all(s["metric"] == "label" for s in tasks.values())
    if found["columns"]:
        cols = found["columns"]
        lines.append(f"  columns: {_yaml(cols)}   # CHECK: which column is which")
        check.append(f"columns: text is '{cols['text']}'" + (
            f", gold is '{cols['gold']}'" if "gold" in cols else ", no gold column found"))
        if "task" not in cols:
            lines.append(f"  task: {_yaml(name)}")
        if len(tasks) == 1 and labels_only:  # the teacher must know what it may answer
            labels = next(iter(tasks.values()))["labels"]
            options = ", ".join(labels[:-1]) + " or " + labels[-1]
            template = f"Classify this text as {options}. Answer with one word.\n\nText: {{text}}"
            lines.append(f"  template: {_yaml(template)}   # CHECK: the prompt around the text (any {{column}})")
            check.append(f"template: the teacher is asked {_yaml(template)}")
        else:
            lines.append(
                '  # template: "Classify this message.\\n\\n{text}"   # the prompt around the text, any {column}'
            )
    elif set(found["tasks"]) == {name}:  # rows that name no task are this recipe's one task
        lines.append(f"  task: {_yaml(name)}")
    if traffic:
        lines.append(f"  heldout: [{_yaml(traffic['heldout'])}]   # the newest {traffic['held']} calls: traffic drifts")
        origin = traffic["answers_from"] or "unknown"
        lines.append(f"  answers_from: {_yaml(origin)}   # CHECK: who wrote the logged answers (their terms apply)")
        check.append(f"answers_from: the logged answers were written by {origin}; its terms decide whether a "
                     "student may learn from them")
        if traffic["held"] < 100:
            check.append(f"only {traffic['held']} held-out calls: a retention figure this small has a wide "
                         "interval; more traffic gives a verdict you can trust")
    elif n >= 20:
        lines.append("  heldout_fraction: 0.2      # held out, seeded and stratified by task; never trained on")
        held = round(n * 0.2)
        if held < 100:
            check.append(f"only {held} held-out rows: a retention figure this small has a wide interval; more data "
                         "gives a verdict you can trust")
    else:
        check.append(f"only {n} rows: too few to hold any out; add data.heldout with examples never trained on")
    if found.get("logged_answers") and not traffic:
        lines.append("  reference_is_gold: true    # the logged answers are what the student is scored against")
        lines.append("  # answers_from: openai:gpt-4o   # CHECK (required): who wrote the logged answers; their "
                     "terms decide whether a student may learn from them (human: your own)")
        check.append("answers_from: say who wrote the logged answers (validate asks until you do): openai:<model>, "
                     "anthropic:<model>, open-weight:<model id> or human")
    lines.append(f"  # limit: {min(64, n)}               # a quick first run on the first rows")
    train = n if traffic else n - (round(n * 0.2) if n >= 20 else 0)
    if train < SYNTHESIZE_BELOW:
        lines += [f"# synthesize:               # only {train} training rows: the teacher can write more like them",
                  "#   method: fill            # it writes what varies between rows (the text); their wording is kept",
                  f"#   target: {max(SYNTHESIZE_BELOW, 5 * train)}             # training prompts in all, yours "
                  "included (docs/data.md#more-prompts-than-you-have-synthesize)"]
        check.append(f"only {train} training rows: the commented synthesize: section has the teacher write more "
                     "(distillery synthesize <this file> --preview 10 shows what it writes)")
    answer_tokens = 32 if labels_only else 256
    lines += [
        "generate:",
        f"  max_new_tokens: {answer_tokens}" + ("       # a label is a word or two" if labels_only else ""),
    ]
    if traffic or found.get("logged_answers"):
        lines.append("  answers: reference          # the logged answers train the student; the teacher is not asked")
    elif found["references"]:
        lines.append(f"  # answers: reference        # {found['references']} rows already have an answer: distil "
                     "from them, not the teacher")
        lines.append("  #                           (then set data.answers_from: who wrote them, e.g. openai:gpt-4o)")
        check.append(f"{found['references']} rows carry an answer already: generate.answers: reference uses them "
                     "(say who wrote them in data.answers_from)")
    lines += ["distill:", "  flavour: hard", "  method: full", "  epochs: 2", "  batch_size: 8", "  seq_len: 512",
              "  # validation: 0.1          # a tenth of the training prompts kept out and scored after every epoch; "
              "the best epoch ships (then more epochs cost only time)"]
    if tasks:
        lines.append("tasks:   # what a right answer is, per task (docs/evaluation.md)   CHECK: the metric")
        for task, spec in tasks.items():
            lines.append(f"  {_yaml(task)}: {_yaml(spec)}")
            golds = found["golds"][task]
            check.append(f"task '{task}': metric {spec['metric']}" + (
                f" over {len(spec['labels'])} labels ({', '.join(spec['labels'][:6])}"
                + (", ..." if len(spec["labels"]) > 6 else "") + ")" if spec["metric"] == "label" else "")
                + f", from {len(golds)} gold answers")
    else:
        check.append("no gold answers: eval compares the student with the teacher's answers only (agreement, "
                     "chrF, perplexity); add a gold column for accuracy")
    lines += ["eval:", f"  max_new_tokens: {answer_tokens}", "  min_retention: 0.8"]
    return "\n".join(lines) + "\n", check


def recipe_name(source: str) -> str:
    stem = Path(split_source(source)[0].removeprefix("hf:")).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "task"
