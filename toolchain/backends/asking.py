"""Asking a model many prompts: the one loop generate, synthesize and the judge share.

``Pool`` opens the model a recipe names (the teacher, or a judge) with generate's endpoint options, and asks it
``generate.concurrency`` requests at once for an ``openai:`` endpoint, one at a time for a local engine. Three
strategies, each a named function of what is asked:

- ``Pool.in_arrival_order``: answers are handed on as they land (generate: written in arrival order, put back in
  job order afterwards); the first failure stops new requests, the answers in flight still land, then it is raised,
  so a re-run asks only for what is missing;
- ``Pool.map`` over ``windows``: a window of jobs asked at once, the results in job order, so decisions taken in
  that order do not depend on the concurrency (synthesize);
- ``batched_greedy``: llama.cpp decoding ``generate.batch`` greedy chat answers together, in fixed groups so a
  resumed run decodes every prompt beside the same others.

``AnswerLog`` is the resumable JSONL the answers go to: the rows a killed run left (a partial last line cut off)
and a durable appender for the new ones.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

from toolchain.backends import endpoint_options, open_engine
from toolchain.backends.base import Completion
from toolchain.data.rows import JsonlAppender, read_jsonl_resumable
from toolchain.models.references import resolve
from toolchain.recipe import Recipe

BATCH_GROUP = 64  # prompts per batched group: how much a resumed run may decode again


class Pool:
    """A model asked up to ``workers`` requests at once (``generate.concurrency`` for an endpoint, else 1)."""

    def __init__(self, cfg: Recipe, seed: int, ref: str | None = None, backend: str | None = None,
                 key: tuple[str | None, str] | None = None):
        """``ref``: another model than the teacher (a judge), with ``key``: (the variable naming its API key, the
        recipe field that names it); the teacher's is generate.api_key_env."""
        g = cfg.generate
        self.ref = resolve(ref or cfg.teacher)
        self.endpoint = self.ref.kind == "openai"
        options = endpoint_options(g)
        if key is not None:
            options.update(api_key_env=key[0], key_field=key[1])
        self.engine = open_engine(self.ref, backend or g.backend, n_ctx=g.n_ctx, threads=g.threads, seed=seed,
                                  endpoint=options if self.endpoint else None)
        self.workers = g.concurrency if self.endpoint else 1
        self._pool = ThreadPoolExecutor(self.workers)

    def map(self, ask: Callable, jobs: Iterable) -> list:
        """``ask`` of every job, up to ``workers`` at once; the results in job order."""
        return list(self._pool.map(ask, jobs))

    def in_arrival_order(self, ask: Callable, jobs: Iterable, on_answer: Callable) -> None:
        """``on_answer(ask(job))`` for every job as each answer lands (``in_arrival_order``)."""
        in_arrival_order(self._pool, self.workers, ask, jobs, on_answer)

    def stats(self) -> dict | None:
        """An endpoint's request, retry and failure counts (None for a local engine)."""
        return getattr(self.engine, "stats", None)

    def close(self) -> None:
        self._pool.shutdown()
        self.engine.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def in_arrival_order(pool: ThreadPoolExecutor, workers: int, ask: Callable, jobs: Iterable,
                     on_answer: Callable) -> None:
    """``on_answer(ask(job))`` for every job as each answer lands, ``workers`` in flight. The first failure stops
    new requests; the answers already in flight are still handed on, then the failure is raised."""
    queue, failure = iter(jobs), None
    running = {pool.submit(ask, job) for job in islice(queue, workers)}
    while running:
        finished, running = wait(running, return_when=FIRST_COMPLETED)
        for fut in finished:
            try:
                answer = fut.result()
            except Exception as err:
                failure = failure or err
                continue
            on_answer(answer)
        if failure is None:
            running |= {pool.submit(ask, job) for job in islice(queue, workers - len(running))}
    if failure is not None:
        raise failure


def windows(jobs: Iterable, size: int, wanted: Callable = lambda job: True) -> Iterator[list]:
    """The next ``size`` jobs still ``wanted`` (asked again before each window: what was kept meanwhile counts)."""
    jobs = iter(jobs)
    while window := list(islice((job for job in jobs if wanted(job)), size)):
        yield window


def batched_greedy(engine, jobs: list, todo: list, messages: Callable, max_new_tokens: int, slots: int,
                   keep=None) -> Iterator[tuple]:
    """(job, Completion, kept) for greedy chat answers decoded ``slots`` at a time, as each finishes: the tokens
    and text one request would give (chat template, stop at end of turn), but for near ties; ``kept``: ``keep``
    of the logits each answer token (and the stop token) was chosen from.

    Which prompts share a batch changes float rounding, so the jobs are cut into fixed groups of BATCH_GROUP in
    job order, and a group with any answer missing is decoded whole again: a resumed run then decodes every
    prompt beside the same others as an uninterrupted run, and gives the same tokens."""
    missing = {(p.id, s) for p, s in todo}
    for start in range(0, len(jobs), BATCH_GROUP):
        group = jobs[start:start + BATCH_GROUP]
        if not any((p.id, s) in missing for p, s in group):
            continue
        prompts = [engine.tokenize(engine.chat_text(messages(job))) for job in group]
        for i, toks, kept in engine.greedy_stream(prompts, max_new_tokens, slots=slots, keep=keep):
            if (group[i][0].id, group[i][1]) not in missing:
                continue
            stopped = bool(toks) and toks[-1] in engine.eos_ids
            answer = toks[:-1] if stopped else toks
            c = Completion(text=engine.detokenize(answer), finish_reason="stop" if stopped else "length",
                           prompt_tokens=len(prompts[i]), completion_tokens=len(answer))
            yield group[i], c, (prompts[i], toks, kept)


class AnswerLog:
    """A resumable JSONL of answers: ``rows`` a killed run left, ``done`` their keys, ``write`` appends durably."""

    def __init__(self, path: Path, key: Callable[[dict], object]):
        self.path, self.rows = path, read_jsonl_resumable(path)
        self.done = {key(r) for r in self.rows}
        self._sink: JsonlAppender | None = None

    def write(self, row: dict) -> None:
        self._sink.write(row)

    def __enter__(self) -> AnswerLog:
        self._sink = JsonlAppender(self.path)
        return self

    def __exit__(self, *exc) -> None:
        self._sink.close()
