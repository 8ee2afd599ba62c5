"""The traffic store: every call an application made through ``distillery gateway`` (request, answer, usage,
latency, status, tags), in one SQLite file in WAL mode, and read back as rows like any data file.

Schema (version 2; ``meta.schema_version``; docs/traffic.md):

    calls(id, call_id, started_at, latency_ms, endpoint, status, stream, model, upstream, upstream_model, task_tag,
          user_tag, request, response, prompt_tokens, cached_tokens, completion_tokens, error,
          answered_by, student, shadow)

A cascading server (``distillery serve`` with ``serve.route: cascade`` or ``serve.shadow``) records the calls the
upstream answered: ``response`` is the upstream's answer, ``student`` the student's own answer to the same call
with its confidence (JSON), ``answered_by`` who answered the client (student / upstream) and ``shadow`` 1 when the
call was drawn for shadowing (a uniform sample of the traffic: the pairs ``distillery traffic --agreement`` reads).
A version-1 store (the gateway's first) gains the three columns the first time it is opened for writing.

``request`` is the client's JSON body as sent (after redaction); ``response`` the answer as an OpenAI
``chat.completion`` / ``text_completion`` object (a streamed answer is assembled into one), so both kinds of call
read the same. No header is stored: an API key never reaches the file.

Writes go through :class:`Recorder`, a thread that commits in groups: the caller hands a call over and never
waits longer than it chooses; a full queue, a locked file or a full disk drops the call, counts it and logs one line,
and the gateway's answer is not affected. SQLite's WAL with ``synchronous=NORMAL`` keeps every committed call
through a killed process (not through a power cut; docs/traffic.md).
"""

from __future__ import annotations

