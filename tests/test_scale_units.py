"""Pieces of the multi-process and endpoint paths that need no model: batch sharding, the launch command, the
endpoint engine's retries, pacing and error lines against a scripted local HTTP server, logprobs, recipe rules."""

import json
import sys
import threading
import time

import pytest

from tests.loopback import Loopback, chat_completion
from toolchain.backends.openai_http import EndpointError, OpenAIEngine
from toolchain.training.launch import launch_command
from toolchain.training.batches import shard


def test_a_global_batch_is_shared_out_and_every_process_gets_work():
    batch = [7, 3, 9, 1, 4]
    parts = [shard(batch, r, 2) for r in range(2)]
    assert parts == [([7, 9, 4], True), ([3, 1], True)]
    assert sorted(i for p, _ in parts for i in p) == sorted(batch)
    # More processes than sequences: the spare one runs a copy with weight 0 (the collectives must match).
    assert shard([5], 1, 2) == ([5], False)
    assert shard(batch, 0, 1) == (batch, True)


def test_launch_command_uses_torchrun_path_for_several_cpu_processes():
    cmd = launch_command(["-m", "toolchain.cli", "distill", "r.yaml"], 2)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-4:] == ["-m", "toolchain.cli", "distill", "r.yaml"]
    with_config = launch_command(["distill", "r.yaml"], 0, "configs/accelerate/fsdp-8gpu.yaml")
    assert "--multi_gpu" not in with_config and "--num_processes" not in with_config
    assert with_config[with_config.index("--config_file") + 1] == "configs/accelerate/fsdp-8gpu.yaml"


class Scripted:
    """An OpenAI-shaped server that answers from a script of (status, headers) per request, then 200s."""

    def __init__(self, script):
        self.script, self.seen, self.times = list(script), [], []

        def answer(path, raw, headers):
            body = json.loads(raw)
            self.seen.append(body)
            self.times.append(time.monotonic())
            status, extra = self.script.pop(0) if self.script else (200, {})
            if status != 200:
                return status, json.dumps({"error": {"message": f"scripted {status}", "type": "x"}}).encode(), extra
            lp = {"content": [{"token": "ok", "logprob": -0.1, "bytes": None,
                               "top_logprobs": [{"token": "ok", "logprob": -0.1, "bytes": None},
                                                {"token": "no", "logprob": -2.5, "bytes": None}]}]}
            return 200, chat_completion("ok", lp if body.get("logprobs") else None), extra

        self.server = Loopback(answer)
        self.url = self.server.url + "/v1"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.close()


def _ask(engine):
    return engine.chat([{"role": "user", "content": "hi"}], max_tokens=4)


def test_retries_429_and_5xx_with_retry_after_then_succeeds():
    with Scripted([(503, {"Retry-After": "0"}), (429, {"Retry-After": "0"}), (500, {})]) as srv:
        engine = OpenAIEngine(srv.url, "m", max_retries=3, backoff_s=0.01)
        out = _ask(engine)
    assert out.text == "ok" and out.completion_tokens == 1
    assert len(srv.seen) == 4 and engine.stats["retries"] == 3
    assert engine.stats["failures"] == {"503": 1, "429": 1, "500": 1}


def test_gives_up_after_max_retries_and_does_not_retry_a_bad_request():
    with Scripted([(503, {"Retry-After": "0"})] * 5) as srv:
        engine = OpenAIEngine(srv.url, "m", max_retries=2, backoff_s=0.01)
        with pytest.raises(EndpointError, match="still failing after 2 retries .*503"):
            _ask(engine)
        assert len(srv.seen) == 3
    with Scripted([(400, {})]) as srv:
        with pytest.raises(EndpointError, match="HTTP 400: scripted 400"):
            _ask(OpenAIEngine(srv.url, "m", max_retries=5, backoff_s=0.01))
        assert len(srv.seen) == 1


def test_refused_connections_are_retried():
    engine = OpenAIEngine("http://127.0.0.1:9/v1", "m", max_retries=2, backoff_s=0.01, timeout_s=2)
    with pytest.raises(EndpointError, match="still failing after 2 retries"):
        _ask(engine)
    assert engine.stats["requests"] == 3


