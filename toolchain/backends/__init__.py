"""Teacher/serving engines behind one small interface.

    chat(messages, max_tokens, temperature, top_p, seed) -> Completion      chat-templated turn
    complete(text, max_tokens, temperature, top_p, seed, stop) -> Completion raw text (base models)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    # Per answer token, when asked for and the engine gives them: {"token", "logprob", "top": [[token, logprob], ...]}
    logprobs: list[dict] | None = None


def pick(logits, temperature: float, top_p: float, rng) -> int:
    """Argmax at temperature 0; otherwise a sample from the tempered distribution cut to its top-p mass."""
    import numpy as np

    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(len(p), p=p))


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string (engines that cannot stop on strings themselves)."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


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
        from toolchain.backends.llama_cpp import LlamaCppEngine

        if ref.kind != "gguf":
            raise ValueError(f"{ref.ref}: the llama_cpp backend needs a .gguf model")
        return LlamaCppEngine(ref.path, n_ctx=n_ctx, threads=threads, seed=seed)
    if backend == "hf":
        from toolchain.backends.hf import HFEngine

        return HFEngine(ref, threads=threads)
    if backend == "openai":
        from toolchain.backends.openai_http import OpenAIEngine

        if ref.kind != "openai":
            raise ValueError(f"{ref.ref}: the openai backend needs an openai:<base_url>#<model> reference")
        return OpenAIEngine(ref.base_url, ref.model, **(endpoint or {}))
    raise ValueError(f"unknown backend '{backend}'")
