"""Teacher/serving engines behind one small interface.

    chat(messages, max_tokens, temperature, top_p, seed) -> Completion      chat-templated turn
    complete(text, max_tokens, temperature, top_p, seed, stop) -> Completion raw text (base models)
"""

from __future__ import annotations

from toolchain.backends.base import Completion, TokenLoop, cut_at_stop, pick  # noqa: F401 (the engines' interface)
from toolchain.backends.llama_cpp import LlamaCppEngine
from toolchain.backends.openai_http import OpenAIEngine


def endpoint_options(g) -> dict:
    """OpenAIEngine options from the recipe's generate section (timeouts, retries, rate, key variable)."""
    return {"timeout_s": g.timeout_s, "max_retries": g.max_retries, "requests_per_minute": g.requests_per_minute,
            "api_key_env": g.api_key_env, "logprobs": g.logprobs}


def open_engine(ref, backend: str = "auto", *, n_ctx: int = 2048, threads: int | None = None, seed: int = 0,
                endpoint: dict | None = None):
    """Pick the engine for a resolved model reference (``endpoint``: OpenAIEngine options for openai:)."""
    if backend == "auto":
        backend = {"gguf": "llama_cpp", "hf_dir": "hf", "openai": "openai"}[ref.kind]
    if backend == "llama_cpp":
        if ref.kind != "gguf":
            raise ValueError(f"{ref.ref}: the llama_cpp backend needs a .gguf model")
        return LlamaCppEngine(ref.path, n_ctx=n_ctx, threads=threads, seed=seed)
    if backend == "hf":
        from toolchain.backends.hf import HFEngine

        return HFEngine(ref, threads=threads)
    if backend == "openai":
        if ref.kind != "openai":
            raise ValueError(f"{ref.ref}: the openai backend needs an openai:<base_url>#<model> reference")
        return OpenAIEngine(ref.base_url, ref.model, **(endpoint or {}))
    raise ValueError(f"unknown backend '{backend}'")
