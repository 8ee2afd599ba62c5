"""llama.cpp through llama-cpp-python: the fast engine for GGUF teachers and students on CPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from toolchain.artifacts.gguf_io import captured_stderr
from toolchain.backends.base import Completion, log_softmax
from toolchain.backends.llama_batch import BATCH_TOKENS, BatchDecoder, fill, greedy_stream, logits_row, logits_stream


def _whole_pieces(model) -> None:
    """llama-cpp-python (0.3) decodes every token into a 32-byte buffer and drops a longer piece without a word
    (SmolLM2 has 47: a newline and a run of spaces), so generated and served text lost them. The model's
    ``detokenize``, which every text path of the library goes through, is replaced by one that asks again with the
    size llama.cpp says it needs (pieces cached per token)."""
    import ctypes

    import llama_cpp

    pieces: dict[tuple[int, bool], bytes] = {}

    def piece(token: int, special: bool) -> bytes:
        if (token, special) not in pieces:
            size = 32
            while True:
                buf = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_token_to_piece(model.vocab, llama_cpp.llama_token(token), buf, size, 0, special)
                if n >= 0:
                    break
                size = -n
            pieces[token, special] = buf.raw[:n]
        return pieces[token, special]

    def detokenize(tokens: list[int], special: bool = False) -> bytes:
        out = b"".join(piece(int(t), special) for t in tokens)
        # as the library does: a leading space after a beginning-of-sentence token is dropped
        return out[1:] if len(tokens) and tokens[0] == model.token_bos() and out[:1] == b" " else out

    model.detokenize = detokenize


class LlamaCppEngine:
    def __init__(self, path: Path, n_ctx: int = 2048, threads: int | None = None, seed: int = 0,
                 logits_all: bool = False, n_gpu_layers: int = 0):
        from llama_cpp import Llama

        self.path = Path(path)
        self.llm = Llama(
            model_path=str(self.path),
            n_ctx=n_ctx,
            n_threads=threads or os.cpu_count() or 1,
            seed=seed,
            logits_all=logits_all,  # needed for logits() at every position (checks and likelihoods)
            n_gpu_layers=n_gpu_layers,  # layers offloaded to a GPU (a llama.cpp built with one; ignored otherwise)
            verbose=False,
        )
        _whole_pieces(self.llm._model)
        self.eos_ids = {self.llm.token_eos()}
        self._kv: list[int] | None = None  # tokens in the KV cache after a greedy stream (None: unknown)
        self._grammars: dict = {}  # compiled constraints by definition (grammar())
        self._batch = None
        self.draft: LlamaCppEngine | None = None  # attach_draft: speculative greedy streams
        self.draft_max = 0
        self.speculation = {"passes": 0, "drafted": 0, "accepted": 0}

    def attach_draft(self, draft: LlamaCppEngine, draft_max: int) -> None:
        """Greedy streams (``stream`` at temperature 0, no grammar) become speculative: ``draft`` (a model with this
        one's vocabulary, backends/speculative.incompatibility) proposes up to ``draft_max`` tokens, this model
        checks them in one pass and keeps those its own argmax agrees with, plus its next token. The tokens are
        this model's greedy tokens; ``speculation`` counts passes, drafted and accepted tokens."""
        self.draft, self.draft_max = draft, draft_max

    def chat(self, messages: list[dict], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None) -> Completion:
        self._kv = None
        self.cached_tokens = 0
        out = self.llm.create_chat_completion(messages=messages, **_sampling(max_tokens, temperature, top_p, seed))
        return _completion(out, out["choices"][0]["message"]["content"])

    def complete(self, text: str, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list[str] | None = None) -> Completion:
        self._kv = None
        out = self.llm.create_completion(text, stop=stop or None, **_sampling(max_tokens, temperature, top_p, seed))
        return _completion(out, out["choices"][0]["text"])

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenizer (special tokens parsed, no BOS added): what the GGUF itself does."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of ``ids`` [n, vocab] (needs ``logits_all=True``)."""
        self._kv = None
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int] | None = None) -> list[int]:
        """Greedy continuation token ids, argmax over the raw logits (the stop token included when reached);
        the prompt is evaluated afresh, so the same ids always give the same tokens."""
        stop = self.eos_ids if stop_ids is None else stop_ids
        self._kv = None
        out = list(self._greedy(list(ids), max_new_tokens, stop))
        last = int(np.argmax(self.step_logits()))  # what the final step chose: the stop token, if it ended there
        return out + [last] if len(out) < max_new_tokens and last in stop else out

    def greedy_stream(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int] | None = None,
                      slots: int = 8, keep=None) -> Iterator[tuple[int, list[int], list]]:
        """Greedy continuations of many prompts, ``slots`` decoded together (toolchain.backends.llama_batch):
        (prompt index, tokens with the stop token when reached, ``keep`` of the logits each token was chosen
        from, stacked) in the order they finish."""

        if not prompts:
            return
        longest = max(len(p) for p in prompts)
        if longest >= self.llm.n_ctx():
            raise ValueError(f"a prompt of {longest} tokens does not fit the context of {self.llm.n_ctx()}")
        n_ctx = min(self.llm.n_ctx(), longest + max_new_tokens + 1)
        decoder = BatchDecoder(
            self, min(slots, len(prompts)) + 1, n_ctx, threads=self.llm.n_threads
        )  # +1: the shared prefix
        try:
            yield from greedy_stream(
                decoder, prompts, max_new_tokens, self.eos_ids if stop_ids is None else stop_ids, keep
            )
        finally:
            decoder.close()

    def logits_many(self, seqs: list[tuple[list[int], int]], slots: int = 16) -> Iterator[tuple[int, np.ndarray]]:
        """For each (ids, start), the logits that predict ids[start:] ([len - start, vocab]), several sequences
        per decode and their shared prefix read once (toolchain.backends.llama_batch.logits_stream); in the
        order they are read. A sequence longer than one batch is read alone (``logits``)."""

        if not seqs:
            return
        chunk = max(slots + 1, BATCH_TOKENS)  # the decoder's batch
        fits = [k for k, (ids, _) in enumerate(seqs) if len(ids) <= chunk]
        for k, (ids, start) in enumerate(seqs):
            if len(ids) > chunk:
                yield k, self.logits(ids)[start - 1: len(ids) - 1]
        if not fits:
            return
        decoder = BatchDecoder(self, min(slots, len(fits)) + 1, max(len(seqs[k][0]) for k in fits),
                               threads=self.llm.n_threads)
        try:
            for j, logits in logits_stream(decoder, [seqs[k] for k in fits]):
                yield fits[j], logits
        finally:
            decoder.close()

    def greedy_batch(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int] | None = None,
                     ) -> list[list[int]]:
        """``greedy_stream``'s answers in the prompts' order."""
        out: list[list[int]] = [[] for _ in prompts]
        for i, toks, _ in self.greedy_stream(prompts, max_new_tokens, stop_ids):
            out[i] = toks
        return out

    def _end_of_generation(self, tok: int) -> bool:
        """Any end-of-generation token of the vocabulary (a finished grammar allows only those, and a model may
        pick <|endoftext|> rather than its end of turn)."""
        import llama_cpp as L

        return bool(L.llama_vocab_is_eog(self.llm._model.vocab, tok))

    def grammar(self, kind: str, schema: dict | None = None):
        """llama.cpp's grammar for ``json_object`` (any JSON object), ``json_schema`` (llama-cpp-python turns the
        schema into GBNF) or ``gbnf`` (grammar text); compiled once per distinct definition. ValueError for a
        schema it cannot express."""
        import json

        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        key = f"{kind}:{schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)}"
        cache = self._grammars
        if key not in cache:
            try:
                if kind == "gbnf":  # a grammar written by toolchain.quality.constraints
                    cache[key] = LlamaGrammar.from_string(schema, verbose=False)
                elif schema is None:
                    cache[key] = LlamaGrammar.from_string(JSON_GBNF, verbose=False)
                else:
                    cache[key] = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
            except Exception as e:  # the converter raises ValueError / KeyError / RuntimeError on what it lacks
                raise ValueError(f"this JSON Schema cannot be turned into a grammar ({type(e).__name__})") from None
            if len(cache) > 64:
                cache.pop(next(iter(cache)))
        return cache[key]

    def stream(self, ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, grammar=None) -> Iterator[int]:
        """Sampled (or, at temperature 0, greedy) token ids until end of turn or ``max_tokens``; the end-of-turn
        token is not yielded. The KV cache of the longest prefix shared with the last call is reused."""
        if temperature <= 0 and grammar is None:
            yield from (self._speculative if self.draft else self._greedy)(list(ids), max_tokens)
            return
        self._kv = None
        self.cached_tokens = 0
        if seed is not None:
            self.llm.set_seed(seed)
        count = 0
        for tok in self.llm.generate(list(ids), temp=temperature, top_p=top_p, top_k=0 if temperature > 0 else 1,
                                     min_p=0.0, reset=True, grammar=grammar):
            if tok in self.eos_ids or count >= max_tokens or self._end_of_generation(tok):
                return
            yield tok
            count += 1
            if count >= max_tokens:
                return

    def _greedy(self, ids: list[int], max_tokens: int, stop: set[int] | None = None) -> Iterator[int]:
        """Greedy decoding straight on llama.cpp's context: one ``llama_decode`` and one argmax per token, without
        llama-cpp-python's per-token sampler and bookkeeping (measured: the same tokens, less time per token)."""
        self._prime(ids)
        for _ in range(max_tokens):
            tok = int(np.argmax(self.step_logits()))
            if tok in (self.eos_ids if stop is None else stop):
                return
            yield tok
            if len(self._kv) + 1 >= self.llm.n_ctx():
                return
            self._decode([tok])

    def _speculative(self, ids: list[int], max_tokens: int) -> Iterator[int]:
        """``_greedy`` with the attached draft's proposals checked a batch at a time (``attach_draft``)."""
        import llama_cpp as L

        ctx, n_vocab, stop = self.llm._ctx.ctx, self.llm.n_vocab(), self.eos_ids
        self._prime(ids)
        tok, produced = int(np.argmax(self.step_logits())), 0
        while tok not in stop:
            yield tok
            produced += 1
            room = self.llm.n_ctx() - len(self._kv) - 2
            if produced >= max_tokens or room < 1:
                return
            proposal = list(self.draft._greedy(self._kv + [tok], min(self.draft_max, max_tokens - produced, room),
                                               stop))
            base = len(self._kv)
            self._decode([tok, *proposal], every=True)
            accepted = 0
            while accepted < len(proposal) and \
                    int(np.argmax(logits_row(L, ctx, accepted, n_vocab))) == proposal[accepted]:
                accepted += 1
            nxt = int(np.argmax(logits_row(L, ctx, accepted, n_vocab)))
            L.llama_memory_seq_rm(L.llama_get_memory(ctx), 0, base + 1 + accepted, -1)  # the rejected drafts
            del self._kv[base + 1 + accepted:]
            self.speculation["passes"] += 1
            self.speculation["drafted"] += len(proposal)
            self.speculation["accepted"] += accepted
            for d in proposal[:accepted]:
                yield d
                produced += 1
                if produced >= max_tokens:
                    return
            tok = nxt

    def _prime(self, ids: list[int]) -> None:
        """Evaluate ``ids`` reusing the KV cache of the longest prefix shared with what it holds; the logits of
        the last token are then ``step_logits()``."""
        import llama_cpp as L

        ctx = self.llm._ctx.ctx
        kv = self._kv or []
        common = 0
        while common < min(len(kv), len(ids) - 1) and kv[common] == ids[common]:
            common += 1
        L.llama_memory_seq_rm(L.llama_get_memory(ctx), 0, common, -1)
        self.cached_tokens = common  # prompt tokens reused from the last request (/metrics, usage)
        self.llm.n_tokens = 0  # llama-cpp-python's own record of the cache no longer holds; it starts afresh
        self._kv = ids[:common]
        self._decode(ids[common:])

    def continuation_logprob(self, ids: list[int], continuation: list[int]) -> float:
        """The log-probability of ``continuation`` after ``ids`` (the sum over its tokens, from the raw logits);
        the prompt's cache is shared with the request that just ran on it."""
        self._prime(list(ids))
        total = 0.0
        for k, tok in enumerate(continuation):
            total += float(log_softmax(self.step_logits().astype(np.float64))[tok])
            if k + 1 < len(continuation):
                self._decode([tok])
        return total

    def _decode(self, tokens: list[int], every: bool = False) -> None:
        """Evaluate ``tokens`` after what the cache holds (in chunks of n_batch); logits for the last one (``every``:
        for each, read by their index in the batch; one batch then)."""
        import llama_cpp as L


        n_batch = self.llm.n_batch
        if self._batch is None:
            self._batch = L.llama_batch_init(n_batch, 0, 1)
        b = self._batch
        for start in range(0, len(tokens), n_batch):
            part = tokens[start:start + n_batch]
            fill(b, [(0, tok, len(self._kv) + k, every or start + k == len(tokens) - 1) for k, tok in enumerate(part)])
            if L.llama_decode(self.llm._ctx.ctx, b) != 0:
                self._kv = None
                raise RuntimeError("llama_decode failed (context full?)")
            self._kv.extend(part)

    def step_logits(self) -> np.ndarray:
        """The logits after the last evaluated token: while ``stream`` runs, those the token just yielded was
        sampled from. Read from the context (``Llama.scores`` is only filled with ``logits_all``)."""
        import llama_cpp


        return logits_row(llama_cpp, self.llm._ctx.ctx, -1, self.llm.n_vocab())

    def vocab_size(self) -> int:
        return self.llm.n_vocab()

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        """One token's text as log-probs name it: special tokens by their name (as vLLM and HF tokenizers do)."""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def chat_text(self, messages: list[dict]) -> str:
        """The GGUF's own chat template (``tokenizer.chat_template``) applied to ``messages``."""
        return _chat_text(self.llm, self.path, messages)

    def close(self) -> None:
        if self._batch is not None:
            import llama_cpp as L

            L.llama_batch_free(self._batch)
            self._batch = None
        self.llm.close()


