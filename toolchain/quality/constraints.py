"""What a task's definition allows a served answer to be: for a ``label`` task exactly one of its labels, for a
``json`` task with ``keys`` a JSON object with those keys. Written as llama.cpp grammars (GBNF text, or a JSON
Schema that llama-cpp-python converts) from the recipe's ``tasks:`` section, never from a task's name."""

from __future__ import annotations

from toolchain.models.chat import context, messages_for
from toolchain.quality.metrics import check
from toolchain.quality.stats import mcnemar


def _gbnf_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def label_grammar(labels: list[str]) -> str:
    """GBNF: the answer is one of ``labels``, nothing before or after."""
    return "root ::= " + " | ".join(_gbnf_literal(label) for label in labels) + "\n"


def task_constraints(specs: dict[str, dict]) -> dict[str, tuple[str, object]]:
    """task -> (kind, definition) for the engine's ``grammar(kind, definition)``; tasks whose metric has no
    shape to enforce (exact, contains, keywords, ...) have none."""
    out: dict[str, tuple[str, object]] = {}
    for task, spec in specs.items():
        if spec["metric"] == "label" and spec.get("labels"):
            out[task] = ("gbnf", label_grammar(spec["labels"]))
        elif spec["metric"] == "json" and spec.get("keys"):
            keys = spec["keys"]
            out[task] = ("json_schema", {"type": "object", "required": keys, "properties": {k: {} for k in keys}})
    return out


def free_and_constrained(engine, specs: dict[str, dict], rows: list[dict], system_prompt: str | None,
                         max_tokens: int, bare: bool = False) -> dict[str, dict]:
    """Every held-out row with a gold answer of a task that has a constraint, answered greedily twice through the
    engine ``distillery serve`` uses (``engine.stream``): free, and under the task's constraint. Per task: n, and
    per mode the answers' correctness (``right``, by the task's metric), accuracy, tokens and decode tokens/s (the
    tokens after each answer's first, so prompt time is left out); the McNemar test between the modes."""
    import time


    out: dict[str, dict] = {}
    for task, (kind, definition) in task_constraints(specs).items():
        todo = [r for r in rows if r["task"] == task and r.get("gold") is not None]
        if not todo:
            continue
        grammar = engine.grammar(kind, definition)
        modes = {m: {"right": [], "tokens": 0, "seconds": 0.0, "decode_tokens": 0, "decode_s": 0.0}
                 for m in ("free", "constrained")}
        for r in todo:
            messages = messages_for(r["prompt"], system_prompt, {} if bare else context(r))
            ids = engine.tokenize(engine.chat_text(messages))
            for mode, m in modes.items():
                extra = {"grammar": grammar} if mode == "constrained" else {}
                start, first, toks = time.perf_counter(), None, []
                for tok in engine.stream(ids, max_tokens, **extra):
                    toks.append(tok)
                    first = first or time.perf_counter()
                end = time.perf_counter()
                m["tokens"] += len(toks)
                m["seconds"] += end - start
                if first is not None and len(toks) > 1:
                    m["decode_tokens"] += len(toks) - 1
                    m["decode_s"] += end - first
                m["right"].append(bool(check(specs[task], engine.detokenize(toks), r["gold"])))
        for m in modes.values():
            m["accuracy"] = sum(m["right"]) / len(m["right"])
            m["decode_tokens_per_s"] = m["decode_tokens"] / m["decode_s"] if m["decode_s"] else None
        free, con = modes["free"]["decode_tokens_per_s"], modes["constrained"]["decode_tokens_per_s"]
        out[task] = {"n": len(todo), "kind": kind, **modes,
                     "speed_ratio": con / free if free and con else None,
                     # one-sided: is the constrained answer worse than the free one?
                     "mcnemar": mcnemar(modes["free"]["right"], modes["constrained"]["right"])}
    return out
