"""generate: the teacher answers the recipe's prompts (and, for soft-label, its top-k distributions).

Inputs: the recipe's prompt files (train + held-out) and the teacher model.
Outputs:
    responses.jsonl  every teacher answer, append-only: id, split, sample, task, prompt, gold, response,
                     finish_reason, prompt_tokens, completion_tokens (+ answer, verified for reasoning; + the
                     teacher's log-likelihood of a held-out answer, teacher_logprob and teacher_greedy, where a
                     llama.cpp teacher answered in batches)
    train.jsonl      the training pairs kept: non-empty answers that stopped on their own (reasoning: and
                     whose final answer matches the gold answer)
    heldout.jsonl    the teacher's answers to the held-out prompts (the reference the student is compared to)
    teacher_topk.*   soft-label with a cache: the teacher's top-k log-probs at every response position of
                     train.jsonl (see toolchain.training.topk_cache)

Resume: answers already in responses.jsonl (from a killed run) are kept and their prompts are not asked
again; a partial last line is cut off. Sampling seeds depend on (seed, prompt id, sample index), not on
order, and batched greedy decoding works through fixed groups of prompts, so a resumed run gives the same data
as an uninterrupted one. The cache resumes the same way.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from toolchain.backends import Completion, asking
from toolchain.data.formats import load_prompts, read_prompts
from toolchain.data.rows import JsonlAppender, iter_jsonl, read_jsonl_resumable, write_jsonl
from toolchain.models.chat import (
    context,
    encode_pair,
    final_answer,
    flat_prompt,
    messages_for,
    tokenize_pairs,
    with_instruction,
)
from toolchain.models.references import load_tokenizer, load_torch_model, resolve
from toolchain.pipeline.plans import PLANS, external_inputs
from toolchain.pipeline.runs import Manifest, canonical, read_manifest, semantic_config
from toolchain.quality.metrics import answers_match, check
from toolchain.recipe import Recipe
from toolchain.training.topk_cache import TopKWriter, example_key, teacher_topk, topk_logprobs
from toolchain.ui import console, progress


def _sample_seed(seed: int, pid: str, sample: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{pid}:{sample}".encode()).digest()[:4], "little")


def answer_row(cfg: Recipe, job, c: Completion, source: str) -> dict:
    """One line of responses.jsonl: the prompt's fields, its answer and where the answer came from."""
    p, s = job
    row = {
        "id": p.id, "split": p.split, "sample": s, "task": p.task, "prompt": p.prompt, "gold": p.gold, **p.extras(),
        "response": c.text.strip(), "finish_reason": c.finish_reason, "source": source,
        "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
    }
    if cfg.distill.flavour == "reasoning":
        row["answer"] = final_answer(row["response"], cfg.reasoning.answer_pattern)
        row["verified"] = None if p.gold is None or row["answer"] is None else answers_match(row["answer"], p.gold)
    return row


def _given_answers(cfg: Recipe, jobs: list) -> tuple[list, list[dict], int]:
    """generate.answers: the jobs left for the teacher, the rows answered from the data's reference answers,
    and how many prompts have neither (``reference``: they are left out)."""
    mode = cfg.generate.answers
    if mode == "teacher":
        return jobs, [], 0
    ask, given, without = [], [], 0
    for p, s in jobs:
        if p.reference is not None and p.reference.strip():
            if s == 0:  # one reference per prompt, whatever generate.n
                given.append(answer_row(cfg, (p, s), Completion(p.reference, "stop", 0, 0), "reference"))
        elif mode == "reference_else_teacher":
            ask.append((p, s))
        else:
            without += s == 0
    return ask, given, without


