"""Beyond one process: distill under accelerate (2 CPU processes over gloo), and generate against an
OpenAI-compatible endpoint (distillery's own server on loopback) with concurrency, failures and restarts."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT, distillery, recipe_copy, stage_dirs
from tests.loopback import Loopback
from tests.integration.test_pipeline import _spawn, _wait_for as _wait
from tests.integration.test_serve import Running, _free_port, teacher_gguf

pytestmark = pytest.mark.integration


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _with_generate(ci_runs, runs):
    """A runs folder holding the CI run's finished generate stage (the same teacher answers, not asked again)."""
    src = stage_dirs(ci_runs, "ci")["generate"]
    (runs / "ci").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(src), str(runs / "ci" / src.name)], check=True)
    return runs


def _kill_tree(proc):
    import psutil

    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


# ---- distill under accelerate ---------------------------------------------------------------------------------

def test_two_processes_follow_the_one_process_loss_curve(ci_run, tmp_path):
    _, ci_runs, _ = ci_run
    # Full fine-tuning of the 8-layer student, global batch 4 (2 sequences per process with 2 processes).
    recipe = recipe_copy(tmp_path, "ci", distill__method="full", distill__max_steps=6, distill__batch_size=4)
    one = _with_generate(ci_runs, tmp_path / "one")
    two = _with_generate(ci_runs, tmp_path / "two")
    distillery("distill", str(recipe), "--runs", str(one))
    proc = distillery("distill", str(recipe), "--runs", str(two), "--processes", "2")
    assert "2 processes (MULTI_CPU)" in proc.stderr
    assert "Traceback" not in proc.stderr

    a, b = _log(stage_dirs(one, "ci")["distill"]), _log(stage_dirs(two, "ci")["distill"])
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a]  # the same global batches
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=0.02)
    assert b[-1]["loss"] < b[0]["loss"]  # and it learns
    # Exactly one finished distill stage with one manifest; nothing left in the work area.
    manifests = list((two / "ci").glob("distill-*/manifest.json"))
    assert len(manifests) == 1
    assert not list((two / "ci" / ".work").glob("distill-*"))
    assert json.loads(manifests[0].read_text())["metrics"]["steps"] == 6
    # The number of processes is not part of the stage key: both runs made the same stage directory name.
    assert stage_dirs(one, "ci")["distill"].name == stage_dirs(two, "ci")["distill"].name


def test_two_process_distill_killed_then_resumed(ci_run, tmp_path):
    _, ci_runs, _ = ci_run
    recipe = recipe_copy(tmp_path, "ci", distill__method="full", distill__max_steps=8, distill__batch_size=4)
    runs = _with_generate(ci_runs, tmp_path / "runs")
    proc = _spawn("distill", str(recipe), "--runs", str(runs), "--processes", "2")
    ckpt = lambda: list((runs / "ci" / ".work").glob("distill-*/.resume/checkpoint.pt"))  # noqa: E731
    _wait(lambda: bool(ckpt()), proc)
    time.sleep(0.5)
    _kill_tree(proc)  # the CLI, the launcher and both training processes, as a crash would
    import torch

    killed_at = torch.load(ckpt()[0], weights_only=False)["step"]
    assert 1 <= killed_at < 8
    resumed = distillery("distill", str(recipe), "--runs", str(runs), "--processes", "2")
    assert "resuming from step" in resumed.stderr
    log = _log(stage_dirs(runs, "ci")["distill"])
    assert [r["step"] for r in log] == list(range(1, 9))  # nothing lost, nothing twice
    # The same curve as one uninterrupted process.
    fresh = _with_generate(ci_runs, tmp_path / "fresh")
    distillery("distill", str(recipe), "--runs", str(fresh))
    ref = _log(stage_dirs(fresh, "ci")["distill"])
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref], rel=0.02)


def test_distill_refuses_other_stages_and_bad_process_counts(ci_run, tmp_path):
    recipe, runs, _ = ci_run
    bad = distillery("distill", str(recipe), "--runs", str(runs), "--processes", "0", check=False)
    assert bad.returncode == 2 and "--processes" in bad.stderr
    env_run = subprocess.run([sys.executable, "-m", "toolchain.cli", "generate", str(recipe), "--runs", str(runs)],
                             cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "2", "RANK": "0"})
    assert env_run.returncode == 1 and "only the distill stage runs in several processes" in env_run.stderr
    assert "Traceback" not in env_run.stderr


# ---- generate against an OpenAI-compatible endpoint -----------------------------------------------------------

def _rows(runs, name):
    path = stage_dirs(runs, name)["generate"] / "responses.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _endpoint_recipe(tmp_path, name, url, **changes):
    return recipe_copy(tmp_path, name, teacher=f"openai:{url}/v1#m", generate__max_retries=12,
                       generate__timeout_s=60, licence__teacher="apache-2.0", **changes)


@pytest.fixture(scope="module")
def teacher_server(ci_run):
    recipe, runs, _ = ci_run
    server = Running(recipe, runs, "--file", teacher_gguf())
    yield server
    server.stop()