import json
import queue
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from toolchain.data.rows import DataError

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY,
    call_id TEXT NOT NULL,
    started_at REAL NOT NULL,
    latency_ms REAL NOT NULL,
    endpoint TEXT NOT NULL,
    status INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    model TEXT,
    upstream TEXT,
    upstream_model TEXT,
    task_tag TEXT,
    user_tag TEXT,
    request TEXT NOT NULL,
    response TEXT,
    prompt_tokens INTEGER,
    cached_tokens INTEGER,
    completion_tokens INTEGER,
    error TEXT,
    answered_by TEXT,
    student TEXT,
    shadow INTEGER
);
CREATE INDEX IF NOT EXISTS calls_started ON calls (started_at);
CREATE INDEX IF NOT EXISTS calls_task ON calls (task_tag);
"""
COLUMNS = ("call_id", "started_at", "latency_ms", "endpoint", "status", "stream", "model", "upstream", "upstream_model",
           "task_tag", "user_tag", "request", "response", "prompt_tokens", "cached_tokens", "completion_tokens",
           "error", "answered_by", "student", "shadow")
_ADDED_IN_2 = (("answered_by", "TEXT"), ("student", "TEXT"), ("shadow", "INTEGER"))
_JSON = ("request", "response", "student")

# Named redactions (``--redact email``); anything else given is a regular expression of its own.
REDACTIONS = {
    "email": r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
    "phone": r"(?<!\w)\+?\d[\d ().-]{7,}\d(?!\w)",
    "key": r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}|\bAKIA[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{30,}|"
           r"(?i:bearer\s+)[A-Za-z0-9._~+/-]{16,}=*",
}


def store_path(url: str) -> Path:
    """A store URL (``sqlite:///path``, ``sqlite:relative`` or a plain path) as the SQLite file's path; any other
    scheme is refused in one line (a server database is not built in; docs/scale-out.md)."""
    if url.startswith("sqlite:"):
        rest = url[len("sqlite:"):]
        return Path(rest[2:] if rest.startswith("//") else rest)
    if re.match(r"^[a-z][a-z0-9+.-]*://", url):
        raise DataError(f"{url}: only SQLite stores are built in (a file path or sqlite:///path); "
                        "docs/scale-out.md says what a server database would take")
    return Path(url)


def is_store(source: str) -> bool:
    """Whether a data source names a traffic store (``traffic:<path>``, or a file that is one)."""
    if source.startswith("traffic:"):
        return True
    path = Path(source.partition("#")[0])
    if path.suffix not in (".db", ".sqlite", ".sqlite3") or not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


class Redactor:
    """Regular expressions applied to every string of a call before anything is written; each match becomes
    ``[<name>]`` (``[redacted]`` for a pattern of the user's own)."""

    def __init__(self, patterns: list[str] = ()):
        self.rules = []
        for given in patterns:
            source = REDACTIONS.get(given, given)
            try:
                self.rules.append((re.compile(source), f"[{given}]" if given in REDACTIONS else "[redacted]"))
            except re.error as err:
                raise DataError(f"--redact {given!r}: not a regular expression ({err})") from None

    def text(self, value: str) -> str:
        for rule, mark in self.rules:
            value = rule.sub(mark, value)
        return value

    def __call__(self, value):
        """The same JSON value with every string (keys too) redacted."""
        if not self.rules:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(k): self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        return value


class TrafficStore:
    """One SQLite file of calls. ``readonly`` opens an existing store without creating or changing it."""

    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        if readonly and not self.path.is_file():
            raise DataError(f"{self.path}: no traffic store here")
        try:
            if not readonly:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            if readonly:
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            else:
                self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=2000")
            if not readonly:
                self.db.executescript(_SCHEMA)
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                self._upgrade()
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            present = {r[1] for r in self.db.execute("PRAGMA table_info(calls)")}
        except (sqlite3.Error, OSError) as err:
            why = getattr(err, "strerror", None) or err
            raise DataError(f"{self.path}: cannot open the traffic store ({why})") from None
        if row is None or int(row[0]) not in (1, SCHEMA_VERSION):
            raise DataError(f"{self.path}: traffic store schema version {row[0] if row else 'missing'}; "
                            f"this distillery reads versions 1 and {SCHEMA_VERSION}")
        # a version-1 store opened read-only reads its missing columns as NULL
        self.selected = ", ".join(c if c in present else f"NULL AS {c}" for c in COLUMNS)

    def _upgrade(self) -> None:
        """Version 1 → 2: the cascade's columns, added in one transaction."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or int(row[0]) != 1:
            return
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            present = {r[1] for r in self.db.execute("PRAGMA table_info(calls)")}
            for name, kind in _ADDED_IN_2:
                if name not in present:
                    self.db.execute(f"ALTER TABLE calls ADD COLUMN {name} {kind}")
            self.db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    def write(self, calls: list[dict]) -> None:
        """Every call in one transaction (all or none); request and response as JSON values."""
        rows = [tuple(json.dumps(c[k], ensure_ascii=False) if k in _JSON and c.get(k) is not None
                      else c.get(k) for k in COLUMNS) for c in calls]
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(f"INSERT INTO calls ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                                rows)

    def purge(self, before: float) -> int:
        """Delete the calls that started before ``before`` (Unix seconds); how many."""
        with self.db:
            return self.db.execute("DELETE FROM calls WHERE started_at < ?", (before,)).rowcount

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def calls(self, ok_only: bool = False, shadow_only: bool = False) -> Iterator[dict]:
        """Every call, oldest first, with ``request``, ``response`` and ``student`` parsed; ``shadow_only``: the
        shadowed calls that have both answers."""
        where = [*(["status = 200"] if ok_only else []),
                 *(["shadow = 1 AND student IS NOT NULL AND response IS NOT NULL"] if shadow_only else [])]
        cur = self.db.execute(f"SELECT id, {self.selected} FROM calls"
                              f"{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY started_at, id")
        for row in cur:
            call = dict(zip(("id", *COLUMNS), row))
            for k in _JSON:
                call[k] = json.loads(call[k]) if call[k] else None
            yield call

    def close(self) -> None:
        self.db.close()


@dataclass
class Pending:
    call: dict
    done: Callable[[bool], None] | None = None


class Recorder:
    """The store's one writer: ``submit`` hands a call over without blocking (False when the queue is full: the
    call is dropped and counted); a thread commits what is waiting in groups, then tells each caller whether its
    call is on disk. A failed commit (locked file, full disk) drops its group, counts it and logs one line a minute
    at most. ``keep_days`` deletes older calls at start and hourly."""

    def __init__(self, store: TrafficStore, redact: Redactor | None = None, keep_days: float | None = None,
                 max_pending: int = 10_000, batch: int = 256, log: Callable[[str], None] | None = None):
        self.store, self.redact, self.keep_days, self.batch = store, redact or Redactor(), keep_days, batch
        self.queue: queue.Queue[Pending | None] = queue.Queue(maxsize=max_pending)
        self.counts = {"written": 0, "dropped": 0, "purged": 0}
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._last_log = 0.0
        self._next_purge = 0.0
        self.thread = threading.Thread(target=self._run, name="traffic-writer", daemon=True)
        self.thread.start()

    def submit(self, call: dict, done: Callable[[bool], None] | None = None) -> bool:
        try:
            self.queue.put_nowait(Pending(call, done))
            return True
        except queue.Full:
            self._drop(1, "the write queue is full")
            if done:
                done(False)
            return False

    def _drop(self, n: int, why: str) -> None:
        self.counts["dropped"] += n
        now = time.monotonic()
        if now - self._last_log > 60:
            self._last_log = now
            self.log(f"traffic store {self.store.path}: {n} call(s) not recorded ({why}); "
                     f"{self.counts['dropped']} dropped so far")

    def _purge(self) -> None:
        if self.keep_days is None or time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + 3600
        try:
            self.counts["purged"] += self.store.purge(time.time() - self.keep_days * 86400)
        except sqlite3.Error as err:
            self.log(f"traffic store {self.store.path}: retention purge failed ({err})")

    def _run(self) -> None:
        stop = False
        while not stop:
            self._purge()
            try:
                first = self.queue.get(timeout=1.0)
            except queue.Empty:
                continue
            group = [first]
            while len(group) < self.batch:
                try:
                    group.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in group
            group = [p for p in group if p is not None]
            if not group:
                continue
            try:  # redacted here, on the writer's thread, not on the caller's: before anything is written
                self.store.write([{**p.call, "request": self.redact(p.call["request"]),
                                   "response": self.redact(p.call.get("response")),
                                   "student": self.redact(p.call.get("student")),
                                   "error": self.redact(p.call.get("error"))} for p in group])
                self.counts["written"] += len(group)
                ok = True
            except (sqlite3.Error, OSError) as err:
                self._drop(len(group), str(err))
                ok = False
            for p in group:
                if p.done:
                    p.done(ok)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is waiting, then stop the thread."""
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self.thread.join(timeout)
