"""``distillery traffic STORE``: what an application's traffic is made of — its tasks, how many calls each, how
long their prompts and answers are, what they cost at the upstream's prices, and what a local student would
save — sorted by money saved; as a table, or JSON for scripts."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from toolchain.data.tasks import from_stored, group, shape
from toolchain.data.traffic import TrafficStore
from toolchain.pipeline.plans import finished
from toolchain.pipeline.runs import RunError
from toolchain.quality import shadow
from toolchain.quality.cost import LocalSpeed, Price, price_for, task_bill
from toolchain.recipe import Recipe

# Without a finished bench: the default recipe's student (75M parameters, q8_0 GGUF, llama.cpp, one call at a time)
# as a fresh clone's `make run` measured it on 2 CPU cores (bench.json, 2026-12-05: prompt 1470.9 and decode 215.0
# tokens/s), at the recipe's default $0.10/hour.
ESTIMATE = LocalSpeed(prompt_tps=1470.9, decode_tps=215.0, usd_per_hour=0.10, measured=False,
                      source="estimate: the default 75M student's measured speed on 2 CPU cores, $0.10/hour")


def local_speed(cfg: Recipe, runs_root) -> LocalSpeed:
    """The recipe's student as its finished bench measured it (one call at a time), else the estimate."""
    try:
        bench = json.loads((finished(cfg, runs_root, "bench") / "bench.json").read_text(encoding="utf-8"))
    except (RunError, OSError, ValueError):
        return ESTIMATE
    summary = bench.get("summary", {}).get("student", {})
    prompt_tps, decode_tps = (summary.get(k, {}).get("median") for k in ("prompt_tps", "decode_tps"))
    if not prompt_tps or not decode_tps:
        return ESTIMATE
    return LocalSpeed(prompt_tps=prompt_tps, decode_tps=decode_tps, usd_per_hour=cfg.cost.usd_per_hour,
                      measured=True, source=f"measured: {cfg.name}'s bench ({bench.get('quant')}, one call at a time)")


def analyse(store: Path, prices: dict[str, Price] | None = None, local: LocalSpeed | None = ESTIMATE) -> dict:
    """The traffic report of a store (see the module's docstring)."""
    db = TrafficStore(store, readonly=True)
    try:
        stored = list(db.calls())
    finally:
        db.close()
    statuses = Counter(c["status"] for c in stored)
    calls = [c for c in (from_stored(s) for s in stored if s["status"] == 200) if c is not None]
    if not calls:
        return {"store": str(store), "calls": len(stored), "answered": 0, "statuses": dict(statuses), "tasks": []}
    first, last = min(c.started_at for c in calls), max(c.started_at for c in calls)
    window = max(last - first, 60.0)  # a shorter window is read as a minute, not extrapolated from seconds
    rows = []
    for name, members in group(calls).items():
        sh = shape(name, members)
        model = next(iter(sh.models), None)
        price = price_for(model, prices)
        usage = [(c.prompt_tokens, c.cached_tokens or 0, c.completion_tokens) for c in members
                 if c.prompt_tokens is not None and c.completion_tokens is not None]
        bill = task_bill(usage, len(members) / window * 86400, price, local)
        rows.append({**asdict(sh), "share": len(members) / len(calls), "model": model,
                     "price": None if price is None else asdict(price), "with_usage": len(usage), **bill})
    rows.sort(key=lambda r: (-(r["saved_usd_per_day"] or 0), -(r["api_usd_per_day"] or 0), -r["calls"]))
    return {"store": str(store), "calls": len(stored), "answered": len(calls), "statuses": dict(statuses),
            "first": first, "last": last, "window_s": window,
            "local": None if local is None else asdict(local), "tasks": rows}


