"""distillery promote on real files: the first file is served as is; a better one (the teacher's own file) replaces
a worse one (the CI student: 8 of 30 layers, 3 steps) while a server started with --watch answers every call of a
concurrent load; the worse one offered again is kept out without either file answering again (their answers are
kept by digest); every decision is logged."""

import json
import sys
import threading
import time
import urllib.request

import pytest
from openai import OpenAI

from tests.conftest import ROOT, distillery, recipe_copy
from toolchain.recipe import load
from toolchain.serve import targets as served
from toolchain.serve.targets import start_child_server, stop_child_server

pytestmark = pytest.mark.integration

CI = ROOT / "recipes" / "ci.yaml"


def _health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        return json.loads(r.read())


def test_a_better_file_is_promoted_under_load_and_a_worse_one_kept_out(ci_run, tmp_path):
    recipe, runs, _ = ci_run
    worse = served.student(load(recipe), runs, "llama_cpp", "q8_0").path
    better = served.teacher(load(CI), "llama_cpp", None).path
    # the 109 of the first 120 held-out prompts that have a gold answer: the teacher gets about half right, the
    # 3-step student next to none
    judged = recipe_copy(tmp_path, name="ci", data__heldout_limit=120)
    target = tmp_path / "served" / "model.gguf"

    first = distillery("promote", str(judged), "--file", str(worse), "--to", str(target))
    assert "promoted" in first.stdout and "nothing was served yet" in first.stdout
    proc, port = start_child_server(
        lambda p: [sys.executable, "-m", "toolchain.cli", "serve", str(CI), "--file", str(target), "--watch",
                   "--port", str(p)], "/health", "the watched server", 300)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    stop, answered, errors, after = threading.Event(), [], [], []

    def load_it():
        i = 0
        while not stop.is_set():
            try:
                r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Say hello #{i}."}],
                                                   max_tokens=6, stream=i % 2 == 1)
                if i % 2:
                    "".join(c.choices[0].delta.content or "" for c in r if c.choices)
                answered.append(time.time())
            except Exception as e:  # any failed call is a dropped call
                errors.append(repr(e))
            i += 1
            time.sleep(0.5)  # a steady trickle: the comparison shares these cores

    thread = threading.Thread(target=load_it)
    thread.start()
    try:
        promoted = distillery("promote", str(judged), "--file", str(better), "--to", str(target))
        assert promoted.returncode == 0 and "promoted" in promoted.stdout
        deadline = time.time() + 60
        while _health(port)["reopened"] < 1 and time.time() < deadline:
            time.sleep(0.2)
        assert _health(port)["reopened"] == 1
        reopened_at = time.time()
        while len([t for t in answered if t > reopened_at]) < 3 and time.time() < deadline:
            time.sleep(0.2)
        after = [t for t in answered if t > reopened_at]
    finally:
        stop.set()
        thread.join(120)
        stop_child_server(proc)
    assert not errors, errors[:3]
    assert len(answered) >= 6 and len(after) >= 3  # calls before, during and after the swap, none dropped
    assert target.read_bytes() == better.read_bytes()
    kept_answers = sorted((target.parent / ".answers").iterdir())
    assert len(kept_answers) == 2  # each file answered once
    kept = distillery("promote", str(judged), "--file", str(worse), "--to", str(target), check=False)
    assert kept.returncode == 3, kept.stdout + kept.stderr
    assert "kept the served file" in kept.stdout and target.read_bytes() == better.read_bytes()
    assert sorted((target.parent / ".answers").iterdir()) == kept_answers  # neither file was asked again
    log = [json.loads(line) for line in (target.parent / "promotions.jsonl").read_text().splitlines()]
    assert [r["promote"] for r in log] == [True, True, False]
    assert log[1]["n"] == log[2]["n"] >= 100 and log[1]["candidate_right"] > log[1]["served_right"]
    assert (log[1]["candidate_right"], log[1]["served_right"]) == (log[2]["served_right"], log[2]["candidate_right"])
    assert log[2]["lower"] < 0.95 and log[2]["margin"] == 0.05
    # the recipe's own finished export is the default candidate
    own = distillery("promote", str(recipe), "--runs", str(runs), "--to", str(tmp_path / "other.gguf"))
    assert "promoted" in own.stdout and (tmp_path / "other.gguf").read_bytes() == worse.read_bytes()
    # bad input: one line, exit 2
    bad = distillery("promote", str(judged), "--file", str(tmp_path / "missing.gguf"), "--to", str(target),
                     check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "missing.gguf" in bad.stderr
