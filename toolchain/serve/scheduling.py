"""The engine's worker: one request at a time on its own thread, or several decoded together (continuous
batching on llama.cpp), each request's text events, stop conditions and cost."""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from toolchain.backends.base import log_softmax, pick
from toolchain.backends.llama_batch import BatchDecoder
from toolchain.quality.confidence import from_logprobs, label_share
from toolchain.quality.metrics import first_label
from toolchain.serve.metrics import Metrics
from toolchain.serve.schemas import ChatRequest, RequestError
from toolchain.serve.settings import Settings
from toolchain.serve.text import TextStream


WATCH_INTERVAL_S = 0.5  # how often a watched served file is checked for a replacement


class Job:
    """One request being generated: turns token ids into text events, stops on EOS / stop strings / the token
    budget / a client that went away, and accounts for what it cost. Both runners (one stream at a time, or
    several batched) drive it the same way."""

    def __init__(self, server: "Server", req, ids: list[int], max_tokens: int, emit, grammar=None,
                 task: str | None = None, scored: bool = False):
        self.server, self.req, self.ids, self.max_tokens, self.emit = server, req, ids, max_tokens, emit
        self.task = task  # the task the call is (serve.constrain, the cascade's rule)
        # how sure the model is (a call the cascade routes or shadow mode pairs): each token's log-probability, the
        # two highest probabilities at the first, the text said
        self.chosen: list[float] | None = [] if scored else None
        self.first_two: tuple[float, float] | None = None
        self.said: list[str] = []
        self.temperature = server.s.temperature if req.temperature is None else req.temperature
        self.k = req.logprobs_k()
        self.logprobs = [] if self.k is not None else None
        self.out = TextStream(server.engine, req.stop)
        self.cancel = threading.Event()
        self.n = 0
        self.t_queued = time.perf_counter()
        self.generation = server.generation  # which opening of the served file the prompt was tokenized by
        self.t_start = self.t_first = None
        self.machine_s = 0.0  # this request's share of the engine's time
        self.grammar = grammar  # the engine's constraint (response_format, serve.constrain)
        self.cached = 0  # prompt tokens the engine took from its cache instead of evaluating them
        self.gaps: list[float] = []  # seconds between successive tokens
        self.held, self.t_sent = "", 0.0  # text not yet sent (stream_interval_ms), when text last went out

    def start(self) -> None:
        self.t_start = time.perf_counter()

    def token(self, tok: int, logits) -> bool:
        """Take one generated token (EOS already excluded); True when the request is finished."""
        self.n += 1
        arrived = time.perf_counter()
        if self.t_first is None:
            self.t_first = arrived
        else:
            self.gaps.append(arrived - self.t_last)
        self.t_last = arrived
        if self.logprobs is not None or self.chosen is not None:
            row = logits()
            if self.logprobs is not None:
                self.logprobs.append(self.server.token_logprobs(tok, self.k, row))
            if self.chosen is not None:
                logp = log_softmax(row.astype(np.float64))
                self.chosen.append(float(logp[tok]))
                if self.first_two is None:
                    two = np.exp(np.sort(np.partition(logp, -2)[-2:])[::-1])
                    self.first_two = (float(two[0]), float(two[1]))
        piece = self.out.push(tok)
        self.said.append(piece)
        self.held += piece
        now = time.perf_counter()
        if self.held and now - self.t_sent >= self.server.s.stream_interval_ms / 1000:
            self.emit(("text", self.held))
            self.held, self.t_sent = "", now
        return self.out.stopped or self.cancel.is_set() or self.n >= self.max_tokens

    def finish(self, ended: bool) -> None:
        """``ended``: the model ended its turn (EOS) or a stop string was met, rather than the token budget."""
        finish = "stop" if ended or self.out.stopped else "length"
        tail = self.out.flush()
        self.said.append(tail)
        rest = self.held + tail
        if rest:
            self.emit(("text", rest))
        t_end = time.perf_counter()
        ids, n = self.ids, self.n
        usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n,
                 "prompt_tokens_details": {"cached_tokens": self.cached}}
        cost = self.server.cost(len(ids), n, self.t_queued, self.t_start, self.t_first, t_end, self.machine_s)
        self.server.metrics.add(usage, cost)
        self.server.metrics.observe_gaps(self.gaps)
        confidence = self.server.confidence(self) if self.chosen is not None else None
        self.emit(("done", (finish, usage, cost, self.logprobs, confidence)))

    def fail(self, err: Exception) -> None:
        self.emit(("error", f"{type(err).__name__}: {err}"))


