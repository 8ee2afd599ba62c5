"""distillery serve on the CI recipe's exported student GGUF, talked to with the official openai client and
lm-eval's API models: what a user's own tools see."""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import ROOT, distillery, recipe_copy

pytestmark = pytest.mark.integration

KEY = "sk-test-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, recipe, runs, *extra, port: int | None = None):
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "toolchain.cli", "serve", str(recipe), "--runs", str(runs), "--port", str(self.port),
             "--served-model-name", "m", *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "DISTILLERY_NO_PROGRESS": "1"})
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.stderr.read()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if json.loads(r.read())["status"] == "ok":
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("server did not come up")

    def client(self, key=KEY):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def post(self, path, body: bytes, key=KEY):
        req = urllib.request.Request(f"{self.url}{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(ci_run, tmp_path_factory):
    recipe, runs, _ = ci_run
    limited = recipe_copy(tmp_path_factory.mktemp("serve"), "ci", serve__max_queue=8, serve__max_prompt_tokens=200,
                          serve__max_new_tokens=64, serve__max_body_bytes=20000)
    srv = Running(limited, runs, "--api-key", KEY)
    yield srv
    srv.stop()


def test_chat_completion_and_streaming_with_usage_and_cost(server):
    client = server.client()
    assert [m.id for m in client.models.list()] == ["ci-student-q8_0", "ci", "m"]  # the file, the recipe, --served-model-name
    r = client.chat.completions.create(model="ci-student-q8_0", max_tokens=16,
                                       messages=[{"role": "user", "content": "What is the capital of Peru?"}])
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 5 and 1 <= u.completion_tokens <= 16 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    cost = r.model_extra["cost"]
    assert cost["wall_ms"] >= cost["ttft_ms"] > 0 and cost["usd"] > 0 and cost["reference_usd"] > 0
    assert cost["usd"] == pytest.approx(cost["engine_ms"] / 1000 / 3600 * 0.10, rel=1e-3)  # engine_ms is rounded
    assert cost["engine_ms"] == pytest.approx(cost["wall_ms"], rel=0.05)  # alone on the engine: its whole wall time
    assert cost["reference_usd"] == pytest.approx((u.prompt_tokens * 2.5 + u.completion_tokens * 10.0) / 1e6)

    stream = client.chat.completions.create(model="m", max_tokens=16, stream=True, stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "What is the capital of Peru?"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content  # greedy by default: the same answer streamed
    assert chunks[-1].usage.completion_tokens == u.completion_tokens and "cost" in chunks[-1].model_extra


def test_completion_endpoint_plain_and_streamed(server):
    client = server.client()
    r = client.completions.create(model="m", prompt="The capital of France is", max_tokens=8)
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="m", prompt="The capital of France is",
                                                                            max_tokens=8, stream=True))
    assert r.choices[0].text == streamed and r.usage.completion_tokens >= 1
    # a stop string taken from the unconstrained answer: the answer ends just before it
    free = client.completions.create(model="m", prompt="Count: 1, 2, 3,", max_tokens=20).choices[0].text
    word = next(w for w in free.split()[1:] if w not in free.split()[0])
    cut = client.completions.create(model="m", prompt="Count: 1, 2, 3,", max_tokens=20, stop=[word])
    assert cut.choices[0].text == free[: free.index(word)] and cut.choices[0].finish_reason == "stop"


