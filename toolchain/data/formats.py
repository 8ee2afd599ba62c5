"""Every input format becomes ``toolchain.data.rows.Prompt`` rows here, and nowhere else: stages never see formats.

Formats (``data.format``, or detected per file: by extension, then by the first record's keys):
    prompts   JSONL: ``prompt``, optional ``id``, ``task``, ``gold``, ``system``, ``reference``
    chat      OpenAI chat JSONL: ``messages`` of ``system`` / ``user`` / ``assistant`` turns, content a string or a
              list of text parts. A first system message is the example's own; the last user turn is the prompt
              and the turns before it its history; a final assistant turn is the reference answer
    sharegpt  ``conversations`` of ``from`` (system / human / gpt) and ``value``: read as chat
    alpaca    ``instruction``, optional ``input`` (appended after a blank line), ``output`` (the reference)
    table     CSV, TSV, Parquet, JSONL records or a Hugging Face dataset: ``data.columns`` says which column is
              the text, gold, task, id, system message and reference; ``data.template`` builds the prompt from
              any columns by name

A source is a local file, a saved Hugging Face dataset directory (``datasets.save_to_disk``) or
``hf:<dataset id>[@revision]`` (read through ``datasets``, for users with network); ``#split`` after a dataset
picks its split. ``traffic:<store>#task=NAME[&before=T][&from=T][&until=T]`` reads one task's answered calls from a
gateway's traffic store (toolchain.data.tasks) as chat rows whose logged answer is the reference and the gold.
Every error names the file and line (row, for Parquet and datasets) and the field to fix.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import string
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from toolchain.data.rows import DataError, Prompt, check_utf8, iter_jsonl
from toolchain.data.tasks import task_records
from toolchain.models.references import file_sha256
from toolchain.recipe import DataConfig, Recipe

FORMATS = ("prompts", "chat", "sharegpt", "alpaca", "table")
TABLE_FILES = {".csv": ",", ".tsv": "\t", ".parquet": None}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant"}
TEXT_PARTS = ("text", "input_text", "output_text")


def split_source(source: str) -> tuple[str, str | None]:
    """'data/set#test' -> ('data/set', 'test')."""
    base, _, split = source.partition("#")
    return base, split or None


def source_path(base: str, resolve: Callable[[str], Path] = Path) -> Path | None:
    """The local file or folder a source's base names (``resolve`` places a relative one): none for an ``hf:``
    dataset, the store's file for ``traffic:<store>``."""
    if base.startswith("hf:"):
        return None
    return resolve(base[len("traffic:"):] if base.startswith("traffic:") else base)


def _dataset_split(ds, source: str, split: str | None, default: str):
    from datasets import DatasetDict

    if not isinstance(ds, DatasetDict):
        if split:
            raise DataError(f"{source}: a single dataset has no split '{split}' (drop '#{split}')")
        return ds, None
    names = list(ds)
    pick = split or (default if default in names else names[0] if len(names) == 1 else None)
    if pick not in names:
        raise DataError(f"{source}: {'no split ' + repr(split) if split else 'several splits'}; name one as "
                        f"{source.partition('#')[0]}#<split> ({', '.join(names)})")
    return ds[pick], pick


def records(source: str, path: Path | None, default_split: str) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of a source; ``path`` is the local file or folder (None for hf:)."""
    base, split = split_source(source)
    if base.startswith("traffic:"):  # one task's calls in a gateway's traffic store, as chat rows
        if path is None or not path.is_file():
            raise DataError(f"{base}: traffic store not found")
        yield from task_records(source, path, split)
        return
    if base.startswith("hf:"):
        from datasets import load_dataset

        name, _, revision = base[3:].partition("@")
        try:
            loaded = load_dataset(name, revision=revision or None)
        except (ConnectionError, FileNotFoundError, ValueError, OSError) as err:  # DatasetNotFoundError is one
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DataError(f"{base}: could not load the dataset ({first})") from None
        ds, pick = _dataset_split(loaded, base, split, default_split)
        yield from _rows(ds, f"{base}[{pick}]" if pick else base)
        return
    if path is None or not path.exists():
        raise DataError(f"{base}: data file not found")
    if path.is_dir():
        from datasets import load_from_disk

        try:
            loaded = load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(f"{path}: not a saved Hugging Face dataset (datasets.save_to_disk)") from None
        ds, pick = _dataset_split(loaded, str(path), split, default_split)
        yield from _rows(ds, f"{path}[{pick}]" if pick else str(path))
        return
    if split:
        raise DataError(f"{path}: '#{split}' names a split, which only datasets have")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}:row {i}", rec
    elif suffix in TABLE_FILES:
        check_utf8(path)
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=TABLE_FILES[suffix])
            for rec in reader:
                if None in rec:
                    raise DataError(f"{path}:{reader.line_num}: more cells than the header has columns")
                yield f"{path}:{reader.line_num}", rec
    elif suffix == ".json":
        check_utf8(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
            raise DataError(f"{path}: a .json data file must be a list of objects (or use JSONL, one a line)")
        for i, rec in enumerate(data, 1):
            yield f"{path}:item {i}", rec
    else:
        for lineno, rec in iter_jsonl(path):
            yield f"{path}:{lineno}", rec


def source_digest(source: str, path: Path | None, default_split: str) -> str:
    """A data source's content for stage keys: a plain file by its bytes (sha256, as always); a saved dataset
    folder, an ``hf:`` dataset or a ``#split`` by the records read from it (each record's canonical JSON, in
    order), so the same rows give the same key wherever they come from and a changed row changes it."""
    base, split = split_source(source)
    if path is not None and split is None and path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for _, rec in records(source, path, default_split):
        digest.update(json.dumps(rec, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


def _rows(ds, name: str) -> Iterator[tuple[str, dict]]:
    for i, rec in enumerate(ds, 1):
        yield f"{name}:row {i}", rec


def detect(record: dict, path: Path | None) -> str:
    """The format of a file from its extension and its first record."""
    if path is not None and path.suffix.lower() in TABLE_FILES:
        return "table"
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record and isinstance(record["prompt"], str):
        return "prompts"
    return "table"


def _cell(value) -> str | None:
    """A table cell as text; empty and missing cells are None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    text = str(value)
    return text if text.strip() else None


