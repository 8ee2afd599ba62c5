"""The quality gate: each task's floor, the recipe's rule over the per-prompt table (toolchain.quality.stats.decide)
and the lines that say why a task passed or failed. Re-decided from eval.json whenever the recipe's floors or rule
change (they are no part of any stage key)."""

from __future__ import annotations

from toolchain.quality.stats import decide


class GateError(RuntimeError):
    """The student kept less of the teacher than the recipe's floors, by the recipe's gate rule."""


def floors(tasks: list[str], min_retention: float, per_task: dict[str, float] | None = None) -> dict[str, float]:
    """Each gold task's floor (``per_task`` names tasks with their own, ``min_retention`` is everyone else's)
    and the pool's (``overall``)."""
    unknown = sorted(set(per_task or {}) - set(tasks))
    if unknown:
        raise ValueError(f"tasks.{unknown[0]}.min_retention: {unknown[0]} is not a held-out task with gold answers "
                         f"(those are: {', '.join(sorted(tasks))})")
    out = {t: (per_task or {}).get(t, min_retention) for t in tasks}
    out["overall"] = min_retention
    return out


def gate(paired: dict[str, dict], e, seed: int, per_task: dict[str, float] | None = None) -> dict:
    """The quality gate's verdict (toolchain.quality.stats.decide) from the per-prompt table, the recipe's eval section
    and the tasks' own floors."""
    tables = {t: (v["teacher"], v["student"]) for t, v in paired.items()}
    return decide(tables, floors(sorted(paired), e.min_retention, per_task), rule=e.gate,
                  level=e.gate_level, margin=e.gate_margin, iters=e.bootstrap_iters, seed=seed,
                  allow_undecided=getattr(e, "allow_undecided", False))


def gate_lines(verdict: dict) -> list[str]:
    """One line per judged task: its decision, the bound or interval it used, and why; what the prompts cannot
    tell."""
    out = []
    for name, v in verdict["tasks"].items():
        if v["floor"] <= 0:
            out.append(f"{name}: reported, retention {v['retention']:.3f} (no floor)")
            continue
        if "decision" in v:  # noninferior: the one-sided bound the decision used, at its Holm level
            word = {"pass": "pass", "fail": "FAIL", "undecided": "UNDECIDED"}[v["decision"]]
            if v["decision"] == "undecided" and v["passed"]:
                word = "undecided (allowed)"
            span = (f" (one-sided bounds {v['interval'][0]:.2f}-{v['interval'][1]:.2f} at level "
                    f"{v['level_used']:.3g}, Holm over {verdict.get('family', 1)})")
        else:
            word = "pass" if v["passed"] else "FAIL"
            ci = v["interval"]
            span = f" (95% {ci[0]:.2f}-{ci[1]:.2f})" if ci else ""
        out.append(f"{name}: {word}, retention {v['retention']:.3f}{span} vs floor {v['floor']:g}: {v['why']}"
                   + (f"; {v['note']}" if v.get("note") else ""))
    return out