def _span(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _tokens(q: dict) -> str:
    return "–" if q.get("median") is None else f"{q['median']:.0f} / {q['p90']:.0f}"


def _usd(value) -> str:
    return "–" if value is None else f"${value:.4f}" if value < 1 else f"${value:,.2f}"


def markdown(report: dict) -> str:
    """The report as a Markdown table (the terminal's view too)."""
    if not report["tasks"]:
        return f"{report['store']}: no answered calls yet ({report['calls']} recorded)\n"
    window = _span(report["window_s"])
    lines = [f"{report['answered']} answered calls of {report['calls']} recorded over {window} "
             f"(per day: at that rate); prices per 1M tokens as listed below or --prices.", "",
             "| task | calls | share | prompt tok (median/p90) | cached | answer tok | answers | API $/1k calls "
             "| student $/1k calls | API $/day | saved $/day |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in report["tasks"]:
        spec = r["answers"]
        answers = spec.get("metric", "–") + (f" ({len(spec['labels'])})" if spec.get("labels") else "") + (
            f" ({', '.join(spec['keys'][:4])})" if spec.get("keys") else "")
        lines.append(f"| {r['name']}{' (tag)' if r['tagged'] else ''} | {r['calls']} | {r['share']:.0%} | "
                     f"{_tokens(r['prompt_tokens'])} | {_tokens(r['cached_tokens'])} | "
                     f"{_tokens(r['completion_tokens'])} | {answers} | {_usd(r['api_usd_per_1k'])} | "
                     f"{_usd(r['student_usd_per_1k'])} | {_usd(r['api_usd_per_day'])} | "
                     f"{_usd(r['saved_usd_per_day'])} |")
    lines.append("")
    for r in report["tasks"]:
        price = r["price"]
        lines.append(f"- {r['name']}: {r['model']}" + (
            f" at ${price['input']}/{price['cached_input']}/{price['output']} per 1M input/cached/output "
            f"({price['source']})" if price else " has no price: pass --prices"))
    if report.get("local"):
        lines.append(f"- student: {report['local']['source']}; the upstream's token counts stand in for the "
                     "student's")
    return "\n".join(lines) + "\n"


def agreement(store: Path, specs: dict[str, dict] | None = None, floors: dict[str, float] | None = None,
              level: float = 0.05, default_floor: float | None = None) -> dict:
    """Shadow mode's report (toolchain.quality.shadow): every shadowed call of the store that both answered, per
    task (the task the server routed it as, else its tag)."""
    db = TrafficStore(store, readonly=True)
    try:
        pairs = []
        for call in db.calls(ok_only=True, shadow_only=True):
            mine, theirs = (call["student"] or {}).get("text"), from_stored(call)
            if isinstance(mine, str) and theirs is not None and theirs.answer is not None:
                pairs.append((call.get("task_tag") or "(no task)", mine, theirs.answer))
    finally:
        db.close()
    return {"store": str(store), "pairs": len(pairs), **shadow.verdicts(pairs, specs or {}, floors or {}, level,
                                                                      default_floor)}


def agreement_markdown(report: dict) -> str:
    if not report["tasks"]:
        return f"{report['store']}: no shadow pairs yet (serve.shadow records them)\n"
    lines = [f"{report['pairs']} shadow pairs; one-sided bounds at level {report['level']:g} (Holm over the tasks).",
             "", "| task | n | agreement | bounds | measured by | floor | verdict |",
             "|---|---:|---:|---|---|---:|---|"]
    for task, r in report["tasks"].items():
        bounds = f"{r['lower']:.2f}–{min(r['upper'], 1.0):.2f}" if r["lower"] is not None else "–"
        lines.append(f"| {task} | {r['n']} | {r['agreement']:.1%} | {bounds} | {r['measured_by']} | {r['floor']:g} | "
                     f"{r['verdict']} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> Path:
    """A PNG of the bill per task: the API's $ per day against the student's, largest saving first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["tasks"] if r["api_usd_per_day"] is not None][:12]
    fig, ax = plt.subplots(figsize=(7, 0.5 * max(len(rows), 1) + 1.5))
    names = [r["name"] for r in rows][::-1]
    api = [r["api_usd_per_day"] for r in rows][::-1]
    mine = [r["student_usd_per_day"] or 0 for r in rows][::-1]
    y = range(len(rows))
    for offset, values, colour, label in ((0.2, api, "#7f8c8d", "API"), (-0.2, mine, "#27ae60", "student")):
        bars = ax.barh([i + offset for i in y], values, height=0.4, color=colour, label=label)
        for bar, v in zip(bars, values):
            ax.text(v, bar.get_y() + bar.get_height() / 2, f" ${v:,.2f}", va="center", fontsize=8)
    ax.set_yticks(list(y), names)
    ax.set_xlabel("$ per day at the observed rate")
    ax.set_title(f"{report['answered']} calls over {_span(report['window_s'])}: the bill per task")
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(out, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
