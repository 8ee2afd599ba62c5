"""The cascade and shadow mode of ``distillery serve`` on the CI recipe's real student, in front of the real
teacher (``distillery serve --model teacher``), talked to with the official openai client: a call is forwarded
exactly when the student's confidence — computed here from the log-probabilities a plain student server returns —
is under the threshold, streamed or not; who answered is in a header and a field; /metrics counts both ways; the
shadow pairs land in the traffic store and `distillery traffic --agreement` reports as many as were stored."""

import json
import math
import sqlite3
import sys
import time
import urllib.request

import pytest
from openai import OpenAI

from tests.conftest import ROOT, distillery, recipe_copy
from toolchain.serve.targets import start_child_server, stop_child_server

pytestmark = pytest.mark.integration

CI = ROOT / "recipes" / "ci.yaml"
TOKENS = 12


def _server(*argv, what="the server"):
    return start_child_server(lambda port: [sys.executable, "-m", "toolchain.cli", "serve", *map(str, argv),
                                            "--port", str(port)], "/health", what, 300)


@pytest.fixture(scope="module")
def teacher():
    proc, port = _server(CI, "--model", "teacher", what="the teacher server")
    yield port
    stop_child_server(proc)


def _prompts(n_per_task: int = 3) -> list[dict]:
    rows, seen = [], {}
    for line in (ROOT / "recipes" / "data" / "heldout.jsonl").read_text().splitlines():
        row = json.loads(line)
        if seen.get(row["task"], 0) < n_per_task:
            seen[row["task"]] = seen.get(row["task"], 0) + 1
            rows.append(row)
    return rows


def _ask(client, row, **kw):
    return client.chat.completions.with_raw_response.create(
        model="student", messages=[{"role": "user", "content": row["prompt"]}], max_tokens=TOKENS,
        extra_headers={"X-Distillery-Task": row["task"]}, **kw)


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_cascade_forwards_exactly_the_calls_under_the_threshold_and_shadow_pairs_are_reported(ci_run, teacher,
                                                                                            tmp_path):
    recipe, runs, _ = ci_run
    rows = _prompts()
    # 1. the student's confidence in each answer, from a plain server's own log-probabilities (mean_prob)
    proc, port = _server(recipe, "--runs", runs, "--served-model-name", "student")
    try:
        plain = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        confidence, student_text = [], []
        for row in rows:
            resp = _ask(plain, row, logprobs=True, top_logprobs=2).parse()
            chosen = [t.logprob for t in resp.choices[0].logprobs.content]
            confidence.append(math.exp(sum(chosen) / len(chosen)) if chosen else 0.0)
            student_text.append(resp.choices[0].message.content)
    finally:
        stop_child_server(proc)
    ordered = sorted(confidence)
    gaps = [(ordered[i + 1] - ordered[i], i) for i in range(len(ordered) - 1)]
    middle = min(gaps, key=lambda g: (abs(g[1] - len(ordered) / 2), -g[0]))[1]  # the gap nearest the median
    threshold = (ordered[middle] + ordered[middle + 1]) / 2
    under = [c < threshold for c in confidence]
    assert 0 < sum(under) < len(rows)  # the test routes both ways

    # 2. the cascade in front of the teacher
    store = tmp_path / "traffic.db"
    routed = recipe_copy(tmp_path, name="ci", serve={
        "route": "cascade", "upstream": f"openai:http://127.0.0.1:{teacher}/v1",
        "cascade": {"score": "mean_prob", "threshold": threshold}, "shadow": 0.5, "store": str(store)})
    teacher_client = OpenAI(base_url=f"http://127.0.0.1:{teacher}/v1", api_key="x", max_retries=0, timeout=120)
    proc, port = _server(routed, "--runs", runs, "--served-model-name", "student")
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        forwarded = 0
        for row, low, conf, mine in zip(rows, under, confidence, student_text):
            raw = _ask(client, row)
            whole = raw.parse()
            who = raw.headers["x-distillery-answered-by"]
            told = whole.model_extra["distillery"]
            assert who == told["answered_by"] == ("upstream" if low else "student"), (row, conf, threshold)
            assert told["score"] == "mean_prob" and told["confidence"] == pytest.approx(conf, rel=1e-4)
            if low:  # the teacher's own answer, as the teacher gives it
                direct = teacher_client.chat.completions.create(
                    messages=[{"role": "user", "content": row["prompt"]}], max_tokens=TOKENS, model="ci-teacher")
                assert whole.choices[0].message.content == direct.choices[0].message.content
            else:
                assert whole.choices[0].message.content == mine
            streamed = _ask(client, row, stream=True)
            assert streamed.headers["x-distillery-answered-by"] == who  # decided before the first byte
            text = "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices)
            assert text == whole.choices[0].message.content
            forwarded += 2 * low
        assert forwarded == 2 * sum(under)
        # /metrics: every call counted once, by task and by who answered
        page = _metrics(port)
        counted = {(line.split('task="')[1].split('"')[0], line.split('answered_by="')[1].split('"')[0]):
                   int(float(line.rsplit(" ", 1)[1])) for line in page.splitlines()
                   if line.startswith("distillery_cascade_calls_total{")}
        assert sum(n for (_, w), n in counted.items() if w == "upstream") == forwarded
        assert sum(counted.values()) == 2 * len(rows)
        # shadow pairs: wait for the ones asked after their answers went out
        last, stable_since = None, time.time()
        while time.time() - stable_since < 3:
            now = sum(int(float(line.rsplit(" ", 1)[1])) for line in _metrics(port).splitlines()
                      if line.startswith("distillery_shadow_pairs_total{"))
            if now != last:
                last, stable_since = now, time.time()
            time.sleep(0.3)
    finally:
        stop_child_server(proc)
    db = sqlite3.connect(store)
    stored = db.execute("SELECT COUNT(*) FROM calls WHERE shadow = 1 AND student IS NOT NULL "
                        "AND response IS NOT NULL AND status = 200").fetchone()[0]
    upstream_rows = db.execute("SELECT COUNT(*) FROM calls WHERE answered_by = 'upstream'").fetchone()[0]
    assert stored == last and 0 < stored < 2 * len(rows)
    assert upstream_rows == forwarded  # every forwarded call is kept, with the student's answer beside it
    report = json.loads(distillery("traffic", str(store), "--agreement", "--recipe", str(routed), "--json").stdout)
    assert report["pairs"] == stored == sum(t["n"] for t in report["tasks"].values())
    assert {t["measured_by"] for t in report["tasks"].values()} <= {"label", "exact", "chrF>=50", "number"}
    for t in report["tasks"].values():
        assert t["verdict"].startswith(("the student can take", "not yet", "no: below"))
