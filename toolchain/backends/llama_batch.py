"""Several sequences decoded together in one llama.cpp context (continuous batching): the server's busy
requests, and batch jobs (generate's teacher answers, export's held-out scoring).

Decoding the next token of S sequences in one ``llama_decode`` call reads the weights once for all S. On 2 CPU
cores with the embedded 135M teacher, 8 sequences stepped together decode ~1.9x the tokens/s of one
(``python benchmarks/batch_decode.py``), each at a quarter of one stream's pace; through the server with its
HTTP and prompt work, 4 requests together measured 0.55–0.75x one stream's tokens/s each (``bench.concurrency``).

Each sequence has a slot (a llama.cpp sequence id) in one shared KV cache. A new sequence's prompt is
evaluated on its own (prefill), then every step decodes one token for every live sequence. Sampling happens
here, on the logits llama.cpp returns for each sequence (argmax at temperature 0).

For a batch job ``greedy_stream`` keeps every slot busy: a finished sequence leaves and the next prompt takes
its slot; ``logits_stream`` reads likelihood requests several to a decode.
"""

from __future__ import annotations

import ctypes
from collections import deque
from collections.abc import Iterator

import numpy as np

from toolchain.models.chat import common_prefix

BATCH_TOKENS = 512  # tokens one llama_decode takes (at least one per slot)