def _content(value, where: str, n: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") in TEXT_PARTS and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(f"{where}: message {n} has a content part of type {kind!r}; only text parts are read")
        return "\n".join(parts)
    raise DataError(f"{where}: message {n} has no content (a string or a list of text parts)")


def _turns(
    messages, where: str, role_key: str, content_key: str, roles: dict[str, str] | None
) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of messages")
    out = []
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {n} is not an object")
        role = m.get(role_key)
        role = roles.get(role, role) if roles else role
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: message {n} has {role_key} {m.get(role_key)!r}; only system, user and "
                            "assistant turns are read")
        if content_key not in m or m[content_key] is None:
            raise DataError(f"{where}: message {n} ({role}) has no {content_key}")
        out.append((role, _content(m[content_key], where, n)))
    return out


def _conversation(turns: list[tuple[str, str]], where: str) -> tuple[str | None, tuple, str, str | None]:
    """(system, history, prompt, reference) of a conversation: roles must run system?, user, assistant, user, ..."""
    system = None
    if turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    offset = 2 if system is not None else 1
    for i, (role, _) in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            after = turns[i - 1][0] if i else ("system" if system is not None else "the start")
            raise DataError(f"{where}: message {i + offset} is '{role}' after '{after}'; turns must alternate "
                            "user, assistant, ... (a system message only first)")
    reference = None
    if turns and turns[-1][0] == "assistant":
        reference, turns = turns[-1][1], turns[:-1]
    if not turns:
        raise DataError(f"{where}: the conversation has no user message")
    prompt = turns[-1][1]
    if not prompt.strip():
        raise DataError(f"{where}: the last user message is empty")
    return system, tuple(turns[:-1]), prompt, reference


class _Table:
    """Reads rows of a table through data.columns and data.template, checking both on the first record."""

    FIELDS = ("text", "gold", "task", "id", "system", "reference")

    def __init__(self, data, first: dict, where: str):
        self.columns = {f: getattr(data.columns, f) for f in self.FIELDS}
        have = list(first)
        for field, col in self.columns.items():
            if col is not None and col not in first:
                raise DataError(f"{where}: data.columns.{field} names column '{col}', which the data does not have "
                                f"(columns: {', '.join(have)})")
        if self.columns["text"] is None:
            self.columns["text"] = next((c for c in ("text", "prompt") if c in first), None)
        for field in self.FIELDS[1:]:
            if self.columns[field] is None and field in first:
                self.columns[field] = field
        self.template = data.template
        if self.template is not None:
            for _, slot, _, _ in string.Formatter().parse(self.template):
                if slot is not None and slot != "text" and slot not in first:
                    raise DataError(f"{where}: data.template slot {{{slot}}} is not a column "
                                    f"(columns: {', '.join(have)})")
                if slot == "text" and self.columns["text"] is None and "text" not in first:
                    raise DataError(f"{where}: data.template uses {{text}} but no column is the text: set "
                                    f"data.columns.text (columns: {', '.join(have)})")
        elif self.columns["text"] is None:
            raise DataError(f"{where}: no prompt column: set data.columns.text or data.template "
                            f"(columns: {', '.join(have)})")

    def get(self, rec: dict, field: str) -> str | None:
        col = self.columns[field]
        return None if col is None else _cell(rec.get(col))

    def prompt(self, rec: dict) -> str:
        if self.template is None:
            return self.get(rec, "text") or ""
        values = {k: _cell(v) or "" for k, v in rec.items()}
        values["text"] = self.get(rec, "text") or ""
        return self.template.format_map(values)


def _mapped(data) -> bool:
    return data.template is not None or any(v is not None for v in data.columns.model_dump().values())