@pytest.fixture(scope="module")
def endpoint_run(teacher_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("endpoint")
    recipe = _endpoint_recipe(tmp, "endpoint", teacher_server.url, generate__concurrency=4, generate__logprobs=3)
    proc = distillery("generate", str(recipe), "--runs", str(tmp / "runs"))
    return recipe, tmp / "runs", proc


def test_generate_with_an_endpoint_teacher_at_concurrency_4(endpoint_run, ci_run):
    _, runs, proc = endpoint_run
    rows = _rows(runs, "endpoint")
    keys = [(r["id"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys)) == 12 + 4
    assert "4 in flight" in proc.stderr and "at the endpoint's price" in proc.stderr
    # The served teacher answers exactly as the same GGUF does in-process (greedy, same chat template).
    _, ci_runs, _ = ci_run
    local = {r["id"]: r["response"] for r in _rows(ci_runs, "ci")}
    assert {r["id"]: r["response"] for r in rows} == local
    # Top-3 log-probs of every answer token, as the server returned them.
    chosen = []
    for r in rows:
        assert len(r["logprobs"]) == r["completion_tokens"]
        for t in r["logprobs"]:
            assert len(t["top"]) == 3 and t["logprob"] <= 0
            assert t["top"][0][1] >= t["top"][1][1] >= t["top"][2][1]
            assert t["logprob"] == pytest.approx(t["top"][0][1], abs=1e-4)  # greedy: the chosen token is the top one
            chosen.append(t["logprob"])
    # A real distribution, not a flat one (log 1/49152 = -10.8): the teacher is mostly sure of its greedy tokens.
    assert sum(chosen) / len(chosen) > -1.5 and max(chosen) > -0.05
    m = json.loads((stage_dirs(runs, "endpoint")["generate"] / "manifest.json").read_text())["metrics"]
    assert m["endpoint_concurrency"] == 4 and m["teacher_tokens_per_s"] > 0
    tokens_in, tokens_out = m["prompt_tokens"], m["completion_tokens"]
    # stored rounded to the micro-dollar
    assert m["endpoint_usd"] == pytest.approx(tokens_in * 2.5 / 1e6 + tokens_out * 10 / 1e6, abs=1e-6)


def test_soft_label_from_an_endpoint_teacher(teacher_server, tmp_path):
    """A teacher that never enters training memory: `distillery serve` of the embedded teacher returns top-20
    log-probs with each answer, generate maps them to ids and writes the top-k cache, and the student distils from
    it. The cache equals (to float16) the one the same GGUF writes in-process for the same answers."""
    import numpy as np

    from toolchain.models.references import DEFAULT_TEACHER
    from toolchain.training.topk_cache import TopKCache

    soft = {"loss": "forward_kl", "temperature": 1.0, "alpha": 0.5, "teacher_logits": "cache", "top_k": 20}
    runs = tmp_path / "runs"
    local = recipe_copy(tmp_path, "local20", distill__flavour="soft", distill__soft=soft)
    distillery("generate", str(local), "--runs", str(runs))
    remote = _endpoint_recipe(tmp_path, "remote20", teacher_server.url, distill__flavour="soft", distill__soft=soft,
                              generate__logprobs=20, student={"from": DEFAULT_TEACHER}, distill__max_steps=2,
                              distill__method="lora")
    proc = distillery("run", str(remote), "--runs", str(runs), "--until", "distill")
    assert "endpoint log-probs:" in proc.stderr
    gen = stage_dirs(runs, "remote20")["generate"]
    m = json.loads((gen / "manifest.json").read_text())["metrics"]
    assert m["topk_k"] == 20 and m["topk_endpoint_unmapped_tokens"] == 0
    assert m["topk_endpoint_from_endpoint"] >= 0.9 * m["topk_endpoint_positions"]
    kept = len((gen / "train.jsonl").read_text().splitlines())
    assert m["topk_endpoint_end_of_turn"] == kept  # one per answer: servers do not report the end-of-turn token
    assert m["topk_endpoint_unaligned"] == 0 and m["topk_endpoint_short_rows"] == 0

    mine, theirs = TopKCache(stage_dirs(runs, "local20")["generate"]), TopKCache(gen)
    local_rows = {r["id"]: r["response"] for r in _rows(runs, "local20")}
    compared, diffs = 0, []
    for r in _rows(runs, "remote20"):
        key = f"{r['id']}#{r['sample']}"
        if r["split"] != "train" or local_rows.get(r["id"]) != r["response"] or key not in mine.index:
            continue
        n = min(mine.index[key][1], theirs.index[key][1]) - 1  # the end-of-turn position is the answer's token alone
        a_ids, a_lp = mine.rows_for(key, n)
        b_ids, b_lp = theirs.rows_for(key, n)
        assert float((a_ids[:, 0] == b_ids[:, 0]).float().mean()) >= 0.95  # the same most likely token
        for j in range(n):
            theirs_at = dict(zip(b_ids[j].tolist(), b_lp[j].tolist()))
            diffs += [abs(v - theirs_at[i]) for i, v in zip(a_ids[j].tolist(), a_lp[j].tolist()) if i in theirs_at]
        compared += n
    assert compared >= 50
    # measured: identical (the same GGUF, llama.cpp's logits on both sides, one float16 rounding)
    assert np.mean(diffs) <= 1e-3 and np.quantile(diffs, 0.99) <= 4e-3
    log = [json.loads(x) for x in (stage_dirs(runs, "remote20")["distill"] / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["kd"] > 0 for r in log)


class FlakyProxy:
    """Between generate and the server: answers 503 (Retry-After: 0) to every third request, 502 while the
    server is down, and logs which prompt each forwarded request asked."""

    def __init__(self, backend_port: int):
        self.backend_port, self.count, self.asked, self.failed = backend_port, 0, [], 0
        self.lock = threading.Lock()

        def answer(path, body, headers):
            with self.lock:
                self.count += 1
                fail = self.count % 3 == 0
                self.failed += fail
            if fail:
                return 503, b'{"error": {"message": "overloaded"}}', {"Retry-After": "0"}
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.backend_port, timeout=120)
                conn.request("POST", path, body, {"Content-Type": "application/json",
                                                  "Authorization": headers.get("Authorization", "")})
                resp = conn.getresponse()
                data = resp.read()
            except OSError:
                return 502, b'{"error": {"message": "backend down"}}', {}
            if resp.status == 200:
                with self.lock:
                    self.asked.append(json.loads(body)["messages"][-1]["content"])
            return resp.status, data, {}

        self.server = Loopback(answer)
        self.url = self.server.url

    def close(self):
        self.server.close()


def test_endpoint_failures_and_restarts_lose_and_duplicate_nothing(ci_run, endpoint_run, tmp_path):
    ci_recipe, ci_runs, _ = ci_run
    port = _free_port()
    server = Running(ci_recipe, ci_runs, "--file", teacher_gguf(), port=port)
    proxy = FlakyProxy(port)
    runs = tmp_path / "runs"
    recipe = _endpoint_recipe(tmp_path, "flaky", proxy.url, generate__concurrency=4, data__limit=24)
    work = lambda: list((runs / "flaky" / ".work").glob("generate-*/responses.jsonl"))  # noqa: E731
    done = lambda: len(work()[0].read_text().splitlines()) if work() else 0  # noqa: E731
    try:
        # 1. The server is killed mid-run and started again on the same port; generate rides it out.
        proc = _spawn("generate", str(recipe), "--runs", str(runs))
        _wait(lambda: done() >= 4, proc)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        time.sleep(1.0)
        server = Running(ci_recipe, ci_runs, "--file", teacher_gguf(), port=port)
        # 2. Then generate itself is killed, and run again: it asks only for what is missing.
        _wait(lambda: done() >= 12, proc)
        _kill_tree(proc)
        before = [json.loads(line) for line in work()[0].read_text().splitlines() if line.endswith("}")]
        asked_before = len(proc_asked := list(proxy.asked))
        resumed = distillery("generate", str(recipe), "--runs", str(runs))
        assert "resuming" in resumed.stderr
    finally:
        proxy.close()
        server.stop()
    rows = _rows(runs, "flaky")
    keys = [(r["id"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys)) == 24 + 4  # nothing lost, nothing twice
    assert proxy.failed > 0
    finished_prompts = {r["prompt"] for r in before}
    asked_after = proxy.asked[asked_before:]
    assert not finished_prompts & set(asked_after)  # finished prompts were not asked again
    assert len(proc_asked) >= len(before)
    # Every answer is the one a clean run gets.
    clean = {r["id"]: r["response"] for r in _rows(endpoint_run[1], "endpoint")}
    got = {r["id"]: r["response"] for r in rows}
    assert all(got[k] == v for k, v in clean.items() if k in got)
    m = json.loads((stage_dirs(runs, "flaky")["generate"] / "manifest.json").read_text())["metrics"]
    assert m["endpoint_retries"] > 0


def test_api_keys_stay_out_of_recipes(tmp_path):
    bad = recipe_copy(tmp_path, "keyed", teacher="openai:http://127.0.0.1:9/v1#m", generate__api_key="sk-live-123")
    proc = distillery("validate", str(bad), check=False)
    assert proc.returncode == 2 and "API keys never go in a recipe" in proc.stderr and "sk-live" not in proc.stderr
    named = recipe_copy(tmp_path, "named", teacher="openai:http://127.0.0.1:9/v1#m", generate__api_key_env="NO_SUCH_VAR_X",
                        data__limit=2, data__heldout_limit=1, licence__teacher="apache-2.0")
    proc = distillery("generate", str(named), "--runs", str(tmp_path / "runs"), check=False)
    assert proc.returncode == 1 and "NO_SUCH_VAR_X is not set" in proc.stderr


def test_the_large_pair_recipe_validates_offline():
    proc = distillery("validate", "recipes/endpoint-7b.yaml")
    assert "concurrency: 64" in proc.stdout and "Qwen2.5-0.5B-Instruct" in proc.stdout
