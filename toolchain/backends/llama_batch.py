"""Several sequences decoded together in one llama.cpp context (continuous batching), for the server.

Decoding the next token of S sequences in one ``llama_decode`` call reads the weights once for all S. Where a
single stream is bound by reading the weights (memory bandwidth: many cores, larger models) that multiplies a
busy server's tokens per second; where it is bound by arithmetic it does not: on 2 CPU cores, 4 sequences
together measured 0.55–0.75× one stream's tokens/s (``distillery bench``, ``bench.concurrency``).

Each sequence has a slot (a llama.cpp sequence id) in one shared KV cache. A new sequence's prompt is
evaluated on its own (prefill), then every step decodes one token for every live sequence. Sampling happens
here, on the logits llama.cpp returns for each sequence (argmax at temperature 0).
"""

from __future__ import annotations

import ctypes

import numpy as np


def logits_row(L, ctx, i: int, n_vocab: int) -> np.ndarray:
    """A copy of the logits llama.cpp computed for output ``i`` of the last decode (-1: the last output)."""
    ptr = L.llama_get_logits_ith(ctx, i)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).copy()


def fill(batch, rows: list[tuple[int, int, int, bool]]) -> None:
    """Write (sequence id, token, position, wants logits) rows into a ``llama_batch``."""
    for k, (seq, tok, pos, logits) in enumerate(rows):
        batch.token[k] = tok
        batch.pos[k] = pos
        batch.n_seq_id[k] = 1
        batch.seq_id[k][0] = seq
        batch.logits[k] = logits
    batch.n_tokens = len(rows)


class BatchDecoder:
    def __init__(self, engine, slots: int, n_ctx: int, threads: int | None = None):
        import os

        import llama_cpp as L

        self.L, self.slots, self.n_ctx = L, slots, n_ctx
        model = engine.llm._model.model
        params = L.llama_context_params.from_buffer_copy(engine.llm.context_params)  # same attention, KV types
        params.n_ctx = n_ctx * slots
        params.n_batch = params.n_ubatch = max(slots, 512)
        params.n_seq_max = slots
        params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 1
        params.kv_unified = False  # each request its own n_ctx slice of the cache
        params.no_perf = True
        self.ctx = L.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a batched context")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        self.chunk = params.n_batch
        self.batch = L.llama_batch_init(self.chunk, 0, 1)
        self.free_slots = list(range(slots))[::-1]

    # -- slots ------------------------------------------------------------------------------------------------
    def acquire(self) -> int:
        return self.free_slots.pop()

    def release(self, seq: int) -> None:
        self.L.llama_memory_seq_rm(self.mem, seq, -1, -1)
        self.free_slots.append(seq)

    # -- decoding ---------------------------------------------------------------------------------------------
    def prefill(self, seq: int, ids: list[int]) -> np.ndarray:
        """Evaluate a prompt in slot ``seq`` (in chunks of the batch size); the logits after its last token."""
        if len(ids) >= self.n_ctx:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit a slot of {self.n_ctx}")
        out = None
        for start in range(0, len(ids), self.chunk):
            part = ids[start:start + self.chunk]
            fill(self.batch, [(seq, t, start + j, start + j == len(ids) - 1) for j, t in enumerate(part)])
            out = self._decode([len(part) - 1] if start + len(part) == len(ids) else [])
        return out[0]

    def step(self, live: list[tuple[int, int, int]]) -> list[np.ndarray]:
        """One token for each (slot, token, position): the logits that follow each, in the same order."""
        fill(self.batch, [(seq, tok, pos, True) for seq, tok, pos in live])
        return self._decode(list(range(len(live))))

    def _decode(self, outputs: list[int]) -> list[np.ndarray]:
        rc = self.L.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}): KV cache full or bad batch")
        return [logits_row(self.L, self.ctx, i, self.n_vocab) for i in outputs]

    def close(self) -> None:
        if self.ctx:
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.ctx = None
