"""The HTTP routes: authentication, parsing, queue limits, streamed and whole responses, errors in OpenAI's
shape."""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request) at runtime.
import contextlib
import json
import random
import time
import uuid

from toolchain.serve import routing
from toolchain.serve.http import authorised, completion_routes, error_handlers
from toolchain.serve.scheduling import Server
from toolchain.serve.schemas import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    _error_body,
    _parse,
    read_body,
)
from toolchain.serve.settings import Settings, is_loopback
from toolchain.serve.upstream import Stream, Upstream, usage_numbers

ANSWERED_BY = "X-Distillery-Answered-By"


def _choice(kind: str, text: str | None, finish: str | None, delta: bool, logprobs: list | None = None) -> dict:
    """One choice of a chat or text completion, whole or as a streamed delta."""
    if kind == "chat":
        key = "delta" if delta else "message"
        body = ({"content": text} if text is not None else {}) if delta else {"role": "assistant", "content": text}
        return {"index": 0, key: body, "finish_reason": finish,
                "logprobs": None if logprobs is None else {"content": logprobs}}
    return {"index": 0, "text": text or "", "finish_reason": finish,
            "logprobs": None if logprobs is None else {
                "tokens": [t["token"] for t in logprobs], "token_logprobs": [t["logprob"] for t in logprobs],
                "top_logprobs": [{x["token"]: x["logprob"] for x in t["top_logprobs"]} for t in logprobs]}}


