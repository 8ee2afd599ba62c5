"""Builds recipes/data/reasoning_{train,heldout}.jsonl: problems with checkable numeric answers.

    python recipes/data/make_reasoning.py

Task types: arithmetic word problems (one or two steps) and unit conversions. Every prompt has a numeric
gold answer, so a teacher's chain of thought can be kept only when its final answer is right.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emil", "Fatou", "Gus", "Hiro", "Ines", "Jon", "Kemi", "Liam", "Mia",
         "Nico", "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tara"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "coins", "cards", "shells"]
CONVERSIONS = [
    ("kilometres", "metres", 1000), ("metres", "centimetres", 100), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("kilograms", "grams", 1000), ("litres", "millilitres", 1000),
    ("days", "hours", 24), ("weeks", "days", 7), ("dozens", "items", 12), ("years", "months", 12),
]


def _problem(rng: random.Random) -> tuple[str, str, int]:
    kind = rng.choice(["add", "sub", "mul", "two_step", "convert"])
    n, item = rng.choice(NAMES), rng.choice(ITEMS)
    if kind == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        return kind, f"{n} has {a} {item} and gets {b} more. How many {item} does {n} have now?", a + b
    if kind == "sub":
        a = rng.randint(20, 90)
        b = rng.randint(1, a - 1)
        return kind, f"{n} had {a} {item} and gave away {b}. How many {item} are left?", a - b
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return kind, f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?", a * b
    if kind == "two_step":
        a, b, c = rng.randint(5, 40), rng.randint(2, 20), rng.randint(1, 10)
        return (kind, f"{n} has {a} {item}, buys {b} more, then loses {c}. How many {item} does {n} have?",
                a + b - c)
    src, dst, factor = rng.choice(CONVERSIONS)
    v = rng.randint(2, 15)
    return "convert", f"How many {dst} are in {v} {src}?", v * factor


def build(seed: int = 7, n_train: int = 400, n_heldout: int = 60) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < n_train + n_heldout:
        kind, prompt, answer = _problem(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"task": "math" if kind != "convert" else "convert", "prompt": prompt, "gold": str(answer)})
    train, heldout = rows[:n_train], rows[n_train:]
    for split, part in (("rtrain", train), ("rheldout", heldout)):
        for i, r in enumerate(part):
            r["id"] = f"{split}-{i:05d}"
    return train, heldout


def main() -> None:
    train, heldout = build()
    for name, rows in (("reasoning_train", train), ("reasoning_heldout", heldout)):
        with open(HERE / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps({"id": r["id"], "task": r["task"], "prompt": r["prompt"], "gold": r["gold"]}) + "\n")
        print(name, len(rows))


if __name__ == "__main__":
    main()
