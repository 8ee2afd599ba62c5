"""distillery promote on real files: a clearly worse student (the CI student: 8 of 30 layers, 3 steps) does not
replace the served model, a better one does (the teacher's original Q4_1 file over its q8_0 rebuild, which on the
240 held-out prompts with gold answers gets 132 against 125 right: the one-sided lower bound clears 1 - margin), the
decisions are logged, and a server started with --watch answers every call of a concurrent load while the file under
it is replaced."""

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


def test_a_worse_student_is_kept_out_and_a_better_one_promoted_under_load(ci_run, tmp_path):
    recipe, runs, _ = ci_run
    worse = served.student(load(recipe), runs, "llama_cpp", "q8_0").path
    teacher_q4 = served.teacher(load(CI), "llama_cpp", None).path
    teacher_q8 = served.teacher(load(CI), "llama_cpp", "q8_0").path  # rebuilt through the export path (cached)
    # every held-out prompt with a gold answer: enough pairs to show a file is not worse at margin 0.05
    judged = recipe_copy(tmp_path, name="ci", data__heldout_limit=1000)
    target = tmp_path / "served" / "model.gguf"

    first = distillery("promote", str(judged), "--file", str(teacher_q8), "--to", str(target))
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
            time.sleep(0.5)  # a steady trickle: the two comparisons share these cores

    thread = threading.Thread(target=load_it)
    thread.start()
    try:
        kept = distillery("promote", str(judged), "--file", str(worse), "--to", str(target), check=False)
        assert kept.returncode == 3, kept.stdout + kept.stderr
        assert "kept the served file" in kept.stdout
        promoted = distillery("promote", str(judged), "--file", str(teacher_q4), "--to", str(target))
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
    assert target.read_bytes() == teacher_q4.read_bytes()
    log = [json.loads(line) for line in (target.parent / "promotions.jsonl").read_text().splitlines()]
    assert [r["promote"] for r in log] == [True, False, True]
    assert log[1]["n"] == log[2]["n"] >= 200 and log[1]["candidate_right"] < log[1]["served_right"]
    assert log[2]["candidate_right"] >= log[2]["served_right"]
    assert log[1]["lower"] < 0.95 <= log[2]["lower"] and log[2]["margin"] == 0.05
    # the recipe's own finished export is the default candidate
    own = distillery("promote", str(recipe), "--runs", str(runs), "--to", str(tmp_path / "other.gguf"))
    assert "promoted" in own.stdout and (tmp_path / "other.gguf").read_bytes() == worse.read_bytes()
    # bad input: one line, exit 2
    bad = distillery("promote", str(judged), "--file", str(tmp_path / "missing.gguf"), "--to", str(target),
                     check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "missing.gguf" in bad.stderr