def _ask_teacher(cfg: Recipe, jobs, out_path: Path) -> dict:
    """Ask for every (prompt, sample) not yet in responses.jsonl; one line per answer, appended as it arrives
    (toolchain.backends.asking): an openai: teacher up to generate.concurrency at once, a local llama.cpp teacher
    answering greedily in its chat template generate.batch prompts together, other local engines one at a time.
    A request that fails for good stops the stage after the answers already received are written, so a re-run
    asks only for the rest. Returns this call's throughput figures."""
    g = cfg.generate
    reasoning = cfg.distill.flavour == "reasoning"
    log = asking.AnswerLog(out_path, key=lambda r: (r["id"], r["sample"]))
    todo = [(p, s) for p, s in jobs if (p.id, s) not in log.done]
    if log.done:
        console.print(f"  resuming: {len(log.done)} answers kept from the interrupted run, {len(todo)} to go")
    if not todo:
        return {}
    pool = asking.Pool(cfg, seed=g.seed)
    engine = pool.engine

    def asked(p) -> str:
        return with_instruction(p.prompt, cfg.reasoning.instruction if reasoning else None)

    def row_for(job, c: Completion) -> dict:
        row = answer_row(cfg, job, c, "teacher")
        if c.logprobs is not None:
            row["logprobs"] = c.logprobs
        return row

    def ask(job) -> dict:
        p, s = job
        sampling = {"max_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
                    "seed": _sample_seed(g.seed, p.id, s)}
        if g.prompt_template:
            c = engine.complete(g.prompt_template.replace("{prompt}", flat_prompt(asked(p), context(p))), stop=g.stop,
                                **sampling)
        else:
            c = engine.chat(messages_for(asked(p), g.system_prompt, context(p)), **sampling)
        return row_for(job, c)

    batched = g.batch > 1 and g.temperature == 0 and not g.prompt_template and hasattr(engine, "greedy_stream")
    steps = _Decoded(cfg, out_path.parent, engine, cache=not reasoning and _cache_wanted(cfg)) if batched else None
    started, new_tokens, stats = time.time(), 0, pool.stats()
    with log, progress() as bar:
        task = bar.add_task("generate", total=len(jobs), completed=len(log.done), info="")

        def land(row: dict) -> None:
            nonlocal new_tokens
            log.write(row)
            new_tokens += row["completion_tokens"]
            retried = f" · {stats['retries']} retries" if stats and stats["retries"] else ""
            bar.update(task, advance=1, info=f"{new_tokens / max(time.time() - started, 1e-9):.0f} tok/s{retried}")

        try:
            if batched:
                def messages(job) -> list[dict]:
                    return messages_for(asked(job[0]), g.system_prompt, context(job[0]))

                for job, c, decoded in asking.batched_greedy(engine, jobs, todo, messages, g.max_new_tokens, g.batch,
                                                             steps.keep):
                    extra = steps.add(job, asked(job[0]), c, decoded)  # before the answer is written: its cache rows
                    land({**row_for(job, c), **extra})
            else:
                pool.in_arrival_order(ask, todo, land)
        finally:
            pool.close()
            if steps:
                steps.close()
                if steps.writer and steps.skipped:
                    console.print(f"  top-k from the teacher's own decoding: {steps.skipped} answers tokenize "
                                  "otherwise in training; their top-k comes from a teacher pass")
    wall = time.time() - started
    console.print(f"  teacher: {new_tokens} tokens in {wall:.0f}s ({new_tokens / max(wall, 1e-9):.0f} tok/s"
                  + (f", {pool.workers} in flight, {stats['retries']} retries)" if pool.endpoint else ")"))
    out = {"teacher_wall_s": round(wall, 2), "teacher_tokens_per_s": round(new_tokens / max(wall, 1e-9), 2)}
    if pool.endpoint:
        out.update(endpoint_concurrency=pool.workers, endpoint_requests=stats["requests"],
                   endpoint_retries=stats["retries"], endpoint_failures=dict(stats["failures"]))
    return out


