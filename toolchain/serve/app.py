"""The HTTP routes: authentication, parsing, queue limits, streamed and whole responses, errors in OpenAI's
shape."""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request) at runtime.
import json
import time
import uuid

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


def create_app(engine, settings: Settings):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    server = Server(engine, settings)
    app = FastAPI(title="distillery", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    def fail(status: int, message: str, endpoint: str, param=None, code=None, headers=None):
        server.metrics.count(endpoint, status)
        return JSONResponse(_error_body(status, message, param, code), status_code=status, headers=headers)

    def task_format(request: Request, req):
        """serve.constrain: task — the constraint of the task the request names (or the server's task)."""
        if not settings.constraints and not settings.default_task:
            return None
        named = request.headers.get("x-distillery-task") or (req.metadata or {}).get("task") or settings.default_task
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
        obj = "chat.completion" if kind == "chat" else "text_completion"
        server.metrics.count(endpoint, 200)

        def choice(text: str | None, finish: str | None, delta: bool, logprobs: list | None = None) -> dict:
            if kind == "chat":
                key = "delta" if delta else "message"
                body = (
                    ({"content": text} if text is not None else {}) if delta else {"role": "assistant", "content": text}
                )
                return {"index": 0, key: body, "finish_reason": finish,
                        "logprobs": None if logprobs is None else {"content": logprobs}}
            return {"index": 0, "text": text or "", "finish_reason": finish,
                    "logprobs": None if logprobs is None else {
                        "tokens": [t["token"] for t in logprobs], "token_logprobs": [t["logprob"] for t in logprobs],
                        "top_logprobs": [{x["token"]: x["logprob"] for x in t["top_logprobs"]} for t in logprobs]}}

        if not req.stream:
            parts = []
            async for ev, value in server.generate(req, ids, max_tokens, grammar):
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
            async for ev, value in server.generate(req, ids, max_tokens, grammar):
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
                "uptime_s": round(time.time() - server.started, 1)}

    @app.get("/metrics")
    async def metrics(request: Request):
        if not authorised(request, settings.api_key):
            return fail(401, "invalid API key", "metrics", code="invalid_api_key")
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    error_handlers(app)

    return app


def serve(engine, settings: Settings, host: str, port: int) -> None:
    import uvicorn

    if not is_loopback(host) and not settings.api_key:
        raise ValueError(f"refusing to listen on {host} without an API key (--api-key or DISTILLERY_API_KEY)")
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=settings.shutdown_grace_s)