def test_requests_per_minute_spaces_request_starts_across_threads():
    with Scripted([]) as srv:
        engine = OpenAIEngine(srv.url, "m", requests_per_minute=600)  # one start every 0.1 s
        threads = [threading.Thread(target=_ask, args=(engine,)) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    gaps = [b - a for a, b in zip(sorted(srv.times), sorted(srv.times)[1:])]
    assert len(gaps) == 4 and min(gaps) > 0.08


def test_top_logprobs_are_asked_for_and_kept():
    with Scripted([]) as srv:
        out = _ask(OpenAIEngine(srv.url, "m", logprobs=2))
        assert srv.seen[0]["logprobs"] is True and srv.seen[0]["top_logprobs"] == 2
    assert out.logprobs == [{"token": "ok", "logprob": -0.1, "top": [["ok", -0.1], ["no", -2.5]]}]


def test_api_key_comes_from_the_named_variable(monkeypatch):
    monkeypatch.delenv("MY_TEACHER_KEY", raising=False)
    with pytest.raises(EndpointError, match="MY_TEACHER_KEY is not set"):
        OpenAIEngine("http://127.0.0.1:9/v1", "m", api_key_env="MY_TEACHER_KEY")
    monkeypatch.setenv("MY_TEACHER_KEY", "k-123")
    assert OpenAIEngine("http://127.0.0.1:9/v1", "m", api_key_env="MY_TEACHER_KEY").client.api_key == "k-123"


class Listening:
    """A loopback OpenAI-shaped server that records the Authorization header of every request."""

    def __init__(self):
        self.auth: list[str] = []

        def answer(path, raw, headers):
            self.auth.append(headers.get("Authorization", ""))
            return 200, chat_completion("ok"), {}

        self.server = Loopback(answer)
        self.url = self.server.url + "/v1"


SECRETS = {"OPENAI_API_KEY": "sk-openai-secret", "DISTILLERY_API_KEY": "dk-serve-secret", "TEAM_KEY": "tk-team"}


def test_no_key_reaches_a_host_it_was_not_named_for(monkeypatch):
    """Two local servers: the one a recipe names a key variable for gets that key; the other gets none of the
    machine's keys (OPENAI_API_KEY and DISTILLERY_API_KEY are set), whatever a recipe from elsewhere points at."""
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    stranger, named = Listening(), Listening()
    try:
        _ask(OpenAIEngine(stranger.url, "m"))
        _ask(OpenAIEngine(named.url, "m", api_key_env="TEAM_KEY"))
    finally:
        stranger.server.close()
        named.server.close()
    assert stranger.auth and not any(secret in a for a in stranger.auth for secret in SECRETS.values())
    assert named.auth == ["Bearer tk-team"]


def test_openai_api_key_goes_only_to_openai_itself(monkeypatch):
    from toolchain.backends.openai_http import api_key

    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    assert api_key("https://api.openai.com/v1", None) == "sk-openai-secret"
    for url in ("https://api.openai.com.evil.example/v1", "http://127.0.0.1:8000/v1", "https://my-vllm.internal/v1",
                "https://evil.example/api.openai.com/v1"):
        assert api_key(url, None) is None, url
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    with pytest.raises(EndpointError, match=r"tasks.summary.judge_api_key_env: the environment variable JUDGE_KEY"):
        api_key("http://127.0.0.1:9/v1", "JUDGE_KEY", "tasks.summary.judge_api_key_env")


def test_a_judge_endpoint_gets_its_own_key_variable_only(monkeypatch, tmp_path):
    """The judge of a task is asked with tasks.<t>.judge_api_key_env; the teacher's variable never goes there."""
    from tests.conftest import recipe_copy
    from toolchain.backends.asking import Pool
    from toolchain.recipe import load

    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    teacher, judge = Listening(), Listening()
    try:
        cfg = load(recipe_copy(tmp_path, "keys", teacher=f"openai:{teacher.url}#m", generate__api_key_env="TEAM_KEY",
                               tasks={"summary": {"metric": "judge", "judge": f"openai:{judge.url}#j"}}))
        spec = cfg.tasks["summary"]
        with Pool(cfg, 0, ref=spec.judge, backend="auto", key=(spec.judge_api_key_env, "x")) as pool:
            _ask(pool.engine)
        with Pool(cfg, 0) as pool:
            _ask(pool.engine)
    finally:
        teacher.server.close()
        judge.server.close()
    assert teacher.auth == ["Bearer tk-team"]
    assert judge.auth and not any(secret in a for a in judge.auth for secret in SECRETS.values())


def test_endpoint_speed_settings_do_not_change_the_generate_key(tmp_path):
    from tests.conftest import recipe_copy
    from toolchain.pipeline.plans import PLANS
    from toolchain.recipe import load
    from toolchain.pipeline.runs import stage_key

    keys = set()
    for i, extra in enumerate([{}, {"generate__concurrency": 16, "generate__max_retries": 2,
                                    "generate__requests_per_minute": 60.0, "generate__api_key_env": "K"}]):
        cfg = load(str(recipe_copy(tmp_path, f"k{i}", teacher="openai:http://h/v1#m", **extra)))
        keys.add(stage_key("generate", PLANS["generate"].config(cfg), {}))
    assert len(keys) == 1
    with pytest.raises(Exception, match="API keys never go in a recipe"):
        load(str(recipe_copy(tmp_path, "bad", generate__api_key="sk-1")))
