"""The tasks in an application's traffic: logged calls grouped by what they ask, and what each group's calls look
like (how many, how long, what their answers are).

A call's task is, in order:
  1. its tag (``metadata.task`` or the ``X-Distillery-Task`` header, as the gateway recorded it);
  2. its instructions: the system/developer messages and the few-shot turns before its last user message.
     Instructions that are near-duplicates of each other (MinHash, Jaccard ≥ ``NEAR``: a date, a user's name
     or a product list that changes) are one task;
  3. for calls whose whole instruction is in the one message (a template filled with the input), the fixed
     wording around what varies, found across the calls as ``synthesize fill`` finds it in seed prompts;
  4. anything else is ``unsorted``.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from toolchain.data.rows import DataError
from toolchain.data.similarity import NearDuplicates, frames, words
from toolchain.data.traffic import TrafficStore

NEAR = 0.8
MAX_LABELS = 50
UNSORTED = "unsorted"
_STOP = {"you", "are", "a", "an", "the", "is", "of", "to", "and", "your", "this", "following", "please", "will", "be",
         "as", "in", "for", "with", "on", "that", "it", "i", "me", "my", "must", "should", "only", "each", "given",
         "text", "one", "from", "by", "or", "any", "we", "our", "helpful", "assistant", "answer", "reply", "respond"}


def _text(content) -> str:
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


@dataclass
class Call:
    """One logged call as the parts a task is made of."""

    id: int
    started_at: float
    endpoint: str
    tag: str | None
    model: str | None  # what answered (the upstream's model, else the one asked for)
    system: str | None  # the system/developer messages, joined
    history: list[dict]  # the few-shot turns before the last user message
    text: str  # what varies: the last user message, or a completion's prompt
    answer: str | None
    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int | None
    requested: str | None = None  # the model the application asked for
    upstream: str | None = None  # the upstream's base URL
    task: str = ""

    @property
    def instructions(self) -> str:
        turns = [f"{m['role']}: {m['content']}" for m in self.history]
        return "\n".join(([f"system: {self.system}"] if self.system else []) + turns)


def from_stored(call: dict) -> Call | None:
    """A stored call (toolchain.data.traffic) as a Call; None when it has no usable request or answer."""
    req, resp = call.get("request") or {}, call.get("response") or {}
    choices = resp.get("choices") if isinstance(resp, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    if call["endpoint"] == "chat":
        messages = [m for m in req.get("messages") or [] if isinstance(m, dict)]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        if last is None:
            return None
        system = "\n".join(_text(m.get("content")) for m in messages[:last] if m.get("role") in ("system", "developer"))
        history = [{"role": m["role"], "content": _text(m.get("content"))} for m in messages[:last]
                   if m.get("role") in ("user", "assistant")]
        text = _text(messages[last].get("content"))
        answer = (choice.get("message") or {}).get("content") if choice else None
    else:
        prompt = req.get("prompt")
        text = prompt if isinstance(prompt, str) else prompt[0] if isinstance(prompt, list) and prompt and \
            isinstance(prompt[0], str) else None
        if text is None:
            return None
        system, history, answer = None, [], choice.get("text") if choice else None
    return Call(id=call["id"], started_at=call["started_at"], endpoint=call["endpoint"], tag=call.get("task_tag"),
                model=call.get("upstream_model") or call.get("model"), system=system or None, history=history,
                text=text, answer=answer if isinstance(answer, str) else None, prompt_tokens=call.get("prompt_tokens"),
                cached_tokens=call.get("cached_tokens"), completion_tokens=call.get("completion_tokens"),
                requested=call.get("model"), upstream=call.get("upstream"))


def _name(text: str, taken: set[str]) -> str:
    """A short name from the first content words of a task's instructions, unique among ``taken``."""
    picked = [w for w in words(text) if w not in _STOP and not w.isdigit() and len(w) > 1][:3]
    base = re.sub(r"[^a-z0-9-]+", "-", "-".join(picked)).strip("-") or "task"
    name, k = base, 2
    while name in taken or name == UNSORTED:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


def group(calls: list[Call]) -> dict[str, list[Call]]:
    """Calls by task (see the module's docstring); each call's ``task`` is set. Largest task first."""
    by_key: dict[str, list[Call]] = {}
    tagged: dict[str, list[Call]] = {}
    bare: list[Call] = []
    for c in calls:
        if c.tag:
            tagged.setdefault(c.tag, []).append(c)
        elif c.instructions:
            by_key.setdefault(c.instructions, []).append(c)
        else:
            bare.append(c)
    # near-duplicate instructions are one task: the largest group's wording names it
    near = NearDuplicates(NEAR)
    merged: dict[str, list[Call]] = {}
    for key in sorted(by_key, key=lambda k: -len(by_key[k])):
        into = near.similar(key)
        if into is None:
            near.add(key, key)
            merged[key] = list(by_key[key])
        else:
            merged[into] += by_key[key]
    # one-message templates: the wording shared around what varies
    framed: dict[tuple[str, str], list[Call]] = {}
    unsorted: list[Call] = []
    for c, frame in zip(bare, frames([c.text for c in bare]) if bare else []):
        if frame == ("", ""):
            unsorted.append(c)
        else:
            framed.setdefault(frame, []).append(c)
    taken = set(tagged)
    out = dict(tagged)
    for key, members in merged.items():
        out[_name(re.sub(r"(?m)^(system|user|assistant): ", "", key), taken)] = members
    for (head, tail), members in framed.items():
        out[_name(f"{head} {tail}", taken)] = members
    if unsorted:
        out[UNSORTED] = unsorted
    for name, members in out.items():
        for c in members:
            c.task = name
    return dict(sorted(out.items(), key=lambda kv: (kv[0] == UNSORTED, -len(kv[1]), kv[0])))