def logits_row(L, ctx, i: int, n_vocab: int) -> np.ndarray:
    """A copy of the logits llama.cpp computed for token ``i`` of the last decode's batch (its position in the
    batch, which must have asked for logits; -1: the last output)."""
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

        n_ctx = -(-n_ctx // 256) * 256  # llama.cpp pads a context to 256; per slot, so the total divides evenly
        self.L, self.slots, self.n_ctx = L, slots, n_ctx
        model = engine.llm._model.model
        params = L.llama_context_params.from_buffer_copy(engine.llm.context_params)  # same attention, KV types
        params.n_ctx = n_ctx * slots
        params.n_batch = params.n_ubatch = max(slots, BATCH_TOKENS)
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

    # -- a prefix every prompt shares (system prompt, chat header) ---------------------------------------------
    def share_prefix(self, prompts: list[list[int]], least: int = 8) -> int:
        """Read the tokens every prompt starts with once, into a slot of its own, and copy that slot's cache
        into each new sequence (``copy_prefix``) instead of reading them again: with a chat template, a third
        or more of a short prompt. Takes a free slot of its own; the prefix length (0: none worth sharing)."""

        prefix = common_prefix(prompts)[: min(len(p) for p in prompts) - 1] if len(prompts) > 1 else []
        if len(prefix) < least or len(self.free_slots) < 2:
            return 0
        self.prefix_slot = self.free_slots.pop(0)  # the highest slot id: acquire() hands out the lowest first
        self.prefill(self.prefix_slot, prefix)
        self.prefix_len = len(prefix)
        return self.prefix_len

    def copy_prefix(self, seq: int) -> int:
        """The shared prefix's cache into slot ``seq``; the position its own tokens start at."""
        self.L.llama_memory_seq_cp(self.mem, self.prefix_slot, seq, -1, -1)
        return self.prefix_len

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


def greedy_stream(decoder: BatchDecoder, prompts: list[list[int]], max_new_tokens: int, stop: set[int],
                  keep=None) -> Iterator[tuple[int, list[int], list]]:
    """Greedy continuations of ``prompts`` decoded together (continuous batching over the decoder's slots):
    yields (index of the prompt, its tokens, kept) as each sequence finishes, the stop token included when
    reached; ``kept`` is ``keep(rows)`` of the [tokens, vocab] logits each token was chosen from, called once
    per sequence (a top-k over all rows at once: 0.1 ms a row instead of 0.85 one by one, measured on a 49k
    vocabulary), or [] without ``keep``.

    Each ``llama_decode`` carries the next token of every live sequence and the whole prompt of every sequence
    that just took a free slot (as many as fit the batch), so prompts are read in batches too. The same inputs
    give the same batches, so the same tokens; against one prompt decoded alone, tokens may differ only where
    float rounding of another batch shape moves a near tie."""
    pending = deque(enumerate(prompts))
    live: dict[int, tuple[int, list[int], int, list]] = {}  # slot -> (prompt index, tokens, prompt length, kept)

    def chosen(row: np.ndarray, kept: list) -> int:
        if keep is not None:
            kept.append(row)
        return int(np.argmax(row))

    shared = decoder.share_prefix(prompts)
    while pending or live:
        rows, wants = [], []  # batch rows; the slot of each row that asks for logits, in row order
        for slot in sorted(live):
            _, toks, n, _ = live[slot]
            rows.append((slot, toks[-1], n + len(toks) - 1, True))
            wants.append(slot)
        admitted = {}
        while pending and decoder.free_slots and (not rows or len(rows) + len(pending[0][1]) <= decoder.chunk):
            i, ids = pending.popleft()
            if max_new_tokens <= 0:
                yield i, [], []
                continue
            slot = decoder.acquire()
            if len(ids) > decoder.chunk:  # longer than a batch: read on its own, in chunks
                kept: list = []
                admitted[slot] = (i, chosen(decoder.prefill(slot, ids), kept), len(ids), kept)
                continue
            start = decoder.copy_prefix(slot) if shared else 0
            rows += [(slot, t, j, j == len(ids) - 1) for j, t in enumerate(ids[start:], start)]
            wants.append(slot)
            admitted[slot] = (i, None, len(ids), [])
        if rows:
            fill(decoder.batch, rows)
            logits = decoder._decode([k for k, row in enumerate(rows) if row[3]])  # by position in the batch
            for slot, row in zip(wants, logits):
                if slot in admitted:
                    i, _, n, kept = admitted[slot]
                    admitted[slot] = (i, chosen(row, kept), n, kept)
                else:
                    live[slot][1].append(chosen(row, live[slot][3]))
        for slot, (i, tok, n, kept) in admitted.items():
            live[slot] = (i, [tok], n, kept)
        for slot in [s for s, (_, toks, n, _) in live.items()
                     if toks[-1] in stop or len(toks) >= max_new_tokens or n + len(toks) >= decoder.n_ctx]:
            i, toks, _, kept = live.pop(slot)
            decoder.release(slot)
            yield i, toks, keep(np.stack(kept)) if keep is not None else []


def logits_stream(decoder: BatchDecoder, seqs: list[tuple[list[int], int]]) -> Iterator[tuple[int, np.ndarray]]:
    """For each (token ids, start): the logits at positions start-1 .. len-2 (those that predict ids[start:]),
    as [len - start, vocab], yielded (index, logits) as each sequence is read. Several sequences go into one
    ``llama_decode`` and the prefix they all share is read once; logits are computed only where asked."""
    shared = decoder.share_prefix([ids[:start] for ids, start in seqs])
    pending = deque(enumerate(seqs))
    while pending:
        rows, members = [], []  # (index, slot, its first logits row in this decode, how many)
        while pending and decoder.free_slots:
            i, (ids, start) = pending[0]
            if rows and len(rows) + len(ids) - shared > decoder.chunk:
                break
            pending.popleft()
            slot = decoder.acquire()
            begin = decoder.copy_prefix(slot) if shared else 0
            first = sum(m[3] for m in members)
            rows += [(slot, t, j, start - 1 <= j < len(ids) - 1) for j, t in enumerate(ids[begin:], begin)]
            members.append((i, slot, first, len(ids) - start))
        fill(decoder.batch, rows)
        logits = decoder._decode([k for k, row in enumerate(rows) if row[3]])
        for i, slot, first, n in members:
            decoder.release(slot)
            yield i, np.stack(logits[first:first + n]) if n else np.zeros((0, decoder.n_vocab), np.float32)