def _chat_text(llm, path: Path, messages: list[dict]) -> str:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError(f"{path.name} has no chat template; use /v1/completions")
    formatter = Jinja2ChatFormatter(template, eos_token=llm.detokenize([llm.token_eos()]).decode(),
                                    bos_token=llm.detokenize([llm.token_bos()]).decode())
    return formatter(messages=messages).prompt


class LlamaVocab:
    """A GGUF's tokenizer alone (no weights): the tokens llama.cpp itself makes of a text, which is what the model
    saw in generate; a Hugging Face tokenizer rebuilt from the GGUF can cut differently (Gemma-3's splits words
    into letters)."""

    def __init__(self, path: Path):
        from llama_cpp import Llama

        self.path = Path(path)
        with captured_stderr():  # llama.cpp warns that a vocabulary-only context has no training context
            self.llm = Llama(model_path=str(self.path), vocab_only=True, verbose=False)
        _whole_pieces(self.llm._model)

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """Special tokens written in the text are parsed; ``add_special``: the start-of-text token the GGUF asks
        for, if any."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    def piece(self, token: int) -> bytes:
        """The bytes one token spells (empty for a control token)."""
        return self.llm.detokenize([token])

    def __len__(self) -> int:
        return self.llm.n_vocab()

    @property
    def eos_id(self) -> int:
        return self.llm.token_eos()

    def chat_text(self, messages: list[dict]) -> str:
        return _chat_text(self.llm, self.path, messages)

    def close(self) -> None:
        self.llm.close()


def _sampling(max_tokens: int, temperature: float, top_p: float, seed: int | None) -> dict:
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
            "top_k": 0 if temperature > 0 else 1, "seed": seed}


def _completion(out: dict, text: str | None) -> Completion:
    choice = out["choices"][0]
    return Completion(
        text=text or "",
        finish_reason=choice["finish_reason"] or "stop",
        prompt_tokens=out["usage"]["prompt_tokens"],
        completion_tokens=out["usage"]["completion_tokens"],
    )