def test_32_concurrent_requests_get_answers_or_clean_429(server):
    from openai import RateLimitError

    client = server.client()

    def ask(i):
        try:
            r = client.chat.completions.create(model="m", max_tokens=8,
                                               messages=[{"role": "user", "content": f"Say the number {i}."}])
            return 200 if r.usage.completion_tokens >= 1 else -1
        except RateLimitError:
            return 429

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(ask, range(32)))
    assert set(codes) <= {200, 429} and codes.count(200) >= 8  # max_queue 8: the rest are turned away cleanly
    assert server.proc.poll() is None
    with urllib.request.urlopen(f"{server.url}/health") as r:
        assert json.loads(r.read())["status"] == "ok"
    req = urllib.request.Request(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    metrics = urllib.request.urlopen(req).read().decode()
    served = sum(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("distillery_generations_total"))
    assert served >= codes.count(200) and "distillery_cost_usd_total" in metrics
    assert 'status="429"' in metrics or codes.count(429) == 0


def test_bad_requests_are_4xx_with_a_message(server):
    from openai import AuthenticationError, BadRequestError

    with pytest.raises(AuthenticationError):
        server.client(key="wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(BadRequestError, match="context_length_exceeded|at most 200"):
        server.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 400}])
    status, body = server.post("/v1/chat/completions", b'{"messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = server.post("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 7}).encode())
    assert status == 400 and "temperature" in body["error"]["message"]
    status, body = server.post("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}).encode())
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, body = server.post("/v1/completions", json.dumps({"prompt": "x" * 30000}).encode())
    assert status == 413 and "limit" in body["error"]["message"]
    assert server.proc.poll() is None


def test_openai_conformance_unknown_model_tools_and_unsupported_formats(server):
    """A client that names another model, asks for tools or for JSON never gets a silent 200 from the student."""
    from openai import BadRequestError, NotFoundError

    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(NotFoundError) as e:
        server.client().chat.completions.create(model="gpt-4o", messages=hi, max_tokens=4)
    assert e.value.body["code"] == "model_not_found" and "ci-student-q8_0" in e.value.body["message"]
    status, body = server.post("/v1/completions", json.dumps({"model": "gpt-4o", "prompt": "x"}).encode())
    assert status == 404 and body["error"]["param"] == "model"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(BadRequestError, match="tool calls are not supported"):
        server.client().chat.completions.create(model="m", messages=hi, tools=[tool], max_tokens=4)
    status, body = server.post("/v1/chat/completions", json.dumps(
        {"messages": hi, "response_format": {"type": "xml"}}).encode())
    assert status == 400 and body["error"]["param"] == "response_format"
    # what JSON allows but a model cannot take: lone surrogates, depth bombs, huge numbers, token ids out of range
    for path, raw in (("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
                      ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000),
                      ("/v1/chat/completions", b'{"messages": ' + b'[' * 500 + b']' * 500 + b'}'),
                      ("/v1/completions", b'{"prompt": "x", "max_tokens": 1' + b'0' * 6000 + b'}'),
                      ("/v1/completions", b'{"prompt": [1, 2, 99999999]}'),
                      ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}')):
        status, body = server.post(path, raw)
        assert 400 <= status < 500 and body["error"]["message"], (raw[:60], status, body)
    assert server.proc.poll() is None


def test_response_format_json_schema_and_json_object_are_always_valid_json(server):
    """llama.cpp's grammar (from llama-cpp-python's JSON Schema converter) constrains every token: the 8-layer
    CI student writes little of sense, but what it writes parses and fits the schema. (The converter does not
    bound numbers by minimum/maximum, so the schema here has none.)"""
    schema = {"type": "object", "additionalProperties": False, "required": ["label", "urgent"],
              "properties": {"label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                             "urgent": {"type": "boolean"}}}
    client = server.client()
    prompts = ["Is 'a wonderful film' positive?", "Classify: 'the food was cold'", "Sentiment of 'it rained'?",
               "Review: 'best purchase ever'", "Review: 'broke after a day'", "What is the capital of Peru?",
               "Tell me a joke.", "Label this: 'meh'", "Is 'I love it' positive or negative?", "Summarise: sun."]
    for p in prompts:
        r = client.chat.completions.create(
            model="m", max_tokens=48, messages=[{"role": "user", "content": p}],
            response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        value = json.loads(r.choices[0].message.content)
        assert set(value) == {"label", "urgent"} and value["label"] in ("positive", "negative", "neutral")
        assert isinstance(value["urgent"], bool)
    r = client.chat.completions.create(model="m", max_tokens=64, messages=[{"role": "user", "content": "Describe Lima."}],
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: a prefix of an object
        assert r.choices[0].message.content.lstrip().startswith("{")
    status, body = server.post("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}).encode())
    assert status == 400 and "schema" in body["error"]["message"]


def _mutants(n: int, seed: int = 0) -> list[bytes]:
    """Request bodies mutated from valid ones: a key dropped or renamed, a value of another type anywhere
    (numbers far out of range, NaN, nested lists and objects, lone surrogates, null), bytes cut or flipped."""
    import random

    rng = random.Random(seed)
    valid = [
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "a"}]}],
         "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["\n"]},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": True, "top_logprobs": 2},
        {"prompt": "The sky is", "max_tokens": 2},
        {"prompt": [1, 2, 3], "max_tokens": 2, "logprobs": 1},
    ]
    odd = [None, True, -1, 0, 2**63, -(2**70), 1e308, -1e308, 0.5, "", "\ud800", "x" * 2000, [], {}, [[[]]],
           {"a": {"b": {"c": []}}}, [None], ["\udfff"], {"type": "json_schema"}, "NaN"]

    def paths(node, prefix=()):
        yield prefix
        if isinstance(node, dict):
            for k, v in node.items():
                yield from paths(v, prefix + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from paths(v, prefix + (i,))

    out = []
    while len(out) < n:
        body = json.loads(json.dumps(rng.choice(valid)))
        where = rng.choice([p for p in paths(body) if p])
        parent = body
        for step in where[:-1]:
            parent = parent[step]
        kind = rng.randrange(5)
        if kind == 0 and isinstance(parent, dict):
            del parent[where[-1]]
        elif kind == 1 and isinstance(parent, dict):
            parent[where[-1] + "_"] = parent.pop(where[-1])
        else:
            parent[where[-1]] = rng.choice(odd)
        raw = json.dumps(body).encode().replace(b'"NaN"', b"NaN").replace(b'"\\ud800"', rb'"\ud800"')
        if kind == 4:  # bytes cut or flipped
            i = rng.randrange(len(raw))
            raw = raw[:i] if rng.random() < 0.5 else raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1:]
        out.append(raw)
    return out


# Values that pass a type check and used to reach the engine: each must be a 400 before any engine sees it.
EDGE_BODIES = [
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "seed": -1}, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "seed": 2**64}, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "seed": -(2**70)}, "seed"),
    ({"prompt": "x", "max_tokens": 2, "seed": -5}, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logit_bias": {"50256": -100}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "presence_penalty": 1.5}, "presence_penalty"),
    ({"prompt": "x", "max_tokens": 2, "frequency_penalty": -2}, "frequency_penalty"),
    ({"prompt": "", "max_tokens": 2}, "prompt is empty"),
]