class Server:
    def __init__(self, engine, settings: Settings, watch: Path | None = None, reopen=None):
        """``watch`` and ``reopen``: the served file, re-opened (``reopen(path)`` → engine) when it changes on disk,
        between two requests (one request at a time only)."""
        self.engine, self.s = engine, settings
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.metrics = Metrics(settings.model_id, settings.file)
        self.started = time.time()
        self.batcher = Batcher(self, settings.batch) if settings.batch > 1 and hasattr(engine, "llm") else None
        self.generation = 0  # how many times the served file was re-opened
        if watch is not None and reopen is not None:
            threading.Thread(target=self._watch, args=(Path(watch), reopen), name="watch", daemon=True).start()

    def _watch(self, path: Path, reopen) -> None:
        """Poll the served file; when another file has been renamed over it (``distillery promote``), re-open it on
        the engine's own thread, so the swap falls between two requests and none is dropped."""
        def identity():
            try:
                st = path.stat()
                return st.st_ino, st.st_mtime_ns, st.st_size
            except OSError:
                return None

        seen = identity()
        while True:
            time.sleep(WATCH_INTERVAL_S)
            now = identity()
            if now is not None and now != seen:
                seen = now
                self.worker.submit(self._reopen, path, reopen).result()

    def _reopen(self, path: Path, reopen) -> None:
        try:
            engine = reopen(path)
        except Exception as e:  # a bad file keeps the one being served
            self.metrics.reload("failed")
            print(f"{path}: not re-opened, still serving the previous file ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)
            return
        self.engine = engine
        self.generation += 1
        self.metrics.reload("done")
        print(f"{path}: re-opened (a promoted file); serving it from the next request", file=sys.stderr, flush=True)

    def cost(self, prompt_tokens: int, completion_tokens: int, t_queued: float, t_start: float,
             t_first: float | None, t_end: float, machine_s: float | None = None) -> dict:
        """What the request cost. USD is the request's share of the engine's time (its whole wall time when
        requests run one at a time; with batching, each step's time split over the requests in it)."""
        s = self.s
        wall = t_end - t_start
        machine = wall if machine_s is None else machine_s
        ttft = (t_first or t_end) - t_start
        decode = (
            (completion_tokens - 1) / (t_end - t_first)
            if t_first and completion_tokens > 1 and t_end > t_first
            else None
        )
        usd = machine / 3600 * s.usd_per_hour
        reference = (
            prompt_tokens * s.reference_usd_per_1m_input + completion_tokens * s.reference_usd_per_1m_output
        ) / 1e6
        return {"queue_ms": round((t_start - t_queued) * 1000, 2), "ttft_ms": round(ttft * 1000, 2),
                "wall_ms": round(wall * 1000, 2), "engine_ms": round(machine * 1000, 2),
                "prompt_tokens_per_s": round(prompt_tokens / ttft, 1) if ttft > 0 else None,
                "decode_tokens_per_s": round(decode, 1) if decode else None,
                "usd": usd, "usd_per_1m_output_tokens": usd / completion_tokens * 1e6 if completion_tokens else None,
                "reference_usd": reference, "reference_ratio": usd / reference if reference else None,
                "hardware_usd_per_hour": s.usd_per_hour}

    def prompt_ids(self, req) -> tuple[list[int], str]:
        if isinstance(req, ChatRequest):
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
            ]
            if self.s.system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": self.s.system_prompt})
            try:
                text = self.engine.chat_text(messages)
            except ValueError as e:
                raise RequestError(400, str(e)) from None
        else:
            if req.echo:
                raise RequestError(400, "echo is not supported", param="echo")
            p = req.prompt
            if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
                size = self.engine.vocab_size()
                if any(not 0 <= x < size for x in p):
                    raise RequestError(400, f"prompt: token ids must be in [0, {size})", param="prompt")
                if len(p) > self.s.max_prompt_tokens:
                    raise RequestError(400, f"prompt is {len(p)} tokens; this server takes at most "
                                       f"{self.s.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
                return list(p), ""
            if isinstance(p, list):
                if len(p) != 1:
                    raise RequestError(400, "one prompt per request", param="prompt")
                p = p[0]
            text = p
        ids = self.engine.tokenize(text)
        if not ids:  # nothing to continue from: no engine can start a sequence without a token
            raise RequestError(400, "prompt is empty: send at least one token of text", param="prompt")
        if len(ids) > self.s.max_prompt_tokens:
            raise RequestError(
                400,
                f"prompt is {len(ids)} tokens; this server takes at most {self.s.max_prompt_tokens}",
                param="messages" if isinstance(req, ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        return ids, text

    def max_tokens(self, req) -> int:
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if asked is not None and asked > self.s.max_new_tokens:
            raise RequestError(400, f"max_tokens {asked} is above this server's limit of {self.s.max_new_tokens}",
                               param="max_tokens")
        return asked or self.s.max_new_tokens

    def token_logprobs(self, tok: int, k: int, logits=None) -> dict:
        """The chosen token's log-probability and the k most likely tokens, from the raw logits of this step."""
        z = (self.engine.step_logits() if logits is None else logits).astype(np.float64)
        logp = log_softmax(z)
        top = np.argpartition(-z, k)[:k] if 0 < k < len(z) else np.arange(len(z) if k else 0)
        top = top[np.argsort(-z[top])]
        name = self.engine.token_text
        return {"token": name(tok), "logprob": float(logp[tok]),
                "top_logprobs": [{"token": name(int(t)), "logprob": float(logp[t])} for t in top]}

    def confidence(self, job: Job) -> dict[str, float]:
        """How sure the model was of the answer it just gave (toolchain.quality.confidence, the scores eval
        measured); a label task's ``label`` also, from the engine's likelihood of each label after the prompt."""
        scores = from_logprobs(job.chosen, job.first_two)
        labels = self.s.labels.get(job.task) if job.task else None
        if labels and hasattr(self.engine, "continuation_logprob"):
            named = first_label("".join(job.said), labels)
            totals = [self.engine.continuation_logprob(job.ids, self.engine.tokenize(label)) for label in labels]
            scores["label"] = label_share(totals, labels.index(named) if named in labels else None)
        return scores

    def run_one(self, job: Job) -> None:
        """One request alone on the engine (its own sampler, llama.cpp's KV-cache prefix reuse)."""
        job.start()
        ended = True  # the stream ran out: the model ended its turn
        try:
            if job.generation != self.generation:  # queued before a re-open: tokenized by the file it replaced
                job.ids, _ = self.prompt_ids(job.req)
                job.out = TextStream(self.engine, job.req.stop)
                job.generation = self.generation
            extra = {"grammar": job.grammar} if job.grammar is not None else {}
            for tok in self.engine.stream(job.ids, job.max_tokens, job.temperature, job.req.top_p, job.req.seed,
                                          **extra):
                if job.token(tok, self.engine.step_logits):
                    ended = job.out.stopped
                    break
            job.cached = getattr(self.engine, "cached_tokens", 0)  # set by the engine as the stream began
            job.machine_s = time.perf_counter() - job.t_start
            job.finish(ended)
        except Exception as e:  # an engine failure ends this request, not the server
            job.fail(e)

    def grammar(self, output_format):
        """The engine's compiled constraint for a request's response_format (None for free text); a 400 where
        this engine or this server's settings cannot constrain its output, never a silent 200 in prose."""
        if output_format is None:
            return None
        if not hasattr(self.engine, "grammar"):
            raise RequestError(400, "response_format is not supported by this backend (llama.cpp only)",
                               param="response_format")
        if self.batcher is not None:
            raise RequestError(400, "response_format needs one request at a time (serve.batch: 1)",
                               param="response_format")
        try:
            return self.engine.grammar(*output_format)
        except ValueError as e:
            raise RequestError(400, f"response_format: {e}", param="response_format") from None

    async def generate(self, req, ids: list[int], max_tokens: int, grammar=None, task: str | None = None,
                       scored: bool = False):
        """Yields ("text", piece) as tokens arrive, then ("done", (finish_reason, usage, cost, logprobs or None,
        confidence: the answer's scores when ``scored``, else None))."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(self, req, ids, max_tokens, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), grammar,
                  task, scored)
        self.metrics.waiting += 1
        if self.batcher is not None:
            future = loop.create_future()
            job.emit = _and_resolve(job.emit, loop, future)
            self.batcher.submit(job)
        else:
            future = loop.run_in_executor(self.worker, self.run_one, job)
        try:
            while True:
                kind, value = await events.get()
                yield kind, value
                if kind in ("done", "error"):
                    break
        finally:
            job.cancel.set()
            await asyncio.shield(future)
            self.metrics.waiting -= 1


def _and_resolve(emit, loop, future):
    """An emitter that also completes ``future`` once the job's last event (done or error) is sent."""
    def send(ev):
        emit(ev)
        if ev[0] in ("done", "error"):
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))
    return send


class Batcher:
    """Continuous batching on llama.cpp: up to ``slots`` requests decode together, one token each per step
    (toolchain.backends.llama_batch); a new request joins at the next step after its prompt is evaluated,
    a finished one leaves and frees its slot. Each step's time is shared out over the requests in it."""

    def __init__(self, server: Server, slots: int):
        self.server, self.slots = server, slots
        self.decoder = BatchDecoder(server.engine, slots, server.s.n_ctx_per_slot)
        self.pending: "queue.Queue[Job]" = queue.Queue()
        threading.Thread(target=self._loop, name="batcher", daemon=True).start()

    def submit(self, job: Job) -> None:
        self.pending.put(job)

    def _loop(self) -> None:
        """Admit, step, pick, forever. Whatever a request brings can fail only that request: an exception in its
        prefill or its token pick ends it alone, one in a shared step ends the requests in that step; the loop
        itself never stops (a dead loop would leave every later request waiting for ever)."""
        live: list[list] = []  # [job, slot, last token, position, rng]
        while True:
            try:
                live = self._admit(live)
                if live:
                    live = self._step(live)
            except Exception as e:  # a bug of the loop's own: end what it was doing, keep serving
                for entry in live:
                    self._end(entry, e)
                live = []

    def _admit(self, live: list[list]) -> list[list]:
        while len(live) < self.slots:  # block only when there is nothing to decode
            try:
                job = self.pending.get(block=not live)
            except queue.Empty:
                break
            job.start()
            slot = self.decoder.acquire()
            entry = [job, slot, None, len(job.ids), None]
            try:
                entry[4] = np.random.default_rng(job.req.seed)
                t0 = time.perf_counter()
                logits = self.decoder.prefill(slot, job.ids)
                job.machine_s += time.perf_counter() - t0
                if self._take(entry, logits):
                    live.append(entry)
            except Exception as e:
                self._end(entry, e)
        return live

    def _step(self, live: list[list]) -> list[list]:
        t0 = time.perf_counter()
        try:
            rows = self.decoder.step([(e[1], e[2], e[3]) for e in live])
        except Exception as e:
            for entry in live:
                self._end(entry, e)
            return []
        share = (time.perf_counter() - t0) / len(live)
        kept = []
        for entry, logits in zip(live, rows):
            entry[0].machine_s += share
            entry[3] += 1
            try:
                if self._take(entry, logits):
                    kept.append(entry)
            except Exception as e:
                self._end(entry, e)
        return kept

    def _end(self, entry: list, err: Exception) -> None:
        """A request that failed: its slot back, its client told (once)."""
        if entry[1] is not None:
            self.decoder.release(entry[1])
            entry[1] = None
        entry[0].fail(err)

    def _take(self, entry: list, logits) -> bool:
        """Pick a request's next token; False when the request is finished (and its slot freed)."""
        job = entry[0]
        tok = pick(logits, job.temperature, job.req.top_p, entry[4])
        eos = tok in self.server.engine.eos_ids
        if not eos and not job.token(tok, lambda: logits):
            entry[2] = tok
            return True
        self.decoder.release(entry[1])
        entry[1] = None  # released: a failure after this must not free the slot twice
        job.finish(eos or job.out.stopped)
        return False