class _Decoded:
    """What generate keeps of the logits llama.cpp chose each greedy answer token from (no second teacher pass):
    - held-out answers: the teacher's log-likelihood of its own answer (``teacher_logprob``, and whether it is
      its greedy continuation, ``teacher_greedy``), which eval reports as the teacher's perplexity without
      loading the teacher again: from the decoding where the answer tokenizes as lm-eval tokenizes it
      (context, then context + answer, HF tokenizer), else from a llama.cpp pass over lm-eval's tokens;
    - with a soft-label top-k cache, the teacher's top-k at every training answer position, where the training
      sequence distill builds (HF chat template + answer + end of turn) is token for token the prompt and
      tokens llama.cpp decoded; the others are left to ``_write_topk_cache``.
    """

    def __init__(self, cfg: Recipe, out_dir: Path, engine, cache: bool):
        soft = cfg.distill.soft
        self.tok = load_tokenizer(resolve(cfg.teacher))
        self.system, self.engine = cfg.generate.system_prompt, engine
        self.k, self.t = min(soft.top_k, len(self.tok)), soft.temperature
        self.writer = TopKWriter(out_dir, self.k, self.t, len(self.tok)) if cache else None
        self.skipped = 0

    def keep(self, rows: np.ndarray) -> tuple[torch.Tensor, tuple | None]:
        """Per row: the log-probability of the greedy (arg-max) token at temperature 1, and the top-k."""
        x = torch.from_numpy(rows).double()
        chosen = x.max(dim=-1).values - torch.logsumexp(x, dim=-1)
        return chosen, topk_logprobs(x, self.k, self.t) if self.writer else None

    def add(self, job, asked: str, c: Completion, decoded) -> dict:
        """The row's extra fields (held-out: its likelihood); a training answer's top-k goes to the cache."""
        p, s = job
        prompt_ids, toks, (chosen, top) = decoded
        if p.split != "train":
            return self._likelihood(asked, context(p), c, prompt_ids, toks, chosen)
        key = example_key({"id": p.id, "sample": s})
        if self.writer is None or c.finish_reason != "stop" or key in self.writer.done:
            return {}
        ids, labels = encode_pair(self.tok, p.prompt, c.text.strip(), self.system, context(p))
        if ids != prompt_ids + toks or len(top[0]) != len(toks):
            self.skipped += 1
            return {}
        self.writer.append(key, top[0], top[1].float())
        return {}

    def _likelihood(self, asked: str, ctx: dict, c: Completion, prompt_ids: list[int], toks: list[int], chosen) -> dict:
        response = c.text.strip()
        if not response:
            return {}
        text = self.tok.apply_chat_template(messages_for(asked, self.system, ctx), tokenize=False,
                                            add_generation_prompt=True)
        start = len(self.tok(text, add_special_tokens=False).input_ids)
        whole = self.tok(text + response, add_special_tokens=False).input_ids
        answer = toks[:-1] if c.finish_reason == "stop" else toks
        if whole == prompt_ids + answer and start == len(prompt_ids):
            return {"teacher_logprob": round(float(chosen[: len(answer)].sum()), 6), "teacher_greedy": True}
        from toolchain.quality.lm_adapter import continuation_logprob

        _, logits = next(self.engine.logits_many([(whole, start)]))
        logprob, greedy = continuation_logprob(logits, whole[start:])
        return {"teacher_logprob": round(logprob, 6), "teacher_greedy": greedy}

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _endpoint_cost(cfg: Recipe, rows: list[dict]) -> dict:
    """What an openai: teacher's answers cost at the endpoint's price."""
    g, c = cfg.generate, cfg.cost
    usd_in = c.reference_api_usd_per_1m_input if g.usd_per_1m_input is None else g.usd_per_1m_input
    usd_out = c.reference_api_usd_per_1m_output if g.usd_per_1m_output is None else g.usd_per_1m_output
    prompt = sum(r["prompt_tokens"] for r in rows)
    answer = sum(r["completion_tokens"] for r in rows)
    return {"prompt_tokens": prompt, "endpoint_usd": round(prompt * usd_in / 1e6 + answer * usd_out / 1e6, 6),
            "endpoint_usd_per_1m_input": usd_in, "endpoint_usd_per_1m_output": usd_out}


DROP_FIXES = {
    "empty": "the teacher answered nothing: check generate.system_prompt (or generate.prompt_template)",
    "truncated": "answers ran past generate.max_new_tokens ({max_new_tokens}): raise it, add a generate.stop, or ask "
                 "for a shorter answer in the prompt (a one-word task whose teacher writes sentences)",
    "no_answer": "no final answer matched reasoning.answer_pattern: loosen it, or make reasoning.instruction say "
                 "how to write the answer",
    "wrong_answer": "the teacher's final answer disagrees with the gold: a stronger teacher, or "
                    "generate.answers: reference when the data has the answers",
    "unverifiable": "rows without a gold answer cannot be checked: add gold answers or set "
                    "reasoning.keep_without_gold: true",
    "rejected": "the task's metric rejects the teacher's answer (generate.keep: pass): check tasks.<task> (metric, "
                "labels), use generate.answers: reference, or a stronger teacher",
}


