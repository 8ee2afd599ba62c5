"""Any OpenAI-compatible server as a teacher (vLLM, TGI, llama-server, a frontier API).

The API key is read from the environment (DISTILLERY_API_KEY or OPENAI_API_KEY), never from a recipe.
"""

from __future__ import annotations

import os

from toolchain.backends import Completion


class OpenAIEngine:
    def __init__(self, base_url: str, model: str, timeout: float = 120.0):
        from openai import OpenAI

        key = os.environ.get("DISTILLERY_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=3)
        self.model = model

    def chat(self, messages: list[dict], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None) -> Completion:
        out = self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            seed=seed,
        )
        return _completion(out, out.choices[0].message.content)

    def complete(self, text: str, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list[str] | None = None) -> Completion:
        out = self.client.completions.create(
            model=self.model, prompt=text, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            seed=seed, stop=stop or None,
        )
        return _completion(out, out.choices[0].text)

    def close(self) -> None:
        self.client.close()


def _completion(out, text: str | None) -> Completion:
    usage = out.usage
    return Completion(
        text=text or "",
        finish_reason=out.choices[0].finish_reason or "stop",
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
    )