def _example(fmt: str, rec: dict, where: str, table: _Table | None) -> dict:
    """The fields of one record as Prompt keyword arguments (id and task may be missing)."""
    if fmt == "table":
        ex = {"prompt": table.prompt(rec), "gold": table.get(rec, "gold"), "task": table.get(rec, "task"),
              "id": table.get(rec, "id"), "system": table.get(rec, "system"), "reference": table.get(rec, "reference")}
        if not ex["prompt"].strip():
            raise DataError(f"{where}: the prompt is empty")
        return ex
    if fmt == "prompts":
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string")
        ex = {"prompt": rec["prompt"], "system": rec.get("system"), "reference": _cell(rec.get("reference"))}
    elif fmt in ("chat", "sharegpt"):
        key = "messages" if fmt == "chat" else "conversations"
        if key not in rec:
            raise DataError(f"{where}: no '{key}' ({fmt} format)")
        turns = (_turns(rec[key], where, "role", "content", None) if fmt == "chat"
                 else _turns(rec[key], where, "from", "value", SHAREGPT_ROLES))
        system, history, prompt, reference = _conversation(turns, where)
        ex = {"prompt": prompt, "system": system if system is not None else rec.get("system"), "history": history,
              "reference": reference}
    else:  # alpaca
        instruction = rec.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(f"{where}: 'instruction' must be a non-empty string (alpaca format)")
        extra = _cell(rec.get("input"))
        ex = {"prompt": f"{instruction}\n\n{extra}" if extra else instruction, "system": rec.get("system"),
              "reference": _cell(rec.get("output"))}
    return {**ex, "gold": _cell(rec.get("gold")), "task": _cell(rec.get("task")), "id": _cell(rec.get("id"))}


def read_prompts(sources: list, split: str, data=None, resolve: Callable[[str], Path] = Path,
                 limit: int | None = None) -> list[Prompt]:
    """Every example of the sources (``data``: the recipe's data section, for format, columns, template and
    the default task) as prompts of ``split``."""
    if data is None:
        data = DataConfig(train=["-"])
    out: list[Prompt] = []
    seen: dict[str, str] = {}
    for source in sources:
        source = str(source)
        base, named = split_source(source)
        path = source_path(base, resolve)
        stem = path.stem if path is not None else base.rsplit("/", 1)[-1]
        default = "train" if split == "train" else "test"
        if path is None or path.is_dir():  # a dataset: its splits number their rows alike, so the split names them
            stem = f"{stem}-{named or default}"
        fmt, table, n = None, None, 0
        for where, rec in records(source, path, default):
            if fmt is None:
                fmt = data.format if data.format != "auto" else "table" if _mapped(data) else detect(rec, path)
                table = _Table(data, rec, where) if fmt == "table" else None
            n += 1
            ex = _example(fmt, rec, where, table)
            pid = ex.pop("id") or f"{stem}-{n}"
            if pid in seen:
                raise DataError(f"{where}: duplicate id '{pid}' (first seen at {seen[pid]})")
            seen[pid] = where
            system = ex.pop("system")
            if system is not None and not isinstance(system, str):
                raise DataError(f"{where}: 'system' must be a string")
            gold, reference = ex.pop("gold"), ex.pop("reference")
            if gold is None and data.reference_is_gold and isinstance(reference, str) and reference.strip():
                gold = reference.strip()
            out.append(Prompt(pid, ex.pop("prompt"), ex.pop("task") or data.task, gold, split, where,
                              system=system, history=ex.pop("history", ()), reference=reference))
            if limit and len(out) >= limit:
                return out
        if n == 0:
            raise DataError(f"{source}: no examples in it")
    return out


def hold_out(rows: list[Prompt], fraction: float, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out): ``fraction`` of each task's rows, chosen by a seeded shuffle; file order is kept. The
    choice depends on the seed and the rows' places, not on task names: renaming a task holds out the same rows."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(rows):
        by_task[p.task].append(i)
    held: set[int] = set()
    for idx in by_task.values():
        pick = list(idx)
        random.Random(seed).shuffle(pick)
        held.update(pick[: round(len(pick) * fraction)])
    if not held:
        raise DataError(f"data.heldout_fraction: {fraction} of {len(rows)} rows leaves no held-out row "
                        "(raise it, or give data.heldout files)")
    if len(held) == len(rows):
        raise DataError(f"data.heldout_fraction: {fraction} of {len(rows)} rows leaves no training row")
    train = [p for i, p in enumerate(rows) if i not in held]
    return train, [replace(p, split="heldout") for i, p in enumerate(rows) if i in held]


def load_prompts(cfg: Recipe, limits: bool = True) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out) prompts of a recipe; with limits=False every row of every source is read (and so
    checked)."""
    d = cfg.data
    train = read_prompts(d.train, "train", d, cfg.data_path)
    heldout = read_prompts(d.heldout, "heldout", d, cfg.data_path)
    if d.heldout_fraction is not None:
        train, heldout = hold_out(train, d.heldout_fraction, d.seed)
    ids = {p.id for p in train}
    clash = next((p.id for p in heldout if p.id in ids), None)
    if clash:
        raise DataError(f"prompt id '{clash}' is in both the train and held-out files")
    if limits:
        train, heldout = train[: d.limit], heldout[: d.heldout_limit]
    return train, heldout
