"""``distillery gateway``: an OpenAI-compatible proxy in front of any upstream API that records every call in a
traffic store (toolchain.data.traffic), so the calls an application makes today become the data its student is
distilled from.

    POST /v1/chat/completions   POST /v1/completions   (stream: true → the upstream's server-sent events)
    GET /v1/models (the upstream's)   GET /health   GET /metrics (Prometheus text)

What the client sends goes upstream as it is (a request without ``model`` gets the upstream's model; a streamed
request asks for usage, and the usage chunk the client did not ask for is not passed on); what the upstream
answers comes back unchanged, status and body. Each call is recorded after the upstream has answered and before
the answer is finished (its last bytes wait at most ``record_wait_s`` for the commit), so a call whose answer the
client has is on disk; recording never fails a call. A task tag is ``metadata.task`` or the ``X-Distillery-Task``
header (not sent upstream). The upstream key is the client's own ``Authorization`` passed through, or the
variable the operator names (``--api-key-env``); headers are never stored.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import contextlib
import json
import random
import threading
import time
import uuid
from dataclasses import dataclass

from toolchain.data.traffic import Recorder
from toolchain.serve.http import authorised, completion_routes, error_handlers
from toolchain.serve.metrics import BUCKETS, Histogram
from toolchain.serve.schemas import RequestError, _error_body, parse_object, read_body
from toolchain.serve.upstream import Stream, Upstream, usage_numbers


@dataclass(frozen=True)
class GatewaySettings:
    base_url: str  # the upstream's OpenAI base URL (…/v1)
    model: str | None = None  # what a request that names no model asks for
    upstream_key: str | None = None  # sent upstream when the client sends no Authorization (or api_key is set)
    api_key: str | None = None  # clients of the gateway must send it; then the client's header is never passed on
    log_fraction: float = 1.0  # the share of calls recorded (the rest are counted)
    record_wait_s: float = 1.0  # how long an answer's last bytes wait for its call's commit
    timeout_s: float = 600.0  # an upstream answer (connect: 10 s)
    max_body_bytes: int = 10_000_000
    shutdown_grace_s: float = 5.0


class GatewayMetrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.calls: dict[tuple[str, int], int] = {}
        self.counts = {"recorded": 0, "not_recorded": 0, "sampled_out": 0, "late": 0}
        self.upstream = Histogram(BUCKETS["e2e_request_latency_seconds"])
        self.added = Histogram((0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0))

    def call(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.calls[(endpoint, status)] = self.calls.get((endpoint, status), 0) + 1

    def bump(self, name: str) -> None:
        with self.lock:
            self.counts[name] += 1

    def timing(self, upstream_s: float, total_s: float) -> None:
        with self.lock:
            self.upstream.observe(upstream_s)
            self.added.observe(max(0.0, total_s - upstream_s))

    def render(self, recorder: Recorder) -> str:
        with self.lock:
            lines = ["# TYPE distillery_gateway_calls_total counter"]
            lines += [f'distillery_gateway_calls_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.calls.items())]
            for name, n in {**self.counts, "dropped": recorder.counts["dropped"]}.items():
                lines += [f"# TYPE distillery_gateway_{name}_total counter", f"distillery_gateway_{name}_total {n}"]
            lines += self.upstream.lines("distillery_gateway_upstream_seconds", 'upstream="1"')
            lines += self.added.lines("distillery_gateway_added_seconds", 'upstream="1"')
        return "\n".join(lines) + "\n"


def create_app(settings: GatewaySettings, recorder: Recorder):
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

    upstream = Upstream(settings.base_url, settings.model, settings.upstream_key, settings.timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await upstream.close()

    app = FastAPI(title="distillery gateway", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = GatewayMetrics()
    app.state.metrics = metrics
    public_base = upstream.public  # what clients, the store and /health are told

    def fail(status: int, message: str, endpoint: str, code=None):
        metrics.call(endpoint, status)
        return JSONResponse(_error_body(status, message, code=code), status_code=status)

    def upstream_headers(request: Request) -> dict:
        passed = None if settings.api_key else request.headers.get("authorization")
        return upstream.headers(passed, {name: request.headers[name] for name in ("openai-organization",
                                                                                   "openai-project")
                                         if request.headers.get(name)})

    unreachable = upstream.unreachable

    async def record(call: dict) -> None:
        """Hand the call to the writer and wait for its commit, at most record_wait_s; never raises."""
        if settings.log_fraction < 1.0 and random.random() >= settings.log_fraction:
            metrics.bump("sampled_out")
            return
        loop = asyncio.get_running_loop()
        written = loop.create_future()

        def done(ok: bool) -> None:
            def settle():
                if not written.done():
                    written.set_result(ok)
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:  # the loop has closed (shutting down): nobody waits any more
                pass

        if not recorder.submit(call, done):
            metrics.bump("not_recorded")
            return
        try:
            ok = await asyncio.wait_for(asyncio.shield(written), settings.record_wait_s)
            metrics.bump("recorded" if ok else "not_recorded")
        except asyncio.TimeoutError:
            metrics.bump("late")

    async def handle(request: Request, kind: str):
        endpoint = "chat" if kind == "chat" else "completions"
        started, t0 = time.time(), time.perf_counter()
        if not authorised(request, settings.api_key):
            return fail(401, "invalid API key", endpoint, code="invalid_api_key")
        try:
            body = await read_body(request, settings.max_body_bytes)
            data = parse_object(body)
        except RequestError as e:
            return fail(e.status, e.message, endpoint, e.code)
        metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
        tag = request.headers.get("x-distillery-task") or metadata.get("task")
        user = data.get("user") if isinstance(data.get("user"), str) else metadata.get("user")
        outgoing = dict(data)
        if "model" not in outgoing and settings.model:
            outgoing["model"] = settings.model
        stream = data.get("stream") is True
        options = data.get("stream_options") if isinstance(data.get("stream_options"), dict) else {}
        hide_usage = stream and not options.get("include_usage")
        if hide_usage:
            outgoing["stream_options"] = {**options, "include_usage": True}
        content = body if outgoing == data else json.dumps(outgoing).encode()
        call = {"call_id": f"call-{uuid.uuid4().hex[:24]}", "started_at": started, "endpoint": endpoint,
                "stream": int(stream), "model": outgoing.get("model"), "upstream": public_base, "request": data,
                "task_tag": tag if isinstance(tag, str) else None, "user_tag": user if isinstance(user, str) else None}

        def finish(status: int, response=None, error=None, upstream_model=None) -> dict:
            prompt, cached, completion = usage_numbers((response or {}).get("usage"))
            metrics.call(endpoint, status)
            return {**call, "status": status, "response": response, "error": error,
                    "upstream_model": upstream_model or (response or {}).get("model"),
                    "latency_ms": round((time.perf_counter() - t0) * 1000, 3), "prompt_tokens": prompt,
                    "cached_tokens": cached, "completion_tokens": completion}

        try:
            reply = await upstream.send(kind, content, upstream_headers(request))
        except httpx.HTTPError as err:
            await record(finish(502, error=unreachable(err)))
            return fail(502, unreachable(err), endpoint, code="upstream_unreachable")

        if not stream or reply.status_code != 200:
            try:
                raw = await reply.aread()
            except httpx.HTTPError as err:
                await record(finish(502, error=unreachable(err)))
                return fail(502, unreachable(err), endpoint, code="upstream_unreachable")
            finally:
                await reply.aclose()
            upstream_s = time.perf_counter() - t0
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = None
            ok = reply.status_code == 200 and isinstance(answer, dict)
            await record(finish(reply.status_code, answer if ok else None,
                                None if ok else raw[:2000].decode("utf-8", "replace")))
            headers = {k: v for k, v in reply.headers.items() if k.lower() in ("retry-after", "x-request-id")}
            metrics.timing(upstream_s, time.perf_counter() - t0)
            return Response(raw, status_code=reply.status_code, headers=headers,
                            media_type=reply.headers.get("content-type", "application/json"))

        seen = Stream(kind, hide_usage)

        async def events():
            error, closed = None, True
            try:
                async for event in seen.relay(reply):
                    yield event
                closed = False
            except httpx.HTTPError as err:
                error = unreachable(err)
                yield f"data: {json.dumps(_error_body(502, error))}\n\n".encode()
                closed = False
            finally:
                await reply.aclose()
                if closed:  # the client went away mid-answer: what was said so far is kept, without waiting
                    recorder.submit(finish(499, seen.answer(), "the client closed the stream"))
            await record(finish(200 if error is None else 502, seen.answer(), error, seen.model))
            if seen.done:
                yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), status_code=200, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    completion_routes(app, handle)

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorised(request, settings.api_key):
            return fail(401, "invalid API key", "models", code="invalid_api_key")
        try:
            reply = await upstream.client.get(f"{upstream.base}/models", headers=upstream_headers(request))
        except httpx.HTTPError as err:
            return fail(502, unreachable(err), "models", code="upstream_unreachable")
        metrics.call("models", reply.status_code)
        return Response(reply.content, status_code=reply.status_code,
                        media_type=reply.headers.get("content-type", "application/json"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "upstream": public_base, "store": str(recorder.store.path), **recorder.counts,
                "pending": recorder.queue.qsize()}

    @app.get("/metrics")
    async def metrics_page(request: Request):
        if not authorised(request, settings.api_key):
            return fail(401, "invalid API key", "metrics", code="invalid_api_key")
        return PlainTextResponse(metrics.render(recorder), media_type="text/plain; version=0.0.4")

    error_handlers(app)

    return app


def run(settings: GatewaySettings, recorder: Recorder, host: str, port: int) -> None:
    import uvicorn

    try:
        uvicorn.run(create_app(settings, recorder), host=host, port=port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=settings.shutdown_grace_s)
    finally:
        recorder.close()