def _keep(cfg: Recipe, rows: list[dict]) -> tuple[list[dict], dict[str, int], list[tuple[str, dict]]]:
    """Training pairs worth learning from, why the others were dropped (counts), and the dropped rows."""
    reasoning = cfg.distill.flavour == "reasoning"
    passing = cfg.generate.keep == "pass" and not reasoning  # reasoning already checks its final answers
    specs = cfg.task_specs([r for r in rows if r["split"] == "train"]) if passing else {}
    kept, dropped = [], []
    why = {"empty": 0, "truncated": 0, "no_answer": 0, "wrong_answer": 0, "unverifiable": 0, "rejected": 0}
    for r in rows:
        if r["split"] != "train":
            continue
        reason = None
        if not r["response"]:
            reason = "empty"
        elif r["finish_reason"] != "stop":
            reason = "truncated"
        elif reasoning and r["answer"] is None:
            reason = "no_answer"
        elif reasoning and r["gold"] is not None and not r["verified"]:
            reason = "wrong_answer"
        elif reasoning and r["gold"] is None and not cfg.reasoning.keep_without_gold:
            reason = "unverifiable"
        elif passing and r.get("source") == "teacher" and not _passes(specs[r["task"]], r):
            reason = "rejected"
        if reason:
            why[reason] += 1
            dropped.append((reason, r))
        else:
            kept.append(r)
    if reasoning:
        instr = cfg.reasoning.instruction if cfg.reasoning.train_with_instruction else None
        kept = [{**r, "train_prompt": with_instruction(r["prompt"], instr)} for r in kept]
    return kept, why, dropped


def _passes(spec: dict, row: dict) -> bool:
    """generate.keep: pass: the teacher's answer against the row's gold (else its reference) by the task's metric;
    a row with neither is kept."""

    want = row["gold"] if row["gold"] is not None else row.get("reference")
    return want is None or spec["metric"] == "judge" or check(spec, row["response"], want)


def explain_drops(cfg: Recipe, answered: int, dropped: list[tuple[str, dict]]) -> list[str]:
    """Lines for the console when more than 10 % of the training answers were dropped: the count, three
    examples, and the recipe field that fixes the most common reason."""
    if not answered or len(dropped) <= 0.1 * answered:
        return []
    counts: dict[str, int] = {}
    for reason, _ in dropped:
        counts[reason] = counts.get(reason, 0) + 1
    top = max(counts, key=counts.get)
    lines = [f"{len(dropped)} of {answered} training answers dropped ({len(dropped) / answered:.0%}); mostly "
             f"{top.replace('_', ' ')} ({counts[top]}). Fix: " + DROP_FIXES[top].format(
                 max_new_tokens=cfg.generate.max_new_tokens)]
    for reason, r in [x for x in dropped if x[0] == top][:3]:
        answer = r["response"].replace("\n", " ")
        lines.append(f"  {r['id']} [{r['task']}] {reason.replace('_', ' ')}: {answer[:100]!r}"
                     + (f" (gold {r['gold']!r})" if r["gold"] is not None else ""))
    return lines


def _cache_wanted(cfg: Recipe) -> bool:
    return cfg.distill.flavour == "soft" and cfg.distill.soft.teacher_logits == "cache"