def _fuzz(srv: "Running", n: int) -> None:
    """The edge bodies (a clear 400 naming the field), then ``n`` mutated bodies (never a 5xx), then the server
    still answers."""
    for body, field in EDGE_BODIES:
        status, answer = srv.post("/v1/completions" if "prompt" in body else "/v1/chat/completions",
                                  json.dumps(body).encode())
        assert status == 400 and field in answer["error"]["message"], (body, status, answer)
    codes = []
    for i, raw in enumerate(_mutants(n)):
        path = "/v1/completions" if b'"prompt"' in raw else "/v1/chat/completions"
        req = urllib.request.Request(f"{srv.url}{path}", data=raw, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()
                codes.append(r.status)
        except urllib.error.HTTPError as e:
            e.read()
            codes.append(e.code)
        assert codes[-1] < 500, (i, raw[:200], codes[-1])
    assert srv.proc.poll() is None and {200, 400} <= set(codes)  # some answered, some refused
    with urllib.request.urlopen(f"{srv.url}/health") as r:
        assert json.loads(r.read())["status"] == "ok"
    r = srv.client().chat.completions.create(model="m", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content is not None


def test_fuzzed_bodies_never_get_a_5xx_and_the_server_lives(server):
    _fuzz(server, 600)


def test_fuzzed_bodies_against_the_batched_server(ci_run, tmp_path):
    """serve.batch: 4 — a value that reached the batcher used to stop it for every later request."""
    recipe, runs, _ = ci_run
    batched = recipe_copy(tmp_path, "ci", serve__batch=4, serve__max_new_tokens=16, serve__max_body_bytes=20000)
    srv = Running(batched, runs, "--api-key", KEY)
    try:
        _fuzz(srv, 300)
    finally:
        srv.stop()


def test_sigterm_stops_a_busy_server_within_its_grace_period(ci_run, tmp_path):
    """Requests in flight and queued when SIGTERM comes: the server stops taking requests, gives those in flight
    Settings.shutdown_grace_s (5 s), and exits."""
    recipe, runs, _ = ci_run
    busy = recipe_copy(tmp_path, "ci", serve__batch=2, serve__max_new_tokens=2000)
    srv = Running(busy, runs, "--api-key", KEY)
    started = concurrent.futures.ThreadPoolExecutor(6)
    try:
        client = srv.client()
        long = [started.submit(lambda: client.chat.completions.create(
            model="m", max_tokens=2000, messages=[{"role": "user", "content": "Count from one to one thousand."}]))
            for _ in range(6)]
        time.sleep(2.0)  # in flight (two decoding, four queued)
        assert not all(f.done() for f in long)
        t0 = time.time()
        srv.proc.terminate()
        srv.proc.wait(timeout=30)
        assert time.time() - t0 < 5 + 10
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
        started.shutdown(wait=False, cancel_futures=True)


def test_lm_eval_api_models_evaluate_a_task_against_the_server(server, ci_run, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from toolchain.recipe import load
    from toolchain.quality.heldout import heldout_rows, write_tasks

    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # lm-eval's API models send this as the bearer token
    recipe, runs, _ = ci_run
    cfg = load(recipe)
    gen = sorted((runs / "ci").glob("generate-*"))[0]
    merge = sorted((runs / "ci").glob("merge-*"))[0]
    names = write_tasks(cfg, heldout_rows(cfg, gen), AutoTokenizer.from_pretrained(merge / "model"), tmp_path, "student")
    generation = [n for n in names if not n.endswith("_ppl")]
    out = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args=f"base_url={server.url}/v1/chat/completions,model=ci-student-q8_0,max_gen_toks=32",
        tasks=generation, task_manager=TaskManager(include_path=str(tmp_path / "student"), include_defaults=False),
        apply_chat_template=True, limit=2)
    for name in generation:
        assert "exact,none" in out["results"][name] and "chrf,none" in out["results"][name]


def test_non_loopback_without_a_key_refuses_to_start(ci_run):
    recipe, runs, _ = ci_run
    proc = distillery("serve", str(recipe), "--runs", str(runs), "--host", "0.0.0.0", check=False, timeout=60)
    assert proc.returncode == 2 and "without an API key" in proc.stderr and "Traceback" not in proc.stderr


def test_onnxruntime_backend_serves_the_same_api(ci_run):
    """The same app over the exported ONNX int8 student (in-process, through Starlette's test client)."""
    from fastapi.testclient import TestClient

    from toolchain.serve import targets as served
    from toolchain.recipe import load
    from toolchain.serve.app import create_app
    from toolchain.serve.settings import Settings

    recipe, runs, _ = ci_run
    target = served.student(load(recipe), runs, "onnxruntime", None)
    assert target.quant == "int8" and (target.path / "model.onnx").is_file()
    engine = served.open_engine(target)
    app = create_app(engine, Settings(model_id=target.model_id, max_new_tokens=16))
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "ci-student-int8" and 1 <= body["usage"]["completion_tokens"] <= 8
        assert body["cost"]["decode_tokens_per_s"] is None or body["cost"]["decode_tokens_per_s"] > 0
        with client.stream("POST", "/v1/completions", json={"prompt": "The sky is", "max_tokens": 6, "stream": True}) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 3
        assert client.post("/v1/completions", json={"prompt": "x", "temperature": -1}).status_code == 400
        refused = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                             "response_format": {"type": "json_object"}})
        assert refused.status_code == 400 and "not supported by this backend" in refused.json()["error"]["message"]
        per_token = _texts(client, "The sky is")
    # serve.stream_interval_ms: the first token at once, then at most one event per interval, the rest at the end
    grouped = create_app(engine, Settings(model_id=target.model_id, max_new_tokens=16, stream_interval_ms=1000.0))
    with TestClient(grouped) as client:
        coarse = _texts(client, "The sky is")
    assert len(per_token) >= 4 and len(coarse) == 2 and "".join(coarse) == "".join(per_token)


