"""Teacher/serving engines behind one small interface: ``chat(messages, ...) -> Completion``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


def open_engine(ref, backend: str = "auto", *, n_ctx: int = 2048, threads: int | None = None, seed: int = 0):
    """Pick the engine for a resolved model reference."""
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
        return OpenAIEngine(ref.base_url, ref.model)
    raise ValueError(f"unknown backend '{backend}'")
