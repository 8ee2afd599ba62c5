"""Talking to an upstream OpenAI-compatible API from a server of distillery's (the gateway that records calls, the
cascade that forwards the calls its student is not sure of): the credential-free URL everyone is told, the
headers sent, one client for whole and streamed answers, and a streamed answer read as it passes."""

from __future__ import annotations

import json
from urllib.parse import urlsplit, urlunsplit


def public_url(base_url: str) -> str:
    """``base_url`` without any user:password@ it carries: what clients, stores and /health are told."""
    parts = urlsplit(base_url.rstrip("/"))
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


def parse_upstream(reference: str) -> tuple[str, str | None]:
    """``openai:<base_url>[#<model>]`` as (base_url, model or None); ValueError otherwise."""
    base_url, _, model = reference.removeprefix("openai:").partition("#")
    if not reference.startswith("openai:") or not base_url:
        raise ValueError(f"{reference!r}: expected openai:<base_url>[#<model>]")
    return base_url, model or None


def assembled(kind: str, rid, created, model, text: str, finish, usage) -> dict:
    """A streamed answer assembled into the object a whole answer would have been."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice, obj = {"index": 0, "text": text, "finish_reason": finish}, "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage}


def usage_numbers(usage) -> tuple[int | None, int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None, None
    details = usage.get("prompt_tokens_details") or {}
    return usage.get("prompt_tokens"), (details.get("cached_tokens") if isinstance(details, dict) else None), \
        usage.get("completion_tokens")


class Stream:
    """What a streamed answer said, read from its server-sent events as they pass."""

    def __init__(self, kind: str, hide_usage: bool):
        self.kind, self.hide_usage = kind, hide_usage
        self.parts: list[str] = []
        self.finish = self.usage = self.model = self.rid = self.created = None
        self.done = False

    def passes(self, event: bytes) -> bool:
        """Note one event; whether the client gets it ([DONE] is held back until the call is recorded)."""
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                return False
            try:
                obj = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            self.model, self.rid = obj.get("model", self.model), obj.get("id", self.rid)
            self.created = obj.get("created", self.created)
            if obj.get("usage"):
                self.usage = obj["usage"]
            for choice in obj.get("choices") or []:
                if self.kind == "chat":
                    piece = (choice.get("delta") or {}).get("content")
                else:
                    piece = choice.get("text")
                if isinstance(piece, str):
                    self.parts.append(piece)
                self.finish = choice.get("finish_reason") or self.finish
            if self.hide_usage and obj.get("usage") and not obj.get("choices"):
                return False
        return True

    async def relay(self, reply):
        """The upstream response's events as they arrive, whole, those the client gets (``passes``)."""
        buffer = b""
        async for chunk in reply.aiter_bytes():
            buffer += chunk.replace(b"\r\n", b"\n")
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if self.passes(event):
                    yield event + b"\n\n"

    def answer(self) -> dict:
        return assembled(self.kind, self.rid, self.created, self.model, "".join(self.parts), self.finish, self.usage)


class Upstream:
    """One pooled HTTP client to ``base_url``: ``send`` opens a call (whole or streamed, read by the caller),
    ``unreachable`` words a transport failure without the URL's credentials."""

    def __init__(self, base_url: str, model: str | None = None, key: str | None = None, timeout_s: float = 600.0):
        import httpx

        self.base, self.model, self.key = base_url.rstrip("/"), model, key
        self.public = public_url(base_url)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0),
                                        limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256))

    def headers(self, authorization: str | None = None, extra: dict | None = None) -> dict:
        """The client's own ``authorization`` when given, else the configured key."""
        headers = {"content-type": "application/json", **(extra or {})}
        if authorization:
            headers["authorization"] = authorization
        elif self.key:
            headers["authorization"] = f"Bearer {self.key}"
        return headers

    def url(self, kind: str) -> str:
        return f"{self.base}/{'chat/completions' if kind == 'chat' else 'completions'}"

    async def send(self, kind: str, content: bytes, headers: dict):
        """The upstream's response, its body not yet read (``aread``/``aiter_bytes``, then ``aclose``)."""
        return await self.client.send(self.client.build_request("POST", self.url(kind), content=content,
                                                                headers=headers), stream=True)

    def unreachable(self, err: Exception) -> str:
        return f"upstream {self.public} unreachable ({type(err).__name__}{': ' + str(err) if str(err) else ''})"

    async def close(self) -> None:
        await self.client.aclose()