def _texts(client, prompt: str) -> list[str]:
    """The text of each streamed completion event."""
    with client.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 8, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    return [e["choices"][0]["text"] for e in events if e["choices"] and e["choices"][0]["text"]]


PROMPT = "Count from 1 to 5."


def test_batched_server_answers_concurrent_requests_and_shares_the_cost(ci_run, tmp_path):
    """serve.batch 4: requests decode together in one llama.cpp context; each pays its share of every step.

    Served: the embedded teacher (a trained model, decisive logits). The CI student is barely trained; its logits
    are so flat that where a sequence's cache cells sit in the shared context (a last-bit rounding matter) picks
    its greedy tokens. PROMPT's greedy answer never has its top two logits closer than 1.1 (of a 35 spread)."""
    recipe, runs, _ = ci_run
    batched = recipe_copy(tmp_path, "ci", serve__batch=4, serve__max_new_tokens=32)
    gguf = teacher_gguf()
    srv = Running(batched, runs, "--file", gguf)
    try:
        client = srv.client()
        alone = client.chat.completions.create(model="m", max_tokens=24,
                                               messages=[{"role": "user", "content": PROMPT}])

        def ask(i):
            return client.chat.completions.create(model="m", max_tokens=24,
                                                  messages=[{"role": "user", "content": f"Say the number {i}."}])

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        # streamed and logprobs requests go through the batch too
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="m", max_tokens=24, stream=True, messages=[{"role": "user", "content": PROMPT}]) if c.choices)
        lp = client.chat.completions.create(model="m", max_tokens=6, logprobs=True, top_logprobs=2,
                                            messages=[{"role": "user", "content": PROMPT}])
    finally:
        srv.stop()
    # The server's batched slot is the in-process BatchDecoder (same context, same machine): the same text.
    raw = subprocess.run([sys.executable, "-c", "import sys, json; from tests.integration.test_serve import "
                          "plain_and_batched; print(json.dumps(plain_and_batched(*sys.argv[1:])))",
                          gguf, str(batched)], cwd=ROOT, capture_output=True, text=True, check=True)
    got = json.loads(raw.stdout)
    assert alone.choices[0].message.content == streamed == got["batched_text"]
    # One sequence alone in a batched context decodes as llama-cpp-python's own context does, or parts from it
    # only at a near tie (a KV cache laid out for 4 sequences may round differently in the last bit).
    assert got["noise"] < 0.01 * got["spread"], got  # rounding, not another computation
    assert got["plain"] == got["batched"] or got["near_tie"], got
    for a in answers:
        cost = a.model_extra["cost"]
        assert a.usage.completion_tokens >= 1 and cost["usd"] > 0
        assert cost["usd"] == pytest.approx(cost["engine_ms"] / 1000 / 3600 * 0.10, rel=1e-3)
        assert cost["engine_ms"] <= cost["wall_ms"] + 1  # a share of the time it was in flight, never more
    shared = [a.model_extra["cost"] for a in answers]
    assert sum(c["engine_ms"] for c in shared) < sum(c["wall_ms"] for c in shared)  # the steps were shared
    assert len(lp.choices[0].logprobs.content) == lp.usage.completion_tokens


