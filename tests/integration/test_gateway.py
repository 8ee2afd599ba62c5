"""distillery gateway in front of a real upstream (``distillery serve --model teacher``), talked to with the
official openai client: every call lands in the traffic store with its usage, `distillery traffic` finds the
application's tasks, a killed gateway loses no answered call, and bad input is one line."""

import concurrent.futures
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import yaml
from openai import APIStatusError, OpenAI

from tests.conftest import ROOT, distillery, stage_dirs
from toolchain.serve.targets import start_child_server, stop_child_server

pytestmark = pytest.mark.integration

CI = ROOT / "recipes" / "ci.yaml"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the name the application asks for (the teacher answers to it)
REVIEWS = ["The battery died in a day.", "Lovely screen and fast.", "It broke when I opened it.",
           "Best purchase this year.", "Support never answered me.", "Works as promised, very happy.",
           "The strap smells awful.", "Great sound for the price.", "Arrived late and scratched.",
           "My kids love it.", "Too slow to be useful.", "Exactly what I needed."]
SHOPS = ["Northwind", "Contoso", "Fabrikam"]
FEW_SHOT = [{"role": "user", "content": "Maria flew from Lisbon to Oslo."}, {"role": "assistant", "content": "Oslo"},
            {"role": "user", "content": "We drove to Lyon after lunch."}, {"role": "assistant", "content": "Lyon"},
            {"role": "user", "content": "Tom's parcel reached Nairobi."}, {"role": "assistant", "content": "Nairobi"}]
SENTENCES = ["Ana took the train to Porto.", "The team landed in Denver.", "I moved to Kyoto last spring.",
             "They sailed into Valletta.", "He cycled to Ghent.", "Our bus stopped in Brno.",
             "She studied in Leipzig.", "The fair opens in Perth."]
ARTICLES = ["The council approved a new park by the river after a long debate.",
            "Rain delayed the final match, which the home side won in extra time.",
            "A local bakery doubled its staff after its bread won a national prize.",
            "The museum reopened with a hall of maps from the 1600s.",
            "Students built a solar car that crossed the desert in four days.",
            "The old bridge will close for repairs until the spring."]


def _gateway(upstream: str, store, *extra, timeout_s: float = 60.0):
    return start_child_server(
        lambda port: [sys.executable, "-m", "toolchain.cli", "gateway", "--upstream", upstream, "--store", str(store),
                      "--port", str(port), *extra], "/health", "the gateway", timeout_s)


@pytest.fixture(scope="module")
def upstream():
    proc, port = start_child_server(
        lambda port: [sys.executable, "-m", "toolchain.cli", "serve", str(CI), "--model", "teacher", "--port",
                      str(port), "--served-model-name", MODEL], "/health", "the teacher server", 300)
    yield f"openai:http://127.0.0.1:{port}/v1"
    stop_child_server(proc)


def _workload():
    """(kwargs for chat.completions.create, expected task) — three tasks: a sentiment classifier whose system
    prompt names the shop (near-duplicate instructions), a city extractor with three few-shot turns, and a
    summariser whose calls are tagged (metadata or header) and whose system prompt carries the date."""
    calls = []
    for i, review in enumerate(REVIEWS):
        system = (f"You are the review assistant of the {SHOPS[i % 3]} online shop. Classify the sentiment of the "
                  "customer review as positive or negative. Answer with one word only, in lower case, and nothing "
                  "else at all.")
        calls.append(({"messages": [{"role": "system", "content": system}, {"role": "user", "content": review}],
                       "stream": i % 3 == 0}, "sentiment"))
    for i, sentence in enumerate(SENTENCES):
        calls.append(({"messages": [{"role": "system", "content": "Name the city the sentence ends up in."},
                                    *FEW_SHOT, {"role": "user", "content": sentence}], "stream": i % 2 == 1}, "city"))
    for i, article in enumerate(ARTICLES):
        tag = {"metadata": {"task": "summary"}} if i % 2 else {"extra_headers": {"X-Distillery-Task": "summary"}}
        calls.append(({"messages": [{"role": "system", "content": f"Today is 2026-11-{10 + i}. Summarize the "
                                                                  "article in one short sentence."},
                                    {"role": "user", "content": article}], "stream": i == 2, **tag}, "summary"))
    return calls


