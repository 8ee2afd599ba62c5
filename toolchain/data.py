"""Prompt files and append-only JSONL.

A prompt file is JSONL, one object a line: ``id`` (unique), ``prompt``, optional ``task`` and ``gold``.
Append-only outputs are written one whole line per ``write`` and fsynced, so a kill leaves at most one
partial last line, which ``read_jsonl_resumable`` cuts off before the stage continues.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator


class DataError(ValueError):
    """A data file problem; the message names the file and line."""


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    task: str = "default"
    gold: str | None = None
    split: str = "train"
    where: str = field(default="", compare=False)  # file:line it came from, for messages


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_prompts(paths: Iterable[Path], split: str, limit: int | None = None) -> list[Prompt]:
    out: list[Prompt] = []
    seen: dict[str, str] = {}
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: prompt file not found")
        for lineno, obj in iter_jsonl(path):
            where = f"{path}:{lineno}"
            if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise DataError(f"{where}: 'prompt' must be a non-empty string")
            pid = str(obj.get("id", f"{path.stem}-{lineno}"))
            if pid in seen:
                raise DataError(f"{where}: duplicate id '{pid}' (first seen at {seen[pid]})")
            seen[pid] = where
            gold = obj.get("gold")
            out.append(Prompt(pid, obj["prompt"], str(obj.get("task", "default")), None if gold is None else str(gold), split,
                              where))
            if limit and len(out) >= limit:
                return out
    return out


def read_jsonl_resumable(path: Path) -> list[dict]:
    """Rows of an append-only file, after cutting off a partial line left by a kill."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1
    rows = []
    for line in raw[:good_end].splitlines():
        if line.strip():
            rows.append(json.loads(line))
    if good_end != len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    return rows


class JsonlAppender:
    """Append whole lines durably: one write + flush + fsync per row."""

    def __init__(self, path: Path):
        self.fh = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
