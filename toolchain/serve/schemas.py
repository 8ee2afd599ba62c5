"""The request bodies the API accepts (OpenAI's shapes), parsed into one 4xx with a message or a model."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


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
    seed: int | None = Field(None, ge=0, le=2**64 - 1, description="sampling seed (a non-negative integer)")
    # Accepted so that a request using them is answered with a clear 400 instead of being ignored.
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    response_format: dict | None = None
    metadata: dict | None = None  # OpenAI's free-form tags; metadata.task picks a task's constraint

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for a feature this server would otherwise silently ignore."""
        if self.tools or self.functions:
            return ("tools" if self.tools else "functions",
                    "tool calls are not supported by this server (a distilled student without a tool-calling "
                    "template); send the request without tools")
        if self.tool_choice not in (None, "none"):
            return "tool_choice", "tool calls are not supported by this server"
        extra = self.model_extra or {}
        if extra.get("logit_bias"):
            return "logit_bias", "logit_bias is not supported by this server; send the request without it"
        for name in ("presence_penalty", "frequency_penalty"):
            value = extra.get(name)
            if value not in (None, 0, 0.0):
                return name, f"{name} is not supported by this server (only 0); send the request without it"
        return None

    def output_format(self) -> tuple[str, dict | None] | None:
        """None for free text; ("json_object", None) or ("json_schema", schema) for constrained output."""
        fmt = self.response_format or {}
        kind = fmt.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return "json_object", None
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise RequestError(400, "response_format.json_schema.schema: a JSON Schema object is required",
                                   param="response_format")
            return "json_schema", spec["schema"]
        raise RequestError(400, f"response_format type {kind!r} is not one of text, json_object, json_schema",
                           param="response_format")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop strings")
        return stops


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")  # image_url, input_audio, ...: parts this text model ignores

    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
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
    kind = {401: "authentication_error", 429: "rate_limit_error", 502: "upstream_error", 503: "server_error"}.get(
        status, "invalid_request_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


MAX_DEPTH = 32  # OpenAI's request shapes nest 6 deep; a deeper body is refused before validation walks it


def _check_values(data) -> None:
    """Refuse what JSON allows but a model cannot take: nesting deeper than MAX_DEPTH and text with a lone
    surrogate (``"\\ud800"`` parses into a str that UTF-8 cannot encode). Iterative: no recursion to exhaust."""
    todo = [(data, 1, "body")]
    while todo:
        value, depth, where = todo.pop()
        if depth > MAX_DEPTH:
            raise RequestError(400, f"{where}: the request nests more than {MAX_DEPTH} levels deep", param=where)
        if isinstance(value, dict):
            todo += [(v, depth + 1, str(k)) for k, v in value.items()]
            todo += [(k, depth, "key") for k in value]
        elif isinstance(value, list):
            todo += [(v, depth + 1, where) for v in value]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(400, f"{where}: text is not valid Unicode (a lone surrogate)", param=where) from None


def parse_object(body: bytes) -> dict:
    """A request body as a JSON object, or one 400 naming what is wrong (bad JSON, too deep, a lone surrogate)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    except RecursionError:
        raise RequestError(400, f"request body nests more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise RequestError(400, f"request body has a number out of range ({e})") from None
    if not isinstance(data, dict):
        raise RequestError(400, "request body must be a JSON object")
    _check_values(data)
    return data


def _parse(model: type[BaseModel], body: bytes) -> BaseModel:
    data = parse_object(body)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise RequestError(400, f"{where}: {err['msg']}", param=where) from None


async def read_body(request, limit: int) -> bytes:
    """The body of a Starlette request, refused with 413 past ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
