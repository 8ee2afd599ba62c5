"""The cascade of ``distillery serve`` (``serve.route: cascade``) and its shadow mode (``serve.shadow``): which
calls the student keeps, from the thresholds eval chose on its calibration prompts (or the recipe's own), and the
record a call answered upstream leaves in the traffic store (the upstream's answer with the student's beside it).

A call's task is the one it names (``X-Distillery-Task``, ``metadata.task``), else ``serve.task``, else the only task
the rules know. A call of a task without a rule (no gold answers to choose a threshold on, or no task at all) is
forwarded: the student keeps only what it was measured to be sure of.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

from toolchain.backends.openai_http import api_key
from toolchain.data.traffic import Recorder, TrafficStore, store_path
from toolchain.pipeline.plans import finished
from toolchain.quality import cascade
from toolchain.recipe import Recipe, RecipeError
from toolchain.serve.targets import task_specs
from toolchain.serve.upstream import Upstream, parse_upstream


@dataclass(frozen=True)
class Rule:
    score: str  # which confidence (toolchain.quality.confidence)
    threshold: float  # kept when the confidence is at or above it (inf: never)

    def keeps(self, confidence: dict | None) -> bool:
        return confidence is not None and confidence.get(self.score, 0.0) >= self.threshold

    def as_dict(self) -> dict:
        return {"score": self.score, "threshold": None if math.isinf(self.threshold) else self.threshold}


def rules(cfg: Recipe, eval_report: dict | None, tasks: list[str]) -> dict[str | None, Rule]:
    """Each task's rule: the recipe's fixed ``serve.cascade.score``/``threshold`` for every call (``None``: one that
    names no task), else the row ``serve.cascade.target`` of eval's cascade table (RecipeError in one line naming
    the field when the finished eval cannot give it)."""
    c, e = cfg.serve.cascade, cfg.eval.cascade
    if c.threshold is not None:
        return {name: Rule(c.score, c.threshold) for name in [*tasks, None]}
    if c.target not in e.targets:
        raise RecipeError(f"serve.cascade.target: {c.target:g} is not one of eval.cascade.targets "
                          f"({', '.join(f'{t:g}' for t in e.targets)})")
    table = cascade.from_eval(eval_report or {}, e.targets, e.calibration, e.seed, cfg.eval.gate_level, e.rule)
    if table is None:
        raise RecipeError("serve.cascade: the finished eval has no cascade table to take thresholds from (no held-out "
                          "task with gold answers, or an eval from before confidences were measured); set "
                          "serve.cascade.score and serve.cascade.threshold")
    row = next(r for r in table["targets"] if r["target"] == c.target)
    return {task: Rule(table["tasks"][task]["score"], threshold) for task, threshold in row["thresholds"].items()}


@dataclass
class Routing:
    """What a server that routes is started with (``toolchain.serve.app.create_app``)."""

    route: str
    shadow: float
    rules: dict
    labels: dict
    upstream: Upstream | None
    recorder: Recorder | None


def open_routing(cfg: Recipe, runs_root, engine, active: bool = True) -> Routing:
    """serve.route / serve.shadow of the recipe, ready to serve: the rules (eval's finished table unless the
    recipe fixes a threshold), each label task's labels, the upstream client and the store's writer. Not
    ``active`` (a teacher being served): no routing."""
    s = cfg.serve
    if not active or (s.route != "cascade" and s.shadow == 0):
        return Routing("student", 0.0, {}, {}, None, None)
    specs = task_specs(cfg)  # the prompt files read once
    labels = {name: spec["labels"] for name, spec in specs.items() if spec.get("labels")}
    rules_ = {}
    if s.route == "cascade":
        report = None
        if s.cascade.threshold is None:
            report = json.loads((finished(cfg, runs_root, "eval") / "eval.json").read_text(encoding="utf-8"))
        rules_ = rules(cfg, report, sorted(specs))
        if any(r.score == "label" for r in rules_.values()) and not hasattr(engine, "continuation_logprob"):
            raise RecipeError("serve.route: a label task's confidence (serve.cascade.score: label) is measured on the "
                              "llama_cpp backend only; serve with --backend llama_cpp or fix serve.cascade.score")
    reference = s.upstream_of(cfg.teacher)
    base_url, model = parse_upstream(reference)
    key_env = s.upstream_key_env or (cfg.generate.api_key_env if reference == cfg.teacher else None)
    key = api_key(base_url, key_env, field="serve.upstream_key_env")
    recorder = Recorder(TrafficStore(store_path(s.store))) if s.store else None
    return Routing(s.route, s.shadow, rules_, labels, Upstream(base_url, model, key), recorder)


def rule_for(rules_: dict[str | None, Rule], task: str | None) -> Rule | None:
    """The rule a call of ``task`` is routed by (the only task's when the call names none and there is one)."""
    if task in rules_:
        return rules_[task]
    named = [k for k in rules_ if k is not None]
    return rules_[named[0]] if task is None and len(named) == 1 else None


def decision(task: str | None, rule: Rule | None, confidence: dict | None, kept: bool) -> dict:
    """What a response says of its routing (the ``distillery`` field; the OpenAI client ignores it)."""
    out = {"answered_by": "student" if kept else "upstream", "task": task}
    if rule is not None:
        out |= {**rule.as_dict(), "confidence": (confidence or {}).get(rule.score)}
    return out


def record(endpoint: str, started: float, t0: float, request: dict, stream: bool, task: str | None, tag,
           upstream: str, student: dict, answered_by: str, shadowed: bool, status: int, response: dict | None,
           error: str | None, usage: tuple) -> dict:
    """A call answered upstream as a traffic-store row (toolchain.data.traffic): the upstream's answer is the
    call's ``response``, the student's answer and confidence its ``student``."""
    prompt, cached, completion = usage
    return {"call_id": f"call-{uuid.uuid4().hex[:24]}", "started_at": started,
            "latency_ms": round((time.perf_counter() - t0) * 1000, 3), "endpoint": endpoint, "status": status,
            "stream": int(stream), "model": request.get("model"), "upstream": upstream,
            "upstream_model": (response or {}).get("model"), "task_tag": task,
            "user_tag": tag if isinstance(tag, str) else None, "request": request, "response": response,
            "prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": completion, "error": error,
            "answered_by": answered_by, "student": student, "shadow": int(shadowed)}
