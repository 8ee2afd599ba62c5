"""Two export stages' files of the same type, prompt by prompt: held-out gold of each with a 95 % bootstrap
interval, the difference, and McNemar's exact test both ways (export.json's ``gold_by_prompt``). Two eval stages
compare their PyTorch students the same way (eval.json's ``paired``; shown as type "pytorch").

    python benchmarks/compare_exports.py runs/default/export-AAAA runs/default/export-BBBB [--type iq4_nl]
    python benchmarks/compare_exports.py runs/default/eval-AAAA runs/default/eval-BBBB

Used for docs/export.md's quantization-aware table (without: A, with: B) and docs/student.md's recovery table.
"""

import argparse
import json
from pathlib import Path

from toolchain.quality import stats


def outcomes(stage_dir: Path) -> dict[str, dict]:
    """Per file type: {"gold_by_prompt": {task: {prompt id: 0/1}}, "perplexity": ...}."""
    if (stage_dir / "eval.json").exists():
        report = json.loads((stage_dir / "eval.json").read_text(encoding="utf-8"))
        golds = {task: dict(zip(p["ids"], p["student"])) for task, p in report["paired"].items()}
        return {"pytorch": {"gold_by_prompt": golds, "perplexity": None}}
    report = json.loads((stage_dir / "export.json").read_text(encoding="utf-8"))
    return {f["variant"]: f for f in report["files"] if f["format"] == "gguf" and "gold_by_prompt" in f}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--type", default=None, help="only this GGUF type")
    args = ap.parse_args()
    a, b = outcomes(args.a), outcomes(args.b)
    for variant in sorted(set(a) & set(b)):
        if args.type and variant != args.type:
            continue
        tables = {}
        for task, golds in a[variant]["gold_by_prompt"].items():
            other = b[variant]["gold_by_prompt"].get(task, {})
            ids = sorted(set(golds) & set(other))
            if ids:
                tables[task] = ([int(golds[i]) for i in ids], [int(other[i]) for i in ids])
        summary = stats.summarize(tables, 10_000, 0)["tasks"]
        x = [v for t in tables.values() for v in t[0]]
        y = [v for t in tables.values() for v in t[1]]
        o = summary["overall"]
        two_sided = _two_sided(x, y)
        print(f"{variant}: n={len(x)}  A {100 * sum(x) / len(x):.1f}% {_iv(o['teacher'])}  B {100 * sum(y) / len(y):.1f}% "
              f"{_iv(o['student'])}  B-A {100 * (sum(y) - sum(x)) / len(x):+.1f} points  right only in A {o['teacher_only']}, "
              f"only in B {o['student_only']}  McNemar two-sided p = {two_sided:.3g}")
        for task, (ta, tb) in sorted(tables.items()):
            print(f"  {task}: {100 * sum(ta) / len(ta):.1f}% -> {100 * sum(tb) / len(tb):.1f}% (n={len(ta)}, "
                  f"McNemar two-sided p = {_two_sided(ta, tb):.3g})")
        if a[variant]["perplexity"] is not None:
            print(f"  perplexity of the teacher's answers: {a[variant]['perplexity']:.2f} -> "
                  f"{b[variant]['perplexity']:.2f}")


def _two_sided(a: list[int], b: list[int]) -> float:
    """McNemar's exact test both ways, doubled."""
    return min(1.0, 2 * min(stats.mcnemar(a, b)["p_student_below"], stats.mcnemar(b, a)["p_student_below"]))


def _iv(iv) -> str:
    return "[-]" if iv is None else f"[{100 * iv[0]:.0f}-{100 * iv[1]:.0f}]"


if __name__ == "__main__":
    main()
