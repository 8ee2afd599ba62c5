"""serve: one model (a GGUF through llama.cpp, or an ONNX model through onnxruntime) behind the OpenAI API, with
what every request cost.

    POST /v1/chat/completions   POST /v1/completions   (stream: true → server-sent events)
    GET /v1/models   GET /health   GET /metrics (Prometheus text)

One engine, one worker thread: requests queue for it in arrival order, at most ``max_queue`` waiting or
running (more get 429), so concurrent clients never run two generations on one llama.cpp context. Every
response carries OpenAI's ``usage`` and a ``cost`` object measured on this request: queue wait, time to first
token, decode tokens/s, wall time, USD at the recipe's ``cost.usd_per_hour``, and what the same tokens would
have cost at ``cost.reference_api_*`` prices. ``/metrics`` has the same as running totals.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import hmac
import ipaddress
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


@dataclass(frozen=True)
class Settings:
    model_id: str
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    max_body_bytes: int = 1_000_000
    max_queue: int = 64
    temperature: float = 0.0
    api_key: str | None = None
    usd_per_hour: float = 0.10
    reference_usd_per_1m_input: float = 2.5
    reference_usd_per_1m_output: float = 10.0
    system_prompt: str | None = None  # added to chat requests that bring no system message (as in training)
    batch: int = 1  # requests decoded together (llama.cpp); 1 = one at a time
    n_ctx_per_slot: int = 4096
    stream_interval_ms: float = 0.0  # streamed text at most this often (first token at once); 0 = every token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- requests -------------------------------------------------------------------------------------------------

class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use (user, metadata, ...)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop strings")
        return stops


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    def logprobs_k(self) -> int | None:
        return self.logprobs


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = {401: "authentication_error", 429: "rate_limit_error", 503: "server_error"}.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _parse(model: type[BaseModel], body: bytes) -> BaseModel:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(data, dict):
        raise RequestError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise RequestError(400, f"{where}: {err['msg']}", param=where) from None


# ---- text assembly --------------------------------------------------------------------------------------------

class TextStream:
    """Token ids in, text out: whole characters only (a multi-byte character can span tokens), cut at the first
    stop string, and never emitting a tail that might still become a stop string.

    Incremental: each token decodes a short window (the tokens since the last complete text, and the ones before
    them, so a tokenizer that drops a leading space at the start of a decode drops it on both sides), not the
    whole answer again; the cost per token stays flat however long the answer grows."""

    def __init__(self, engine, stop: list[str]):
        self.engine, self.stop = engine, stop
        self.ids: list[int] = []
        self.full = ""  # every complete character so far
        self.text = ""  # the same, cut at a stop string once one is found
        self.sent = 0
        self.stopped = False
        self.prefix = self.read = 0  # window: ids[prefix:read] decoded already, ids[read:] not yet

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        before = self.engine.detokenize(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        now = self.engine.detokenize(self.ids[self.prefix:])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self.full += now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        text = self.text = self.full
        for s in self.stop:
            i = text.find(s)
            if i >= 0:
                self.text, self.stopped = text[:i], True
                return self._emit(len(self.text))
        hold = max((k for s in self.stop for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)
        return self._emit(len(text) - hold)

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        out = self.text[self.sent: upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out


# ---- metrics --------------------------------------------------------------------------------------------------

class Metrics:
    def __init__(self, model_id: str):
        self.model_id = model_id
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.totals = {"prompt_tokens": 0, "completion_tokens": 0, "engine_seconds": 0.0, "queue_seconds": 0.0,
                       "ttft_seconds": 0.0, "cost_usd": 0.0, "reference_cost_usd": 0.0, "generations": 0}
        self.waiting = 0

    def count(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def add(self, usage: dict, cost: dict) -> None:
        with self.lock:
            t = self.totals
            t["prompt_tokens"] += usage["prompt_tokens"]
            t["completion_tokens"] += usage["completion_tokens"]
            t["engine_seconds"] += cost["wall_ms"] / 1000
            t["queue_seconds"] += cost["queue_ms"] / 1000
            t["ttft_seconds"] += cost["ttft_ms"] / 1000
            t["cost_usd"] += cost["usd"]
            t["reference_cost_usd"] += cost["reference_usd"]
            t["generations"] += 1

    def render(self) -> str:
        m = f'model="{self.model_id}"'
        with self.lock:
            lines = ["# TYPE distillery_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'distillery_requests_total{{{m},endpoint="{endpoint}",status="{status}"}} {n}')
            t = self.totals
            for name, key, kind in (("prompt_tokens_total", "prompt_tokens", "counter"),
                                    ("completion_tokens_total", "completion_tokens", "counter"),
                                    ("engine_seconds_total", "engine_seconds", "counter"),
                                    ("queue_seconds_total", "queue_seconds", "counter"),
                                    ("time_to_first_token_seconds_total", "ttft_seconds", "counter"),
                                    ("generations_total", "generations", "counter"),
                                    ("cost_usd_total", "cost_usd", "counter"),
                                    ("reference_api_cost_usd_total", "reference_cost_usd", "counter")):
                lines += [f"# TYPE distillery_{name} {kind}", f"distillery_{name}{{{m}}} {t[key]}"]
            done = t["completion_tokens"]
            lines += ["# TYPE distillery_usd_per_1m_output_tokens gauge",
                      f"distillery_usd_per_1m_output_tokens{{{m}}} {t['cost_usd'] / done * 1e6 if done else 0.0}",
                      "# TYPE distillery_queue_depth gauge", f"distillery_queue_depth{{{m}}} {self.waiting}"]
        return "\n".join(lines) + "\n"


# ---- the server -----------------------------------------------------------------------------------------------

class Job:
    """One request being generated: turns token ids into text events, stops on EOS / stop strings / the token
    budget / a client that went away, and accounts for what it cost. Both runners (one stream at a time, or
    several batched) drive it the same way."""

    def __init__(self, server: "Server", req, ids: list[int], max_tokens: int, emit):
        self.server, self.req, self.ids, self.max_tokens, self.emit = server, req, ids, max_tokens, emit
        self.temperature = server.s.temperature if req.temperature is None else req.temperature
        self.k = req.logprobs_k()
        self.logprobs = [] if self.k is not None else None
        self.out = TextStream(server.engine, req.stop)
        self.cancel = threading.Event()
        self.n = 0
        self.t_queued = time.perf_counter()
        self.t_start = self.t_first = None
        self.machine_s = 0.0  # this request's share of the engine's time
        self.held, self.t_sent = "", 0.0  # text not yet sent (stream_interval_ms), when text last went out

    def start(self) -> None:
        self.t_start = time.perf_counter()

    def token(self, tok: int, logits) -> bool:
        """Take one generated token (EOS already excluded); True when the request is finished."""
        self.n += 1
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if self.logprobs is not None:
            self.logprobs.append(self.server.token_logprobs(tok, self.k, logits()))
        self.held += self.out.push(tok)
        now = time.perf_counter()
        if self.held and now - self.t_sent >= self.server.s.stream_interval_ms / 1000:
            self.emit(("text", self.held))
            self.held, self.t_sent = "", now
        return self.out.stopped or self.cancel.is_set() or self.n >= self.max_tokens

    def finish(self, ended: bool) -> None:
        """``ended``: the model ended its turn (EOS) or a stop string was met, rather than the token budget."""
        finish = "stop" if ended or self.out.stopped else "length"
        rest = self.held + self.out.flush()
        if rest:
            self.emit(("text", rest))
        t_end = time.perf_counter()
        ids, n = self.ids, self.n
        usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
        cost = self.server.cost(len(ids), n, self.t_queued, self.t_start, self.t_first, t_end, self.machine_s)
        self.server.metrics.add(usage, cost)
        self.emit(("done", (finish, usage, cost, self.logprobs)))

    def fail(self, err: Exception) -> None:
        self.emit(("error", f"{type(err).__name__}: {err}"))


class Server:
    def __init__(self, engine, settings: Settings):
        self.engine, self.s = engine, settings
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.metrics = Metrics(settings.model_id)
        self.started = time.time()
        self.batcher = Batcher(self, settings.batch) if settings.batch > 1 and hasattr(engine, "llm") else None

    def cost(self, prompt_tokens: int, completion_tokens: int, t_queued: float, t_start: float,
             t_first: float | None, t_end: float, machine_s: float | None = None) -> dict:
        """What the request cost. USD is the request's share of the engine's time (its whole wall time when
        requests run one at a time; with batching, each step's time split over the requests in it)."""
        s = self.s
        wall = t_end - t_start
        machine = wall if machine_s is None else machine_s
        ttft = (t_first or t_end) - t_start
        decode = (completion_tokens - 1) / (t_end - t_first) if t_first and completion_tokens > 1 and t_end > t_first else None
        usd = machine / 3600 * s.usd_per_hour
        reference = (prompt_tokens * s.reference_usd_per_1m_input + completion_tokens * s.reference_usd_per_1m_output) / 1e6
        return {"queue_ms": round((t_start - t_queued) * 1000, 2), "ttft_ms": round(ttft * 1000, 2),
                "wall_ms": round(wall * 1000, 2), "engine_ms": round(machine * 1000, 2),
                "prompt_tokens_per_s": round(prompt_tokens / ttft, 1) if ttft > 0 else None,
                "decode_tokens_per_s": round(decode, 1) if decode else None,
                "usd": usd, "usd_per_1m_output_tokens": usd / completion_tokens * 1e6 if completion_tokens else None,
                "reference_usd": reference, "reference_ratio": usd / reference if reference else None,
                "hardware_usd_per_hour": s.usd_per_hour}

    def prompt_ids(self, req) -> tuple[list[int], str]:
        if isinstance(req, ChatRequest):
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
            if self.s.system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": self.s.system_prompt})
            try:
                text = self.engine.chat_text(messages)
            except ValueError as e:
                raise RequestError(400, str(e)) from None
        else:
            if req.echo:
                raise RequestError(400, "echo is not supported", param="echo")
            p = req.prompt
            if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
                return list(p), ""
            if isinstance(p, list):
                if len(p) != 1:
                    raise RequestError(400, "one prompt per request", param="prompt")
                p = p[0]
            text = p
        ids = self.engine.tokenize(text)
        if len(ids) > self.s.max_prompt_tokens:
            raise RequestError(400, f"prompt is {len(ids)} tokens; this server takes at most {self.s.max_prompt_tokens}",
                               param="messages" if isinstance(req, ChatRequest) else "prompt",
                               code="context_length_exceeded")
        return ids, text

    def max_tokens(self, req) -> int:
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if asked is not None and asked > self.s.max_new_tokens:
            raise RequestError(400, f"max_tokens {asked} is above this server's limit of {self.s.max_new_tokens}",
                               param="max_tokens")
        return asked or self.s.max_new_tokens

    def token_logprobs(self, tok: int, k: int, logits=None) -> dict:
        """The chosen token's log-probability and the k most likely tokens, from the raw logits of this step."""
        import numpy as np

        z = (self.engine.step_logits() if logits is None else logits).astype(np.float64)
        lse = float(np.log(np.exp(z - z.max()).sum()) + z.max())
        top = np.argpartition(-z, k)[:k] if 0 < k < len(z) else np.arange(len(z) if k else 0)
        top = top[np.argsort(-z[top])]
        name = self.engine.detokenize
        return {"token": name([tok]), "logprob": float(z[tok] - lse),
                "top_logprobs": [{"token": name([int(t)]), "logprob": float(z[t] - lse)} for t in top]}

    def run_one(self, job: Job) -> None:
        """One request alone on the engine (its own sampler, llama.cpp's KV-cache prefix reuse)."""
        job.start()
        ended = True  # the stream ran out: the model ended its turn
        try:
            for tok in self.engine.stream(job.ids, job.max_tokens, job.temperature, job.req.top_p, job.req.seed):
                if job.token(tok, self.engine.step_logits):
                    ended = job.out.stopped
                    break
            job.machine_s = time.perf_counter() - job.t_start
            job.finish(ended)
        except Exception as e:  # an engine failure ends this request, not the server
            job.fail(e)

    async def generate(self, req, ids: list[int], max_tokens: int):
        """Yields ("text", piece) as tokens arrive, then ("done", (finish_reason, usage, cost, logprobs or None))."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(self, req, ids, max_tokens, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        self.metrics.waiting += 1
        if self.batcher is not None:
            future = loop.create_future()
            job.emit = _and_resolve(job.emit, loop, future)
            self.batcher.submit(job)
        else:
            future = loop.run_in_executor(self.worker, self.run_one, job)
        try:
            while True:
                kind, value = await events.get()
                yield kind, value
                if kind in ("done", "error"):
                    break
        finally:
            job.cancel.set()
            await asyncio.shield(future)
            self.metrics.waiting -= 1


def _and_resolve(emit, loop, future):
    """An emitter that also completes ``future`` once the job's last event (done or error) is sent."""
    def send(ev):
        emit(ev)
        if ev[0] in ("done", "error"):
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))
    return send


