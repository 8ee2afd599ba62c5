"""The row every stage sees, and append-only JSONL.

A ``Prompt`` is one example: what the user asks (``prompt``), its task, its gold answer, and where the data has
them, a system message of its own, the earlier turns of the conversation (``history``) and an answer already
written (``reference``). ``toolchain.data.formats`` is the only code that turns input files into prompts.
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
    system: str | None = None  # this example's own system message (replaces the recipe's)
    history: tuple[tuple[str, str], ...] = ()  # earlier (role, content) turns, oldest first
    reference: str | None = None  # an answer the data already has (the last assistant turn, an output column)

    def extras(self) -> dict:
        """The optional fields, as they are written into the stages' JSONL rows (only those that are set)."""
        out: dict = {}
        if self.system is not None:
            out["system"] = self.system
        if self.history:
            out["history"] = [{"role": r, "content": c} for r, c in self.history]
        if self.reference is not None:
            out["reference"] = self.reference
        return out


def utf8_line(path: Path, lineno: int, raw: bytes) -> str:
    """One line of a text file as text, or a DataError naming the file, line and byte that are not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                        "save the file as UTF-8") from None


def check_utf8(path: Path) -> None:
    """DataError at the first line of ``path`` that is not UTF-8."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            utf8_line(path, lineno, raw)


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = utf8_line(path, lineno, raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


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
    """Append whole lines durably: one write + flush + fsync per row (or per ``write_many``)."""

    def __init__(self, path: Path):
        self.fh = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.write_many([row])

    def write_many(self, rows: Iterable[dict]) -> None:
        """Several rows in one write, flush and fsync."""
        self.fh.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
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
