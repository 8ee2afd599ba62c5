"""What a task's definition allows a served answer to be: for a ``label`` task exactly one of its labels, for a
``json`` task with ``keys`` a JSON object with those keys. Written as llama.cpp grammars (GBNF text, or a JSON
Schema that llama-cpp-python converts) from the recipe's ``tasks:`` section, never from a task's name."""

from __future__ import annotations


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