class Batcher:
    """Continuous batching on llama.cpp: up to ``slots`` requests decode together, one token each per step
    (toolchain.backends.llama_batch); a new request joins at the next step after its prompt is evaluated,
    a finished one leaves and frees its slot. Each step's time is shared out over the requests in it."""

    def __init__(self, server: Server, slots: int):
        import queue

        from toolchain.backends.llama_batch import BatchDecoder

        self.server, self.slots = server, slots
        self.decoder = BatchDecoder(server.engine, slots, server.s.n_ctx_per_slot)
        self.pending: "queue.Queue[Job]" = queue.Queue()
        threading.Thread(target=self._loop, name="batcher", daemon=True).start()

    def submit(self, job: Job) -> None:
        self.pending.put(job)

    def _loop(self) -> None:
        import queue

        import numpy as np

        live: list[list] = []  # [job, slot, last token, position, rng]
        while True:
            while len(live) < self.slots:  # admit: block only when there is nothing to decode
                try:
                    job = self.pending.get(block=not live)
                except queue.Empty:
                    break
                job.start()
                slot = self.decoder.acquire()
                try:
                    t0 = time.perf_counter()
                    logits = self.decoder.prefill(slot, job.ids)
                    job.machine_s += time.perf_counter() - t0
                except Exception as e:
                    self.decoder.release(slot)
                    job.fail(e)
                    continue
                entry = [job, slot, None, len(job.ids), np.random.default_rng(job.req.seed)]
                if self._take(entry, logits):
                    live.append(entry)
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                rows = self.decoder.step([(e[1], e[2], e[3]) for e in live])
            except Exception as e:
                for entry in live:
                    self.decoder.release(entry[1])
                    entry[0].fail(e)
                live = []
                continue
            share = (time.perf_counter() - t0) / len(live)
            for entry in live:
                entry[0].machine_s += share
                entry[3] += 1
            live = [entry for entry, logits in zip(live, rows) if self._take(entry, logits)]

    def _take(self, entry: list, logits) -> bool:
        """Pick a request's next token; False when the request is finished (and its slot freed)."""
        from toolchain.backends import pick

        job = entry[0]
        tok = pick(logits, job.temperature, job.req.top_p, entry[4])
        eos = tok in self.server.engine.eos_ids
        if not eos and not job.token(tok, lambda: logits):
            entry[2] = tok
            return True
        self.decoder.release(entry[1])
        job.finish(eos or job.out.stopped)
        return False