def plain_and_batched(gguf: str, recipe: str, n: int = 24) -> dict:
    """Greedy tokens for one prompt from llama-cpp-python's context (``stream``) and from a 4-slot BatchDecoder
    set up as ``distillery serve`` sets it up, with the logits of each step and whether they part at a near tie."""
    from pathlib import Path

    import numpy as np

    from toolchain.serve import targets as served
    from toolchain.backends.llama_batch import BatchDecoder
    from toolchain.recipe import load

    s = load(Path(recipe)).serve
    e = served.open_engine(served.from_file(Path(gguf), "llama_cpp"), n_ctx=s.n_ctx)
    ids = e.tokenize(e.chat_text([{"role": "user", "content": PROMPT}]))
    plain_rows = []
    for _ in e.stream(ids, n):
        plain_rows.append(e.step_logits())
    if len(plain_rows) < n:
        plain_rows.append(e.step_logits())  # the step that chose the end of turn
    d = BatchDecoder(e, 4, s.max_prompt_tokens + s.max_new_tokens + 8)
    slot = d.acquire()
    rows = [d.prefill(slot, ids)]
    while len(rows) < n and int(np.argmax(rows[-1])) not in e.eos_ids:
        rows.append(d.step([(slot, int(np.argmax(rows[-1])), len(ids) + len(rows) - 1)])[0])
    plain, batched = ([int(np.argmax(r)) for r in x] for x in (plain_rows, rows))
    j = next((i for i, (a, b) in enumerate(zip(plain, batched)) if a != b), None)
    shared = plain_rows[: (min(len(plain), len(batched)) if j is None else j + 1)]
    noise = float(max(np.abs(a - b).max() for a, b in zip(shared, rows)))
    near_tie = j is not None and float(plain_rows[j][plain[j]] - plain_rows[j][batched[j]]) < 2 * noise
    text = e.detokenize([t for t in batched if t not in e.eos_ids])
    return {"plain": plain, "batched": batched, "batched_text": text, "noise": noise, "near_tie": near_tie,
            "spread": float(plain_rows[0].max() - plain_rows[0].min())}