def _objects(kind: str) -> tuple[str, str]:
    """The ``object`` of a whole answer and of a streamed chunk."""
    return ("chat.completion", "chat.completion.chunk") if kind == "chat" else ("text_completion", "text_completion")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def create_app(engine, settings: Settings, upstream: Upstream | None = None, recorder=None, watch=None, reopen=None):
    """The server's routes. With ``upstream`` (serve.route: cascade, serve.shadow) calls the student is not sure of
    go there, and ``recorder`` (toolchain.data.traffic.Recorder) keeps every call answered upstream; with ``watch``
    the served file is re-opened by ``reopen`` when a promotion replaces it."""
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.background import BackgroundTask

    server = Server(engine, settings, watch, reopen)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if upstream is not None:
            await upstream.close()

    app = FastAPI(title="distillery", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    def fail(status: int, message: str, endpoint: str, param=None, code=None, headers=None):
        server.metrics.count(endpoint, status)
        return JSONResponse(_error_body(status, message, param, code), status_code=status, headers=headers)

    def named_task(request: Request, req):
        """The task a request names (header X-Distillery-Task, metadata.task), else the server's."""
        return request.headers.get("x-distillery-task") or (req.metadata or {}).get("task") or settings.default_task

    def task_format(request: Request, req):
        """serve.constrain: task — the constraint of the task the request names (or the server's task)."""
        if not settings.constraints and not settings.default_task:
            return None
        named = named_task(request, req)
        if named is None or named in settings.unconstrained:
            return None
        if not isinstance(named, str) or named not in settings.constraints:
            raise RequestError(400, f"unknown task {named!r}; this server knows "
                               f"{', '.join(sorted([*settings.constraints, *settings.unconstrained]))}",
                               param="metadata.task")
        return settings.constraints[named]

    async def handle(request: Request, kind: str):
        endpoint = "chat" if kind == "chat" else "completions"
        if not authorised(request, settings.api_key):
            return fail(401, "invalid API key", endpoint, code="invalid_api_key")
        try:
            body = await read_body(request, settings.max_body_bytes)
            req = _parse(ChatRequest if kind == "chat" else CompletionRequest, body)
            if req.model is not None and req.model not in settings.model_ids():
                raise RequestError(404, f"The model '{req.model}' does not exist; this server serves "
                                   f"{', '.join(repr(m) for m in settings.model_ids())}", param="model",
                                   code="model_not_found")
            refused = req.unsupported()
            if refused:
                raise RequestError(400, refused[1], param=refused[0])
            grammar = server.grammar(req.output_format() or task_format(request, req))
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
        obj, chunk_obj = _objects(kind)
        server.metrics.count(endpoint, 200)

        task = named_task(request, req)
        task = task if isinstance(task, str) else None
        shadowed = settings.shadow > 0 and random.random() < settings.shadow
        if upstream is not None and (settings.route == "cascade" or shadowed):
            return await routed(request, kind, req, body, ids, max_tokens, grammar, task, shadowed, rid, created)

        def choice(text, finish, delta, logprobs=None):
            return _choice(kind, text, finish, delta, logprobs)

        if not req.stream:
            parts = []
            async for ev, value in server.generate(req, ids, max_tokens, grammar):
                if ev == "text":
                    parts.append(value)
                elif ev == "error":
                    return fail(503, f"generation failed: {value}", endpoint)
                else:
                    finish, usage, cost, logprobs, _ = value
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": settings.model_id,
                                 "choices": [choice("".join(parts), finish, False, logprobs)], "usage": usage,
                                 "cost": cost})

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        async def events():
            def sse(payload: dict) -> str:
                return f"data: {json.dumps(payload)}\n\n"

            base = {"id": rid, "object": chunk_obj, "created": created, "model": settings.model_id}
            if kind == "chat":
                yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None}]})
            async for ev, value in server.generate(req, ids, max_tokens, grammar):
                if ev == "text":
                    yield sse({**base, "choices": [choice(value, None, True)]})
                elif ev == "error":
                    yield sse({"error": _error_body(503, f"generation failed: {value}")["error"]})
                    break
                else:
                    finish, usage, cost, _, _ = value
                    yield sse({**base, "choices": [choice(None if kind == "chat" else "", finish, True)], "cost": cost})
                    if include_usage:
                        yield sse({**base, "choices": [], "usage": usage, "cost": cost})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def routed(request: Request, kind: str, req, body: bytes, ids, max_tokens, grammar, task, shadowed, rid,
                     created):
        """A call under the cascade or drawn for shadowing: the student's whole answer first (its confidence
        needs every token), then the student's answer, or the upstream's when the rule does not keep it; the
        upstream is asked too when the call is shadowed (after the client has its answer), and a call the
        upstream answered is recorded with both answers."""
        endpoint = "chat" if kind == "chat" else "completions"
        started, t0 = time.time(), time.perf_counter()
        said, confidence, failed = [], None, None
        async for ev, value in server.generate(req, ids, max_tokens, grammar, task, scored=True):
            if ev == "text":
                said.append(value)
            elif ev == "error":
                failed = value
            else:
                finish, usage, cost, logprobs, confidence = value
        text = "".join(said)
        rule = routing.rule_for(settings.rules, task)
        kept = failed is None and (settings.route != "cascade" or (rule is not None and rule.keeps(confidence)))
        told = routing.decision(task, rule, confidence, kept)
        known = task if task in settings.rules or task in settings.labels else ("other" if task else None)
        server.metrics.route(known, told["answered_by"])
        student = {"text": text if failed is None else None, "confidence": confidence, "error": failed,
                   **{k: told.get(k) for k in ("score", "threshold")}}
        data = json.loads(body)
        outgoing = {k: v for k, v in data.items() if k not in ("model", "stream", "stream_options")}
        if upstream.model:
            outgoing["model"] = upstream.model
        headers = {ANSWERED_BY: told["answered_by"]}

        def keep(status, response, error, answered_by):
            if recorder is not None:
                user = (req.metadata or {}).get("user") or getattr(req, "user", None)
                recorder.submit(routing.record(endpoint, started, t0, data, bool(req.stream), task, user,
                                               upstream.public, student, answered_by, shadowed, status, response,
                                               error, usage_numbers((response or {}).get("usage"))))
                if shadowed:
                    server.metrics.pair(known)

        async def ask(answered_by: str):
            """The upstream's whole answer: (status, parsed answer or None, raw bytes, error)."""
            try:
                reply = await upstream.send(kind, json.dumps({**outgoing, "stream": False}).encode(),
                                            upstream.headers())
                try:
                    raw = await reply.aread()
                finally:
                    await reply.aclose()
            except httpx.HTTPError as err:
                keep(502, None, upstream.unreachable(err), answered_by)
                return 502, None, None, upstream.unreachable(err)
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = None
            ok = reply.status_code == 200 and isinstance(answer, dict)
            keep(reply.status_code, answer if ok else None, None if ok else raw[:2000].decode("utf-8", "replace"),
                 answered_by)
            return reply.status_code, answer if ok else None, raw, None

        if kept:
            later = BackgroundTask(ask, "student") if shadowed else None
            obj, chunk_obj = _objects(kind)
            whole = {"id": rid, "object": obj, "created": created, "model": settings.model_id, "usage": usage,
                     "cost": cost, "distillery": told}
            if not req.stream:
                return JSONResponse({**whole, "choices": [_choice(kind, text, finish, False, logprobs)]},
                                    headers=headers, background=later)

            def events():
                base = {"id": rid, "object": chunk_obj, "created": created, "model": settings.model_id}
                if kind == "chat":
                    yield _sse({**base, "choices": [_choice(kind, "", None, True) | {"delta": {
                        "role": "assistant", "content": ""}}], "distillery": told})
                if text:
                    yield _sse({**base, "choices": [_choice(kind, text, None, True)]})
                yield _sse({**base, "choices": [_choice(kind, None if kind == "chat" else "", finish, True)],
                            "cost": cost})
                if (req.stream_options or {}).get("include_usage"):
                    yield _sse({**base, "choices": [], "usage": usage, "cost": cost})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", background=later,
                                     headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        if not req.stream:
            status, answer, raw, error = await ask("upstream")
            if error is not None:
                return fail(502, error, endpoint, code="upstream_unreachable")
            if answer is None:
                return Response(raw, status_code=status, headers=headers, media_type="application/json")
            return JSONResponse({**answer, "distillery": told}, headers=headers)

        wants_usage = bool((req.stream_options or {}).get("include_usage"))
        try:
            reply = await upstream.send(kind, json.dumps({**outgoing, "stream": True, "stream_options": {
                "include_usage": True}}).encode(), upstream.headers())
        except httpx.HTTPError as err:
            keep(502, None, upstream.unreachable(err), "upstream")
            return fail(502, upstream.unreachable(err), endpoint, code="upstream_unreachable")
        if reply.status_code != 200:
            raw = await reply.aread()
            await reply.aclose()
            keep(reply.status_code, None, raw[:2000].decode("utf-8", "replace"), "upstream")
            return Response(raw, status_code=reply.status_code, headers=headers, media_type="application/json")
        seen = Stream(kind, hide_usage=not wants_usage)

        async def passed():
            error = None
            try:
                async for event in seen.relay(reply):
                    yield event
            except httpx.HTTPError as err:
                error = upstream.unreachable(err)
                yield _sse(_error_body(502, error)).encode()
            finally:
                await reply.aclose()
            keep(200 if error is None else 502, seen.answer(), error, "upstream")
            if seen.done:
                yield b"data: [DONE]\n\n"

        return StreamingResponse(passed(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    completion_routes(app, handle)

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorised(request, settings.api_key):
            return fail(401, "invalid API key", "models", code="invalid_api_key")
        return {"object": "list", "data": [{"id": m, "object": "model", "created": int(server.started),
                                             "owned_by": "distillery"} for m in settings.model_ids()]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id, "queue": server.metrics.waiting,
                "uptime_s": round(time.time() - server.started, 1), "reopened": server.generation}

    @app.get("/metrics")
    async def metrics(request: Request):
        if not authorised(request, settings.api_key):
            return fail(401, "invalid API key", "metrics", code="invalid_api_key")
        drafting = getattr(server.engine, "draft", None) is not None
        return PlainTextResponse(server.metrics.render(server.engine.speculation if drafting else None),
                                 media_type="text/plain; version=0.0.4")

    error_handlers(app)

    return app


def serve(engine, settings: Settings, host: str, port: int, upstream: Upstream | None = None, recorder=None,
          watch=None, reopen=None) -> None:
    import uvicorn

    if not is_loopback(host) and not settings.api_key:
        raise ValueError(f"refusing to listen on {host} without an API key (--api-key or DISTILLERY_API_KEY)")
    try:
        uvicorn.run(create_app(engine, settings, upstream, recorder, watch, reopen), host=host, port=port,
                    log_level="warning",
                    access_log=False, timeout_graceful_shutdown=settings.shutdown_grace_s)
    finally:
        if recorder is not None:
            recorder.close()
