"""What every engine shares: the completion type, the sampler, stop strings, and the text-and-stream layer of the
in-process engines over an HF tokenizer. Engines import this module, never the package (whose ``open_engine``
imports them)."""

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


def log_softmax(x):
    """Log-probabilities from logits along the last axis (numpy; shift by the maximum first)."""
    import numpy as np

    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


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


class TokenLoop:
    """What an in-process engine over an HF tokenizer shares, given its ``_tokens(ids, max_tokens, temperature,
    top_p, seed, stop)`` generator (token ids, the stop token included when reached): text in and out, greedy
    and sampled streams, completions. onnxruntime and onnxruntime-genai differ only in how they make tokens."""

    tokenizer = None
    eos_ids: set[int] = set()

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token's text as log-probs name it: special tokens by their name, no clean-up of spaces."""
        return self.tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def chat_text(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int] | None = None) -> list[int]:
        """Greedy continuation token ids (the stop token included when reached)."""
        return list(self._tokens(ids, max_new_tokens, 0.0, 1.0, None, self.eos_ids if stop_ids is None else stop_ids))

    def stream(self, ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None):
        """Sampled (greedy at temperature 0) token ids until end of turn (not yielded) or ``max_tokens``."""
        for tok in self._tokens(ids, max_tokens, temperature, top_p, seed, self.eos_ids):
            if tok in self.eos_ids:
                return
            yield tok

    def complete(self, text: str, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list[str] | None = None) -> Completion:
        ids = self.tokenize(text)
        new = list(self._tokens(ids, max_tokens, temperature, top_p, seed, self.eos_ids))
        finished = bool(new) and new[-1] in self.eos_ids
        body, cut = cut_at_stop(self.detokenize(new[:-1] if finished else new), stop or [])
        return Completion(text=body, finish_reason="stop" if finished or cut else "length",
                          prompt_tokens=len(ids), completion_tokens=len(new))

    def chat(self, messages: list[dict], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None) -> Completion:
        return self.complete(self.chat_text(messages), max_tokens, temperature, top_p, seed)
