"""Any OpenAI-compatible server as a teacher (vLLM, TGI, llama-server, `distillery serve`, a hosted API).

Thread-safe: generate keeps ``concurrency`` requests in flight through one engine. Each request is retried on
429, 5xx, timeouts and refused connections with exponential backoff (Retry-After honoured), and requests start
no faster than ``requests_per_minute``. The API key comes from an environment variable, never from a recipe
(``api_key``: only the variable the recipe names, or OPENAI_API_KEY for OpenAI's own host).
"""

from __future__ import annotations

import os
import random
import threading
import time
from urllib.parse import urlsplit

from toolchain.backends.base import Completion

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """A request that still failed after every retry (or failed in a way retrying cannot fix)."""


OPENAI_HOSTS = ("api.openai.com",)  # where OPENAI_API_KEY may go without being named


def api_key(base_url: str, api_key_env: str | None, field: str = "generate.api_key_env") -> str | None:
    """The key sent to ``base_url``: from the variable the recipe names for it (``field``), else OPENAI_API_KEY
    only when the host is OpenAI's own API, else none. A recipe received from someone else can name any URL: a
    key is never sent where the user did not name it, and DISTILLERY_API_KEY (what ``distillery serve`` asks
    of its clients) is never a client key unless a recipe names it."""
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise EndpointError(f"{field}: the environment variable {api_key_env} is not set")
        return key
    host = (urlsplit(base_url).hostname or "").lower()
    return os.environ.get("OPENAI_API_KEY") or None if host in OPENAI_HOSTS else None


class OpenAIEngine:
    def __init__(self, base_url: str, model: str, *, timeout_s: float = 120.0, max_retries: int = 8,
                 requests_per_minute: float | None = None, api_key_env: str | None = None,
                 key_field: str = "generate.api_key_env", logprobs: int | None = None, backoff_s: float = 0.5,
                 backoff_cap_s: float = 30.0):
        from openai import OpenAI

        key = api_key(base_url, api_key_env, key_field)
        # The client's own retries are off: this engine retries, counts and paces every attempt itself.
        self.client = OpenAI(base_url=base_url, api_key=key or "none", timeout=timeout_s, max_retries=0)
        self.base_url, self.model, self.max_retries, self.top_logprobs = base_url, model, max_retries, logprobs
        self.backoff_s, self.backoff_cap_s = backoff_s, backoff_cap_s
        self.interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._lock = threading.Lock()
        self._next_start = 0.0
        self.stats = {"requests": 0, "retries": 0, "failures": {}}

    # -- the engine interface ---------------------------------------------------------------------------------
    def chat(self, messages: list[dict], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None) -> Completion:
        extra = {"logprobs": True, "top_logprobs": self.top_logprobs} if self.top_logprobs else {}
        out = self._call(lambda: self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            seed=seed, **extra))
        choice = out.choices[0]
        return _completion(out, choice.message.content, _chat_logprobs(choice.logprobs))

    def complete(self, text: str, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list[str] | None = None) -> Completion:
        extra = {"logprobs": self.top_logprobs} if self.top_logprobs else {}
        out = self._call(lambda: self.client.completions.create(
            model=self.model, prompt=text, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            seed=seed, stop=stop or None, **extra))
        choice = out.choices[0]
        return _completion(out, choice.text, _text_logprobs(choice.logprobs))

    def close(self) -> None:
        self.client.close()

    # -- pacing and retries -----------------------------------------------------------------------------------
    def _pace(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + self.interval
        time.sleep(max(0.0, start - now))

    def _call(self, request):
        import openai

        for attempt in range(self.max_retries + 1):
            self._pace()
            with self._lock:
                self.stats["requests"] += 1
            try:
                return request()
            except (openai.APITimeoutError, openai.APIConnectionError, openai.APIStatusError) as err:
                status = getattr(err, "status_code", None)
                why = str(status) if status else type(err).__name__
                with self._lock:
                    self.stats["failures"][why] = self.stats["failures"].get(why, 0) + 1
                if status is not None and status not in RETRY_STATUS:
                    raise EndpointError(f"{self.base_url}: HTTP {status}: {_message(err)}") from None
                if attempt == self.max_retries:
                    raise EndpointError(f"{self.base_url}: still failing after {self.max_retries} retries "
                                        f"(last: {why}: {_message(err)})") from None
                with self._lock:
                    self.stats["retries"] += 1
                time.sleep(self._delay(attempt, err))

    def _delay(self, attempt: int, err) -> float:
        response = getattr(err, "response", None)
        after = response.headers.get("retry-after") if response is not None else None
        try:
            if after is not None:
                return min(self.backoff_cap_s, max(0.0, float(after)))
        except ValueError:
            pass
        return min(self.backoff_cap_s, self.backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)


def _message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:200]
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


def _chat_logprobs(lp) -> list[dict] | None:
    if lp is None or not getattr(lp, "content", None):
        return None
    return [{"token": t.token, "logprob": t.logprob, "top": [[x.token, x.logprob] for x in (t.top_logprobs or [])]}
            for t in lp.content]


def _text_logprobs(lp) -> list[dict] | None:
    if lp is None or not getattr(lp, "tokens", None):
        return None
    tops = lp.top_logprobs or [None] * len(lp.tokens)
    return [{"token": t, "logprob": v, "top": sorted(([k, x] for k, x in (top or {}).items()), key=lambda kv: -kv[1])}
            for t, v, top in zip(lp.tokens, lp.token_logprobs, tops)]


def _completion(out, text: str | None, logprobs: list[dict] | None) -> Completion:
    usage = out.usage
    return Completion(
        text=text or "",
        finish_reason=out.choices[0].finish_reason or "stop",
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        logprobs=logprobs,
    )