def _is_number(v: str) -> bool:
    return re.fullmatch(r"\s*-?\d[\d,]*(\.\d+)?\s*", v) is not None


def _is_json_object(v: str) -> bool:
    try:
        return isinstance(json.loads(v), dict)
    except ValueError:
        return False


def infer_metric(golds: list[str]) -> dict:
    """A task's ``tasks:`` entry from its gold values."""
    distinct = Counter(golds)
    words = max(len(g.split()) for g in golds)
    if 2 <= len(distinct) <= MAX_LABELS and words <= 3 and len(distinct) <= max(2, len(golds) // 2):
        return {"metric": "label", "labels": sorted(distinct)}
    if all(_is_number(g) for g in golds):
        return {"metric": "number"}
    if all(_is_json_object(g) for g in golds):
        return {"metric": "json"}
    if sum(len(g.split()) for g in golds) / len(golds) <= 4:
        return {"metric": "exact"}
    return {"metric": "chrf", "threshold": 50.0}


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {"median": None, "p90": None}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median": statistics.median(ordered), "p90": p90}


@dataclass
class TaskShape:
    """What a task's calls look like."""

    name: str
    calls: int
    tagged: bool
    first: float
    last: float
    prompt_tokens: dict = field(default_factory=dict)
    cached_tokens: dict = field(default_factory=dict)
    completion_tokens: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    answers: dict = field(default_factory=dict)  # the tasks: entry init would write (metric, labels)
    instructions: str = ""
    examples: list = field(default_factory=list)


def _json_keys(answers: list[str]) -> list[str]:
    keys: Counter = Counter()
    for a in answers:
        try:
            keys.update(json.loads(a).keys())
        except (ValueError, AttributeError):
            pass
    return sorted(keys)


def shape(name: str, calls: list[Call]) -> TaskShape:
    answers = [c.answer.strip() for c in calls if c.answer and c.answer.strip()]
    spec = infer_metric(answers) if answers else {}
    if spec.get("metric") == "json":  # the keys the answers carry, for the user to check
        spec = {**spec, "keys": _json_keys(answers)}
    return TaskShape(
        name=name, calls=len(calls), tagged=all(c.tag for c in calls),
        first=min(c.started_at for c in calls), last=max(c.started_at for c in calls),
        prompt_tokens=_quantiles([c.prompt_tokens for c in calls if c.prompt_tokens is not None]),
        cached_tokens=_quantiles([c.cached_tokens or 0 for c in calls if c.prompt_tokens is not None]),
        completion_tokens=_quantiles([c.completion_tokens for c in calls if c.completion_tokens is not None]),
        models=dict(Counter(c.model or "?" for c in calls).most_common()),
        answers=spec,
        instructions=calls[0].instructions[:400], examples=[c.text[:200] for c in calls[:2]],
    )


_SELECTORS = {"task": str, "before": float, "from": float, "until": float}


def parse_selector(source: str, spec: str | None) -> dict:
    """``task=NAME&before=T`` (a traffic source's part after #) as {task, before, from, until}; one line naming the
    source when it is not that."""
    out: dict = {}
    for part in (spec or "").split("&"):
        key, eq, value = part.partition("=")
        if not eq or key not in _SELECTORS:
            raise DataError(f"{source}: expected #task=NAME with &before=, &from=, &until= (Unix seconds); "
                            f"got {part!r}")
        try:
            out[key] = _SELECTORS[key](value)
        except ValueError:
            raise DataError(f"{source}: {key}={value!r} is not a number of seconds") from None
    if "task" not in out:
        raise DataError(f"{source}: name the task (#task=NAME; distillery traffic lists them)")
    return out


def stored_tasks(path, until: float | None = None) -> dict[str, list[Call]]:
    """The tasks of a store's answered calls up to ``until`` (grouped over all of them, so a task's name and
    members do not depend on which part of it is read)."""
    db = TrafficStore(path, readonly=True)
    try:
        stored = [s for s in db.calls(ok_only=True) if until is None or s["started_at"] <= until]
    finally:
        db.close()
    return group([c for c in map(from_stored, stored) if c is not None])


def chat_record(c: Call) -> dict:
    """A call as a chat row: its instructions, its input and the logged answer (the reference, and the gold that
    eval scores against)."""
    messages = ([{"role": "system", "content": c.system}] if c.system else []) + c.history
    messages += [{"role": "user", "content": c.text}, {"role": "assistant", "content": c.answer}]
    return {"id": f"call-{c.id}", "task": c.task, "messages": messages, "gold": c.answer.strip()}


def task_records(source: str, path, spec: str | None) -> Iterator[tuple[str, dict]]:
    """(where, chat row) for every answered call of one task in a traffic store, within the selector's times."""
    sel = parse_selector(source, spec)
    tasks = stored_tasks(path, sel.get("until"))
    if sel["task"] not in tasks:
        known = ", ".join(f"{t} ({len(m)})" for t, m in tasks.items()) or "none"
        raise DataError(f"{source}: no task '{sel['task']}' in {path} (tasks: {known})")
    for c in tasks[sel["task"]]:
        if c.answer is None or not c.answer.strip():
            continue
        if ("before" in sel and c.started_at >= sel["before"]) or ("from" in sel and c.started_at < sel["from"]):
            continue
        yield f"{path}#call {c.id}", chat_record(c)