def _write_topk_cache(cfg: Recipe, out_dir: Path) -> dict:
    """Top-k log-probs at temperature T per response position of the kept pairs: those the teacher's batched
    decoding wrote as it answered (``_StepCache``), and a teacher forward pass for the rest."""
    soft = cfg.distill.soft
    ref = resolve(cfg.teacher)
    if ref.kind == "openai":
        return _endpoint_topk_cache(cfg, out_dir)
    tok = load_tokenizer(ref)
    rows = [r for _, r in iter_jsonl(out_dir / "train.jsonl")]
    pairs, source, _ = tokenize_pairs(tok, rows, cfg.generate.system_prompt, None)
    writer = TopKWriter(out_dir, min(soft.top_k, len(tok)), soft.temperature, len(tok))
    todo = [(pairs[i], rows[source[i]]) for i in range(len(pairs)) if example_key(rows[source[i]]) not in writer.done]
    if todo:
        teacher = load_torch_model(ref)
        started, n_pos = time.time(), 0
        with progress() as bar:
            task = bar.add_task("teacher top-k", total=len(pairs), completed=len(pairs) - len(todo), info="")
            for (ids, labels), row in todo:
                top, vals = teacher_topk(teacher, ids, labels, writer.k, soft.temperature)
                writer.append(example_key(row), top, vals)
                n_pos += len(top)
                bar.update(task, advance=1, info=f"{n_pos / max(time.time() - started, 1e-9):.0f} pos/s")
    writer.close()
    return {"topk_k": writer.k, "topk_positions": writer.rows, "topk_bytes_per_position": writer.bytes_per_position}


def _endpoint_topk_cache(cfg: Recipe, out_dir: Path) -> dict:
    """The top-k cache from the log-probs an openai: teacher returned with its answers (generate.logprobs), its
    token strings mapped to ids with the student's tokenizer (the teacher's, or the same one padded): soft-label
    from a teacher that never enters training memory. What could not be mapped is counted in the manifest."""
    from toolchain.training.topk_cache import EndpointTopK, target_positions

    soft = cfg.distill.soft
    tok = load_tokenizer(resolve(cfg.student.from_))
    rows = [r for _, r in iter_jsonl(out_dir / "train.jsonl")]
    pairs, source, _ = tokenize_pairs(tok, rows, cfg.generate.system_prompt, None)
    mapper = EndpointTopK(tok, soft.top_k)
    writer = TopKWriter(out_dir, soft.top_k, soft.temperature, len(tok), padded=True)
    for (_, labels), i in zip(pairs, source):
        if example_key(rows[i]) not in writer.done:
            trained = [labels[t + 1] for t in target_positions(labels)]  # the cache's positions, in order
            writer.append(example_key(rows[i]), *mapper.rows(trained, rows[i].get("logprobs")))
    writer.close()
    c = mapper.counts
    if c["positions"]:
        console.print(f"  endpoint log-probs: {c['from_endpoint']} of {c['positions']} positions; "
                      f"{c['end_of_turn']} end-of-turn and {c['unaligned']} unaligned positions train on the answer's "
                      f"token alone; {c['short_rows']} rows had fewer than k={soft.top_k}; "
                      f"{c['unmapped_tokens']} token strings did not map, {c['ambiguous_tokens']} were ambiguous")
    return {"topk_k": writer.k, "topk_positions": writer.rows, "topk_bytes_per_position": writer.bytes_per_position,
            **{f"topk_endpoint_{k}": v for k, v in c.items()}}


def _reuse_answers(cfg: Recipe, out_dir: Path, out_path: Path) -> None:
    """Seed a fresh run with the answers of a finished generate run that asked the same teacher the same
    prompts with the same settings and differs only in the top-k cache (hard-label first, soft-label next:
    the teacher is not asked again). The usual resume path then keeps them."""

    if out_path.exists():
        return

    def answers_only(config: dict) -> dict:  # compared as stage keys compare them (speed-only fields left out)
        return json.loads(canonical(semantic_config({k: v for k, v in config.items() if k != "topk"})))

    want = answers_only(PLANS["generate"].config(cfg))
    digests = {k: d for k, (d, _) in external_inputs(cfg, "generate").items()}
    for sibling in sorted(out_dir.parent.parent.glob("generate-*"), reverse=True):
        if sibling.name == out_dir.name:  # this very stage, forced to run again: the teacher is asked again
            continue
        try:
            m = read_manifest(sibling, verify=False)
        except Exception:
            continue
        if answers_only(m.get("config", {})) == want and m.get("inputs") == digests:
            shutil.copyfile(sibling / "responses.jsonl", out_path)
            console.print(f"  reusing the teacher's answers from {sibling.name} (same prompts and settings)")
            return


