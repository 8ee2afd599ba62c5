"""LLM-as-judge for tasks whose right answer is not a string match (``tasks.<name>.metric: judge``).

A judge model (the teacher unless ``tasks.<name>.judge`` names another: a GGUF, a model folder or any
``openai:`` endpoint) compares the student's answer with the teacher's for each held-out prompt, under a rubric
the recipe can override. Every pair is asked twice with the answers swapped, which cancels the judge's
preference for a position. Per prompt the student scores 1 (better in both orders), 0.5 (a tie, or the two
orders disagree), 0 (worse); verdicts the judge does not give as A, B or TIE are counted as parse failures
and left out. Reported: win / tie / loss counts, the mean score (0.5 = as good as the teacher) with a
bootstrap interval, how often the two orders agreed, and the parse failures.
"""

from __future__ import annotations

import re

import numpy as np

RUBRIC = ("You compare two answers to the same request. The better answer is the one that does what the request "
          "asks: correct, complete, in the format asked for, with nothing invented. Length is not quality.")
QUESTION = "Which answer is better? Reply with one word: A, B or TIE."
_VERDICT = re.compile(r"\b(TIE|A|B)\b")


def messages(rubric: str | None, prompt: str, first: str, second: str) -> list[dict]:
    body = f"Request:\n{prompt}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n{QUESTION}"
    return [{"role": "system", "content": rubric or RUBRIC}, {"role": "user", "content": body}]


def parse(text: str) -> str | None:
    """'A', 'B' or 'TIE' from the judge's reply (the first of them in its first line), else None."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    m = _VERDICT.search(line.upper().replace("*", ""))
    return m.group(1) if m else None


def student_points(verdict: str | None, student_is: str) -> float | None:
    if verdict is None:
        return None
    if verdict == "TIE":
        return 0.5
    return 1.0 if verdict == student_is else 0.0


def judge_task(engine, rubric: str | None, docs: list[dict], max_tokens: int = 8, on_done=None) -> list[dict]:
    """One judged row per doc ({id, prompt, teacher, student}): both orders asked, their verdicts and the
    student's score for the prompt (None when neither verdict parsed)."""
    out = []
    for d in docs:
        verdicts = []
        for first, second, student_is in ((d["teacher"], d["student"], "B"), (d["student"], d["teacher"], "A")):
            c = engine.chat(messages(rubric, d["prompt"], first, second), max_tokens=max_tokens, temperature=0.0,
                            top_p=1.0, seed=0)
            verdicts.append({"reply": c.text.strip(), "verdict": parse(c.text), "student_is": student_is})
        points = [student_points(v["verdict"], v["student_is"]) for v in verdicts]
        known = [p for p in points if p is not None]
        out.append({"id": d["id"], "verdicts": verdicts, "score": sum(known) / len(known) if known else None})
        if on_done:
            on_done()
    return out


def summary(judged: list[dict], iters: int = 2000, seed: int = 0) -> dict:
    """Win/tie/loss, the mean score with a 95 % bootstrap interval, order agreement and parse failures."""
    scores = [j["score"] for j in judged if j["score"] is not None]
    both = [j for j in judged if all(v["verdict"] is not None for v in j["verdicts"])]
    consistent = sum(
        1 for j in both if len({student_points(v["verdict"], v["student_is"]) for v in j["verdicts"]}) == 1
    )
    out = {
        "n": len(judged), "judged": len(scores),
        "asked": sum(len(j["verdicts"]) for j in judged),
        "parse_failures": sum(v["verdict"] is None for j in judged for v in j["verdicts"]),
        "wins": sum(s > 0.5 for s in scores), "ties": sum(s == 0.5 for s in scores),
        "losses": sum(s < 0.5 for s in scores),
        "score": float(np.mean(scores)) if scores else None, "interval": None,
        "order_agreement": consistent / len(both) if both else None,
    }
    if len(scores) > 1:
        rng = np.random.default_rng(seed)
        arr = np.asarray(scores)
        means = arr[rng.integers(0, len(arr), size=(iters, len(arr)))].mean(axis=1)
        out["interval"] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return out
