"""What every HTTP front of distillery shares (the server and the gateway): the bearer-key check, the two
completion routes, and errors in OpenAI's shape for routes and methods that do not exist and for anything that
escapes a handler."""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (Request) at runtime.
import hmac

from toolchain.serve.schemas import _error_body


def authorised(request, api_key: str | None) -> bool:
    """Whether a request carries ``Authorization: Bearer <api_key>`` (always, when there is no key)."""
    if not api_key:
        return True
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    return hmac.compare_digest(token.encode(), api_key.encode())


def completion_routes(app, handle) -> None:
    """POST /v1/chat/completions and /v1/completions, both answered by ``handle(request, kind)``."""
    from fastapi import Request

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completions")


def error_handlers(app) -> None:
    """404, 405 and 500 as OpenAI-shaped JSON, never a framework's HTML or a traceback."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return JSONResponse(_error_body(404, f"no route {request.method} {request.url.path}"), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc):
        return JSONResponse(_error_body(405, f"{request.method} is not allowed on {request.url.path}"), status_code=405)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        return JSONResponse(_error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)