def _send(client, kwargs) -> str:
    kwargs = {"model": MODEL, "max_tokens": 6, **kwargs}
    if kwargs.get("stream"):
        pieces, rid = [], None
        for chunk in client.chat.completions.create(**kwargs):
            rid = chunk.id
            pieces += [c.delta.content or "" for c in chunk.choices]
        return rid
    return client.chat.completions.create(**kwargs).id


def test_a_mixed_workload_is_recorded_and_its_three_tasks_are_found(upstream, tmp_path):
    store = tmp_path / "traffic.db"
    proc, port = _gateway(upstream, store, "--redact", "email")
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-client", max_retries=0, timeout=120)
        work = _workload()
        ids = [_send(client, kwargs) for kwargs, _ in work]
        # passes the upstream's answer through: the same model list, a completion, an upstream 404 as a 404
        assert "ci-teacher-q4_1" in [m.id for m in client.models.list()]
        done = client.completions.create(model=MODEL, prompt="Mail bob@example.com: the capital of "
                                         "France is", max_tokens=4)
        with pytest.raises(APIStatusError) as err:
            client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 404 and "no-such-model" in err.value.message
    finally:
        stop_child_server(proc)

    db = sqlite3.connect(store)
    rows = db.execute("SELECT status, stream, endpoint, task_tag, prompt_tokens, completion_tokens, request, response "
                      "FROM calls ORDER BY id").fetchall()
    assert len(rows) == len(work) + 2  # every call, the failed one too
    ok = [r for r in rows if r[0] == 200]
    assert len(ok) == len(work) + 1 and all(r[4] and r[5] for r in ok)  # usage on every answer, streamed or not
    assert [json.loads(r[7])["id"] for r in ok[:len(work)]] == ids  # the upstream's answers, in order
    assert sum(r[1] for r in rows) == sum(1 for kwargs, _ in work if kwargs["stream"])
    assert sorted(r[3] for r in rows if r[3]) == ["summary"] * len(ARTICLES)
    completion = json.loads(ok[-1][6])
    assert "[email]" in completion["prompt"] and "bob@example.com" not in completion["prompt"]
    assert ok[-1][2] == "completions" and done.choices[0].text == json.loads(ok[-1][7])["choices"][0]["text"]
    assert rows[-1][0] == 404
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    report = json.loads(distillery("traffic", str(store), "--json", "--prices", "2.5,1.25,10").stdout)
    found = {t["name"]: t["calls"] for t in report["tasks"]}
    assert found.pop("summary") == len(ARTICLES)
    assert found.pop("unsorted") == 1  # the lone completion
    assert sorted(found.values()) == [len(SENTENCES), len(REVIEWS)], found
    sentiment = next(t for t in report["tasks"] if t["calls"] == len(REVIEWS))
    assert sentiment["api_usd_per_1k"] > 0 and sentiment["student_usd_per_1k"] > 0
    assert sentiment["prompt_tokens"]["median"] > 40  # the system prompt is paid for on every call
    table = distillery("traffic", str(store), "--prices", "2.5,1.25,10", "--plot", str(tmp_path / "bill.png")).stdout
    assert "| summary (tag) | 6 |" in table
    assert (tmp_path / "bill.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a recipe from the store: the sentiment calls, their logged answers as training answers and golds, the newest
    # held out; validate accepts it and it runs to eval (CI-sized)
    recipe = tmp_path / "sentiment.yaml"
    made = distillery("init", str(store), "--task", sentiment["name"], "--out", str(recipe))
    assert "answers_from" in made.stdout
    data = yaml.safe_load(recipe.read_text())
    assert data["generate"]["answers"] == "reference" and data["data"]["answers_from"].endswith(f"#{MODEL}")
    data["student"]["keep_layers"] = 8
    data["distill"].update(method="lora", lora={"r": 4, "alpha": 8}, epochs=1, batch_size=4, seq_len=160)
    data["generate"]["max_new_tokens"] = data["eval"]["max_new_tokens"] = 8
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    distillery("validate", str(recipe))
    distillery("run", str(recipe), "--runs", str(tmp_path / "runs"), "--until", "eval", "--no-gate")
    dirs = stage_dirs(tmp_path / "runs", sentiment["name"])
    gen = json.loads((dirs["generate"] / "manifest.json").read_text())
    assert gen["metrics"]["answers_teacher"] == 0 and gen["metrics"]["answers_reference"] == len(REVIEWS)
    assert gen["metrics"]["prompts_heldout"] == 2  # the newest fifth
    report = json.loads((dirs["eval"] / "eval.json").read_text())
    assert report["docs"] == {sentiment["name"]: 2}


def test_a_killed_gateway_keeps_every_answered_call(upstream, tmp_path):
    """kill -9 in the middle of concurrent load: every call whose answer a client received is in the store
    after the kill, the store opens and checks whole, and a restarted gateway appends to it."""
    store = tmp_path / "traffic.db"
    proc, port = _gateway(upstream, store)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=60)
    answered, stop = [], threading.Event()

    def worker(k):
        i = 0
        while not stop.is_set():
            try:
                answered.append(_send(client, {"messages": [{"role": "user", "content": f"Count to {k + i}."}],
                                               "stream": (k + i) % 2 == 0}))
            except Exception:  # the kill: calls in flight fail, which is what a crash does
                return
            i += 1

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for k in range(8):
            pool.submit(worker, k)
        deadline = time.time() + 60
        while len(answered) < 12 and time.time() < deadline:
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stop.set()
    assert len(answered) >= 12
    db = sqlite3.connect(store)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {json.loads(r[0])["id"] for r in db.execute("SELECT response FROM calls WHERE status = 200")}
    missing = set(answered) - stored
    assert not missing, f"{len(missing)} answered calls not in the store"
    before = db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    db.close()
    proc, port = _gateway(upstream, store)
    try:
        OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    finally:
        stop_child_server(proc)
    assert sqlite3.connect(store).execute("SELECT COUNT(*) FROM calls").fetchone()[0] == before + 1