def create_app(engine, settings: Settings):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    server = Server(engine, settings)
    app = FastAPI(title="distillery", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    def fail(status: int, message: str, endpoint: str, param=None, code=None, headers=None):
        server.metrics.count(endpoint, status)
        return JSONResponse(_error_body(status, message, param, code), status_code=status, headers=headers)

    def authorised(request: Request) -> bool:
        if not settings.api_key:
            return True
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        return hmac.compare_digest(token.encode(), settings.api_key.encode())

    async def body_of(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise RequestError(413, f"request body is {declared} bytes; the limit is {settings.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise RequestError(413, f"request body is over the limit of {settings.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def handle(request: Request, kind: str):
        endpoint = "chat" if kind == "chat" else "completions"
        if not authorised(request):
            return fail(401, "invalid API key", endpoint, code="invalid_api_key")
        try:
            req = _parse(ChatRequest if kind == "chat" else CompletionRequest, await body_of(request))
            max_tokens = server.max_tokens(req)
            ids, _ = server.prompt_ids(req)
            if req.logprobs_k() is not None and (req.stream or not hasattr(engine, "step_logits")):
                raise RequestError(400, "logprobs are served without streaming only", param="logprobs")
        except RequestError as e:
            return fail(e.status, e.message, endpoint, e.param, e.code)
        if server.metrics.waiting >= settings.max_queue:
            return fail(429, f"{settings.max_queue} requests are already queued; retry shortly", endpoint,
                        headers={"Retry-After": "1"})
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        server.metrics.count(endpoint, 200)

        def choice(text: str | None, finish: str | None, delta: bool, logprobs: list | None = None) -> dict:
            if kind == "chat":
                key = "delta" if delta else "message"
                body = ({"content": text} if text is not None else {}) if delta else {"role": "assistant", "content": text}
                return {"index": 0, key: body, "finish_reason": finish,
                        "logprobs": None if logprobs is None else {"content": logprobs}}
            return {"index": 0, "text": text or "", "finish_reason": finish,
                    "logprobs": None if logprobs is None else {
                        "tokens": [t["token"] for t in logprobs], "token_logprobs": [t["logprob"] for t in logprobs],
                        "top_logprobs": [{x["token"]: x["logprob"] for x in t["top_logprobs"]} for t in logprobs]}}

        if not req.stream:
            parts = []
            async for ev, value in server.generate(req, ids, max_tokens):
                if ev == "text":
                    parts.append(value)
                elif ev == "error":
                    return fail(503, f"generation failed: {value}", endpoint)
                else:
                    finish, usage, cost, logprobs = value
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": settings.model_id,
                                 "choices": [choice("".join(parts), finish, False, logprobs)], "usage": usage,
                                 "cost": cost})

        include_usage = bool((req.stream_options or {}).get("include_usage"))
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        async def events():
            def sse(payload: dict) -> str:
                return f"data: {json.dumps(payload)}\n\n"

            base = {"id": rid, "object": chunk_obj, "created": created, "model": settings.model_id}
            if kind == "chat":
                yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None}]})
            async for ev, value in server.generate(req, ids, max_tokens):
                if ev == "text":
                    yield sse({**base, "choices": [choice(value, None, True)]})
                elif ev == "error":
                    yield sse({"error": _error_body(503, f"generation failed: {value}")["error"]})
                    break
                else:
                    finish, usage, cost, _ = value
                    yield sse({**base, "choices": [choice(None if kind == "chat" else "", finish, True)], "cost": cost})
                    if include_usage:
                        yield sse({**base, "choices": [], "usage": usage, "cost": cost})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completions")

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorised(request):
            return fail(401, "invalid API key", "models", code="invalid_api_key")
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model",
                                             "created": int(server.started), "owned_by": "distillery"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id, "queue": server.metrics.waiting,
                "uptime_s": round(time.time() - server.started, 1)}

    @app.get("/metrics")
    async def metrics(request: Request):
        if not authorised(request):
            return fail(401, "invalid API key", "metrics", code="invalid_api_key")
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return JSONResponse(_error_body(404, f"no route {request.method} {request.url.path}"), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc):
        return JSONResponse(_error_body(405, f"{request.method} is not allowed on {request.url.path}"), status_code=405)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        return JSONResponse(_error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)

    return app


def serve(engine, settings: Settings, host: str, port: int) -> None:
    import uvicorn

    if not is_loopback(host) and not settings.api_key:
        raise ValueError(f"refusing to listen on {host} without an API key (--api-key or DISTILLERY_API_KEY)")
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="warning", access_log=False)
