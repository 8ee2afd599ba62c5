"""transformers on torch: works for any local model, the reference for parity checks."""

from __future__ import annotations

import torch

from toolchain.backends.base import Completion, cut_at_stop
from toolchain.models.references import load_tokenizer, load_torch_model


class HFEngine:
    def __init__(self, ref, threads: int | None = None, model=None, tokenizer=None):
        if threads:
            torch.set_num_threads(threads)
        self.tok = tokenizer or load_tokenizer(ref)
        self.model = model or load_torch_model(ref)

    def chat(self, messages: list[dict], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None) -> Completion:
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        return self._generate(ids, max_tokens, temperature, top_p, seed)

    def complete(self, text: str, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list[str] | None = None) -> Completion:
        ids = self.tok(text, return_tensors="pt").input_ids
        c = self._generate(ids, max_tokens, temperature, top_p, seed)
        cut, hit = cut_at_stop(c.text, stop or [])
        if not hit:
            return c
        return Completion(cut, "stop", c.prompt_tokens, len(self.tok(cut, add_special_tokens=False).input_ids))

    @torch.inference_mode()
    def _generate(self, ids, max_tokens: int, temperature: float, top_p: float, seed: int | None) -> Completion:
        if seed is not None:
            torch.manual_seed(seed)
        sample = temperature > 0
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=None,
            eos_token_id=self.tok.eos_token_id,
            pad_token_id=self.tok.pad_token_id,
        )
        new = out[0, ids.shape[1]:].tolist()
        stopped = bool(new) and new[-1] == self.tok.eos_token_id
        if stopped:
            new = new[:-1]
        return Completion(
            text=self.tok.decode(new, skip_special_tokens=True),
            finish_reason="stop" if stopped else "length",
            prompt_tokens=ids.shape[1],
            completion_tokens=len(new) + int(stopped),
        )

    def close(self) -> None:
        pass