def test_an_unreachable_upstream_is_a_502_naming_it(tmp_path):
    proc, port = _gateway("openai:http://user:secret@127.0.0.1:9/v1", tmp_path / "t.db")
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        for stream in (False, True):
            with pytest.raises(APIStatusError) as err:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=stream)
            assert err.value.status_code == 502 and "upstream http://127.0.0.1:9/v1 unreachable" in err.value.message
            assert "secret" not in err.value.message  # the URL's credentials are not told to clients
    finally:
        stop_child_server(proc)
    stored = sqlite3.connect(tmp_path / "t.db").execute("SELECT status, upstream, error FROM calls").fetchall()
    assert [row[0] for row in stored] == [502, 502] and "secret" not in repr(stored)


def test_bad_gateway_options_are_one_line_and_exit_2(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    for args, says in (
        (["--store", str(blocked / "t.db")], "cannot open the traffic store"),
        (["--store", str(tmp_path / "t.db"), "--redact", "(unclosed"], "--redact '(unclosed': not a regular"),
        (["--store", "postgresql://db/traffic"], "only SQLite stores are built in"),
        (["--store", str(tmp_path / "t.db"), "--log-fraction", "0"], "--log-fraction 0.0"),
        (["--store", str(tmp_path / "t.db"), "--upstream", "http://x/v1"], "expected openai:<base_url>"),
    ):
        upstream = [] if "--upstream" in args else ["--upstream", "openai:http://127.0.0.1:9/v1"]
        proc = subprocess.run([sys.executable, "-m", "toolchain.cli", "gateway", *upstream, *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and says in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
