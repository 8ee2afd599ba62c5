"""Gold-answer scoring per task type: small, strict and explainable.

    fact, extract, summary  the gold string appears in the answer (case- and accent-insensitive, word-bounded)
    classify                the first label-like word of the answer equals the gold label
    anything else           no gold check (scored by agreement with the teacher instead)
"""

from __future__ import annotations

import re
import unicodedata

LABELS = {"positive", "negative", "sports", "technology", "food", "politics"}


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", text.lower()).strip()


def contains(answer: str, gold: str) -> bool:
    a, g = normalise(answer), normalise(gold)
    return re.search(r"(?<![a-z0-9])" + re.escape(g) + r"(?![a-z0-9])", a) is not None


def first_label(answer: str) -> str | None:
    for word in re.findall(r"[a-z]+", normalise(answer)):
        if word in LABELS:
            return word
    return None


def score(task: str, answer: str, gold: str | None) -> bool | None:
    """True/False for a gold check, None where the task has no gold answer."""
    if gold is None:
        return None
    if task == "classify":
        return first_label(answer) == normalise(gold)
    if task == "fact" and len(gold) <= 2:  # chemical symbols: must be the exact token, case-sensitive
        return re.search(r"(?<![A-Za-z])" + re.escape(gold) + r"(?![a-z])", answer) is not None
    return contains(answer, gold)


def exact_agreement(a: str, b: str) -> bool:
    return normalise(a) == normalise(b)


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


def answers_match(answer: str, gold: str) -> bool:
    """A reasoning trace's final answer against the gold answer: numerically when the gold is a number
    (last number in the answer, relative tolerance 1e-6), else normalised equality or word-bounded contains."""
    g = _number(gold)
    if g is not None and _NUMBER.fullmatch(gold.strip()):
        a = _number(answer)
        return a is not None and abs(a - g) <= 1e-6 * max(1.0, abs(g))
    return normalise(answer) == normalise(gold) or contains(answer, gold)