def run(cfg: Recipe, inputs: dict[str, Path], out_dir: Path) -> Manifest:
    g = cfg.generate
    train, heldout = load_prompts(cfg)
    if "synthesize" in inputs:  # the teacher's new prompts, after the seeds

        train += read_prompts([str(inputs["synthesize"] / "prompts.jsonl")], "train")
    jobs = [(p, s) for p in train for s in range(g.n)] + [(p, 0) for p in heldout]
    out_path = out_dir / "responses.jsonl"
    _reuse_answers(cfg, out_dir, out_path)
    ask, given, without = _given_answers(cfg, jobs)
    if given:
        done = {(r["id"], r["sample"]) for r in read_jsonl_resumable(out_path)}
        with JsonlAppender(out_path) as sink:
            for row in given:
                if (row["id"], row["sample"]) not in done:
                    sink.write(row)
        console.print(f"  {len(given)} answers from the data's reference answers"
                      + (f"; {without} prompts without one left out" if without else ""))
    speed = _ask_teacher(cfg, ask, out_path)

    rows = read_jsonl_resumable(out_path)
    order = {(p.id, s): i for i, (p, s) in enumerate(jobs)}
    rows = [r for r in rows if (r["id"], r["sample"]) in order]
    rows.sort(key=lambda r: order[(r["id"], r["sample"])])  # same file order whatever the interruptions
    write_jsonl(out_path, rows)

    kept, why, dropped = _keep(cfg, rows)
    write_jsonl(out_dir / "train.jsonl", kept)
    write_jsonl(out_dir / "heldout.jsonl", [r for r in rows if r["split"] == "heldout"])
    summary = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in why.items() if n) or "none"
    console.print(f"  kept {len(kept)} training pairs; dropped: {summary}")
    for line in explain_drops(cfg, sum(r["split"] == "train" for r in rows), dropped):
        console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True,
                      style=None if line.startswith(" ") else "yellow")
    sources = {s: sum(r.get("source", "teacher") == s for r in rows) for s in ("teacher", "reference")}
    metrics = {
        "prompts_train": len(train), "prompts_heldout": len(heldout), "answers": len(rows), "kept": len(kept),
        "answers_teacher": sources["teacher"], "answers_reference": sources["reference"],
        "prompts_without_reference": without, "heldout_fraction": cfg.data.heldout_fraction,
        **{f"dropped_{k}": n for k, n in why.items()},
        "completion_tokens": sum(r["completion_tokens"] for r in rows), **speed,
    }
    if "synthesize" in inputs:  # what the new prompts went through, for eval's report
        synth = read_manifest(inputs["synthesize"], verify=False)["metrics"]
        metrics["synthetic"] = {**synth, "method": cfg.synthesize.method,
                                "decontaminate_ngram": cfg.synthesize.decontaminate_ngram,
                                "decontaminate_threshold": cfg.synthesize.decontaminate_threshold}
    if cfg.teacher.startswith("openai:"):
        metrics.update(_endpoint_cost(cfg, rows))
        console.print(
            f"  at the endpoint's price: ${metrics['endpoint_usd']:.4f} for {metrics['prompt_tokens']} prompt "
            f"+ {metrics['completion_tokens']} answer tokens"
        )
    if cfg.distill.flavour == "reasoning":
        graded = [r for r in rows if r["split"] == "train" and r["gold"] is not None]
        metrics["teacher_traces_correct"] = sum(bool(r.get("verified")) for r in graded)
        metrics["teacher_traces_graded"] = len(graded)
        console.print(f"  teacher traces correct: {metrics['teacher_traces_correct']}/{len(graded)}")
    if _cache_wanted(cfg) and kept:
        metrics.update(_write_topk_cache(cfg, out_dir))
        console.print(f"  top-k cache: {metrics['topk_positions']} positions, "
                      f"{metrics['topk_bytes_per_position']} bytes/position (k={metrics['topk_k']})")
    return Manifest(metrics=metrics, seeds={"generate": g.seed})