def teacher_gguf() -> str:
    """The embedded teacher's GGUF file (the CI recipes' teacher)."""
    from toolchain.models.references import DEFAULT_TEACHER, resolve

    return str(resolve(DEFAULT_TEACHER).path)


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_metrics_histograms_count_every_request_and_token(server):
    """vLLM-style histograms and token counters, labelled by model and file: their counts move by exactly the
    requests (and the gaps between tokens) made here."""
    def scrape() -> str:
        req = urllib.request.Request(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
        return urllib.request.urlopen(req).read().decode()

    before = scrape()
    client, usages = server.client(), []
    for i in range(3):
        r = client.chat.completions.create(model="m", max_tokens=6, messages=[{"role": "user", "content": f"Say {i}."}])
        usages.append(r.usage)
    after = scrape()
    assert 'model="ci-student-q8_0",file="ci-q8_0.gguf"' in after
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        full = f"distillery_{name}"
        assert _metric(after, full + "_count") - _metric(before, full + "_count") == 3, name
        assert f'{full}_bucket{{model="ci-student-q8_0",file="ci-q8_0.gguf",le="+Inf"}}' in after
    gaps = sum(max(u.completion_tokens - 1, 0) for u in usages)
    assert _metric(after, "distillery_inter_token_latency_seconds_count") - \
        _metric(before, "distillery_inter_token_latency_seconds_count") == gaps
    assert _metric(after, "distillery_generation_tokens_total") - _metric(before, "distillery_generation_tokens_total") \
        == sum(u.completion_tokens for u in usages)
    cached = [u.prompt_tokens_details.cached_tokens for u in usages]
    assert cached[1] > 0 and cached[2] > 0  # the system prompt and chat header, reused from the request before
    assert _metric(after, "distillery_prompt_tokens_cached_total") - \
        _metric(before, "distillery_prompt_tokens_cached_total") == sum(cached)


def test_task_constrained_serving_answers_only_labels(ci_run, tmp_path):
    """serve.constrain: task — a request naming a label task (metadata.task or the X-Distillery-Task header) is
    decoded under a grammar of the recipe's labels: every held-out prompt of that task gets exactly a label."""
    recipe, runs, _ = ci_run
    constrained = recipe_copy(tmp_path, "ci", serve__constrain="task", serve__max_new_tokens=16)
    labels = {"positive", "negative", "sports", "technology", "food", "politics"}  # recipes/ci.yaml's classify labels
    rows = [json.loads(line) for line in (ROOT / "recipes/data/heldout.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows if r["task"] == "classify"]
    assert len(prompts) >= 60
    srv = Running(constrained, runs)
    try:
        client = srv.client()
        answers = [client.chat.completions.create(model="m", max_tokens=16, messages=[{"role": "user", "content": p}],
                                                  extra_body={"metadata": {"task": "classify"}}).choices[0]
                   for p in prompts]
        assert all(a.message.content in labels and a.finish_reason == "stop" for a in answers), \
            [a.message.content for a in answers if a.message.content not in labels][:5]
        by_header = client.chat.completions.create(model="m", max_tokens=16, extra_headers={"X-Distillery-Task": "classify"},
                                                   messages=[{"role": "user", "content": "Tell me about Lima."}])
        assert by_header.choices[0].message.content in labels
        free = client.chat.completions.create(model="m", max_tokens=8, extra_body={"metadata": {"task": "summary"}},
                                              messages=[{"role": "user", "content": "Tell me about Lima."}])
        assert free.choices[0].message.content  # a task with no shape to enforce: free text
        status, body = srv.post("/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "x"}], "metadata": {"task": "nope"}}).encode())
        assert status == 400 and "unknown task" in body["error"]["message"]
    finally:
        srv.stop()
