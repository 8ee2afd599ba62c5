"""Gold-answer scoring by the metric each task declares in the recipe (``tasks:``); no task name means anything here.

    exact     the answer, trimmed of surrounding quotes, spaces and end punctuation, equals the gold
              (case- and accent-insensitive): an echo of the input or an answer in a sentence is wrong
    contains  the gold appears in the answer, word-bounded, case- and accent-insensitive; a gold of one or two
              characters (a symbol, a unit) must match its case, so "he" is not helium's "He"
    label     the first of the task's labels the answer names (word-bounded, case-insensitive) is the gold
    number    the last number in the answer equals the gold within ``tolerance`` (relative, at least 1e-6)
    keywords  every ';'-separated keyword of the gold appears in the answer (as ``contains``); '|' separates
              alternatives within one keyword ("Maria; bakery|bread")
    regex     the task's ``pattern`` finds a match in the answer whose group 1 (the whole match without a group)
              equals the gold as ``exact`` compares
    json      the answer is JSON (a ```json fence around it is allowed) and, for the task's ``keys`` (every key
              of the gold without them), equals the gold's values; strings compare as ``exact`` does
    chrf      chrF of the answer against the gold reaches the task's ``threshold`` (0-100)
    judge     not checked per answer: a judge model compares the student's answer with the teacher's
              (toolchain.quality.judge, run by the eval stage)

Any metric takes ``max_words``: a longer answer is wrong, so copying the input back cannot pass a summary.
"""

from __future__ import annotations

import re
import unicodedata

METRICS = ("exact", "contains", "label", "number", "keywords", "regex", "json", "chrf", "judge")
_TRIM = " \t\n\"'`“”‘’«».,;:!?*"


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", text.lower()).strip()


def contains(answer: str, gold: str) -> bool:
    gold = gold.strip()
    if len(gold) <= 2:  # a symbol or abbreviation: its case is what tells it from a word
        return re.search(r"(?<![A-Za-z0-9])" + re.escape(gold) + r"(?![a-z0-9])", answer) is not None
    a, g = normalise(answer), normalise(gold)
    return re.search(r"(?<![a-z0-9])" + re.escape(g) + r"(?![a-z0-9])", a) is not None


def exact(answer: str, gold: str) -> bool:
    return normalise(answer).strip(_TRIM) == normalise(gold).strip(_TRIM)


def first_label(answer: str, labels: list[str]) -> str | None:
    """The label named earliest in the answer (the longest where two start at the same place)."""
    a = normalise(answer)
    best: tuple[int, int, str] | None = None
    for label in labels:
        m = re.search(r"(?<![a-z0-9])" + re.escape(normalise(label)) + r"(?![a-z0-9])", a)
        if m and (best is None or (m.start(), -len(label)) < best[:2]):
            best = (m.start(), -len(label), normalise(label))
    return best[2] if best else None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _number(text: str) -> float | None:
    """The last number in the text: 'Answer: 25 + 39 = 64' gives 64."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numbers_match(answer: str, gold: str, tolerance: float = 1e-6) -> bool:
    g, a = _number(gold), _number(answer)
    return g is not None and a is not None and abs(a - g) <= max(tolerance, 1e-6) * max(1.0, abs(g))


def regex_match(answer: str, gold: str, pattern: str) -> bool:
    m = re.search(pattern, answer, re.IGNORECASE | re.DOTALL)
    return m is not None and exact(m.group(1) if m.re.groups else m.group(0), gold)


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)


def parse_json(text: str):
    """The JSON value an answer is (inside a ```json fence or not); raises ValueError when it is none."""
    import json

    text = text.strip()
    fenced = _FENCE.match(text)
    return json.loads(fenced.group(1) if fenced else text)


def _same_json(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return exact(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def json_match(answer: str, gold: str, keys: list[str] | None = None) -> bool:
    try:
        got = parse_json(answer)
    except ValueError:
        return False
    want = parse_json(gold)
    if keys is None:
        return _same_json(got, want)
    return isinstance(got, dict) and all(k in got and _same_json(got[k], want.get(k)) for k in keys)


def chrf_at_least(answer: str, gold: str, threshold: float) -> bool:
    from sacrebleu import sentence_chrf

    return sentence_chrf(answer, [gold]).score >= threshold


def check(spec: dict, answer: str, gold: str) -> bool:
    """The answer against the gold under a task's metric ``spec`` (a recipe ``tasks:`` entry as a dict)."""
    if spec.get("max_words") and len(answer.split()) > spec["max_words"]:
        return False
    metric = spec.get("metric", "exact")
    if metric == "exact":
        return exact(answer, gold)
    if metric == "contains":
        return contains(answer, gold)
    if metric == "label":
        return first_label(answer, spec.get("labels") or [gold]) == normalise(gold)
    if metric == "number":
        return numbers_match(answer, gold, spec.get("tolerance") or 1e-6)
    if metric == "keywords":
        return all(
            any(contains(answer, alt) for alt in k.split("|") if alt.strip()) for k in gold.split(";") if k.strip()
        )
    if metric == "regex":
        return regex_match(answer, gold, spec["pattern"])
    if metric == "json":
        return json_match(answer, gold, spec.get("keys"))
    if metric == "chrf":
        return chrf_at_least(answer, gold, spec.get("threshold", 50.0))
    if metric == "judge":
        raise ValueError("a judge task is scored by its judge model (toolchain.quality.judge), not answer by answer")
    raise ValueError(f"unknown metric {metric!r} (one of {', '.join(METRICS)})")


def exact_agreement(a: str, b: str) -> bool:
    return normalise(a) == normalise(b)


def answers_match(answer: str, gold: str) -> bool:
    """A reasoning trace's final answer against the gold answer: numerically when the gold is a number
    (last number in the answer, relative tolerance 1e-6), else normalised equality or word-bounded contains."""
    if _NUMBER.fullmatch(gold.strip()):
        return numbers_match(answer, gold)
    return normalise(answer) == normalise(gold) or contains(answer, gold)
