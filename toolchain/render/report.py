"""report: one page a user can send around, from the finished eval, export and bench of a recipe (and its sweep).

Writes runs/<recipe>/report/report.md and report.html. The HTML is self-contained: the charts are PNGs
(matplotlib) embedded as data URIs, the styles inline, nothing fetched.

Charts: quality vs decode speed (teacher, student, every exported file; the sweep's students and their Pareto
front when ``distillery sweep`` ran), $ per 1M output tokens against the reference API, retention per task.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import shutil
from pathlib import Path

from toolchain.artifacts.files import ExportError, run_tool
from toolchain.data.rows import iter_jsonl
from toolchain.pipeline.plans import status
from toolchain.pipeline.runner import gate_verdict
from toolchain.pipeline.runs import RunError
from toolchain.quality import cascade
from toolchain.quality.gate import gate_lines
from toolchain.recipe import Recipe
from toolchain.render.markdown import bench_markdown as bench_md
from toolchain.render.markdown import (
    cascade_markdown,
    draft_markdown,
    eval_table,
    gate_head,
    judge_markdown,
    label_markdown,
)
from toolchain.render.markdown import export_markdown as export_md


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def gather(cfg: Recipe, runs_root) -> dict:
    """The numbers the report shows, from the recipe's current finished stages."""

    done = {stage: path for stage, state, path in status(cfg, runs_root) if state == "done"}
    missing = [s for s in ("eval", "export", "bench") if s not in done]
    if missing:
        raise RunError(
            f"report needs {', '.join(missing)} for {cfg.name}; run them first (distillery run {cfg.source or ''})"
        )

    run_dir = Path(runs_root) / cfg.name
    evaluation = _load(done["eval"] / "eval.json")
    bench = _load(done["bench"] / "bench.json")
    c = cfg.eval.cascade  # as the recipe says now, priced per call as bench measured
    table = cascade.from_eval(evaluation, c.targets, c.calibration, c.seed, cfg.eval.gate_level, c.rule,
                              prices=bench.get("per_call"))
    return {"recipe": cfg.name, "teacher": cfg.teacher, "eval": evaluation, "gate": gate_verdict(cfg, evaluation),
            "export": _load(done["export"] / "export.json"), "bench": bench, "cascade": table,
            "sweep": _load(run_dir / "sweep.json"), "draft": _load(run_dir / "draft.json"),
            "validation": _load_jsonl(done["distill"] / "validation.jsonl") if "distill" in done else None,
            "dirs": {k: str(v) for k, v in done.items()}}


def _load_jsonl(path: Path) -> list[dict] | None:
    return [row for _, row in iter_jsonl(path)] if path.is_file() else None


def validation_markdown(rows: list[dict] | None) -> list[str]:
    """distill.validation's scorings of the slice of training prompts kept out of training, the kept one marked."""
    if not rows:
        return []
    lines = ["## Which weights ship: the validation slice (distill.validation)", "",
             "Gold (%) on training prompts kept out of training, after each scoring; the teacher's own answers "
             f"there: {_pct(rows[0]['teacher_gold'])} of {rows[0]['n_gold']}.", "",
             "| step | epoch | gold | loss on the teacher's answers | shipped |", "|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['epoch']:g} | {_pct(r['gold'])} | {r['loss']:.3f} | "
                     f"{'yes' if r.get('kept') else ''} |")
    return lines + [""]


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better on both)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def charts(data: dict) -> dict[str, str]:
    """name → base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench, ev = data["bench"], data["eval"]
    out = {}

    fig, ax = plt.subplots(figsize=(7, 4.2))
    t = bench["summary"]["teacher"]["decode_tps"]["median"]
    tg = bench["quality"]["teacher_gold"]
    ax.scatter([t], [100 * (tg or 0)], s=90, marker="s", color="#c0392b", label=f"teacher ({bench['quant']})", zorder=3)
    for row in bench.get("per_file", []):
        if row["decode_tps"] is None or row["gold"] is None:
            continue
        marker = "o" if row["format"] == "gguf" else "^"
        ax.scatter([row["decode_tps"]], [100 * row["gold"]], s=60, marker=marker, zorder=3,
                   label=f"student {row['format']} {row['variant']}")
    if data.get("sweep"):
        pts = [(r["decode_tps"], 100 * (r["student_gold"] or 0)) for r in data["sweep"]["students"]]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=40, color="#7f8c8d", label="sweep students", zorder=2)
        for r, p in zip(data["sweep"]["students"], pts):
            ax.annotate(r.get("label") or f"{r['keep_layers']}L", p, textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        students = data["sweep"]["students"]
        basis = front_basis(students)
        chosen = pareto([(r["decode_tps"], r[basis] or 0) for r in students])
        front = sorted(pts[i] for i in chosen)
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="#7f8c8d",
                label="Pareto front" + (" (on validation gold)" if basis == "validation_gold" else ""))
    ax.set_xlabel("decode tokens/s (this machine)")
    ax.set_ylabel("held-out gold accuracy (%)")
    ax.set_title("Quality vs speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    out["quality_vs_speed"] = _png(fig)

    fig, ax = plt.subplots(figsize=(7, 3.6))
    per_call = (bench.get("per_call") or {}).get("all")
    if per_call:  # what the bill is made of: calls at their own prompt and answer lengths
        names = ["reference API", "student, one at a time", "student, busy server"]
        values = [per_call["api_usd_per_1k"], per_call["student_usd_per_1k"], per_call["student_usd_per_1k_loaded"]]
        names, values = [n for n, v in zip(names, values) if v], [v for v in values if v]
        xlabel, title = "$ per 1,000 calls at the median call (log scale)", "Cost per call"
    else:
        usd = bench["usd_per_1m_output_tokens"]
        names = ["reference API", "teacher", "student"]
        values = [bench["reference_api_usd_per_1m_output"], usd["teacher"], usd["student"]]
        xlabel, title = "$ per 1M output tokens (log scale)", "Cost per token"
    bars = ax.barh(names, values, color=["#7f8c8d", "#27ae60", "#16a085"][: len(values)] if per_call
                   else ["#7f8c8d", "#c0392b", "#27ae60"])
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    for b, v in zip(bars, values):
        ax.text(v, b.get_y() + b.get_height() / 2, f" ${v:.3g}", va="center", fontsize=9)
    ax.set_title(title)
    out["cost"] = _png(fig)

    fig, ax = plt.subplots(figsize=(7, 3.6))
    tasks = [k for k, r in ev["retention"]["tasks"].items() if r["retention"] is not None]
    ret = [ev["retention"]["tasks"][k]["retention"] for k in tasks]
    ax.bar(tasks, ret, color=["#27ae60" if r >= 1 else "#e67e22" for r in ret])
    ax.axhline(1.0, color="#333", lw=0.8)
    ax.set_ylabel("student gold / teacher gold")
    ax.set_title("Retention per task")
    out["retention"] = _png(fig)

    rows = (data.get("cascade") or {}).get("targets") or []
    if rows:  # the cascade: how many calls the student keeps, what the combined answers keep, what a call costs
        fig, ax = plt.subplots(figsize=(7, 3.8))
        x = [100 * r["kept"] for r in rows]
        y = [r["retention"] or 0 for r in rows]
        low = [max(0.0, (r["retention"] or 0) - (r["lower"] if r["lower"] is not None else r["retention"] or 0))
               for r in rows]
        ax.errorbar(x, y, yerr=[low, [0.0] * len(rows)], fmt="o", color="#2980b9", capsize=4,
                    label="combined retention (one-sided lower bound)")
        for r, xi, yi in zip(rows, x, y):
            cost = f", ${r['usd_per_1k']:.3g}/1k calls" if "usd_per_1k" in r else ""
            ax.annotate(f"target {r['target']:g}{cost}", (xi, yi), textcoords="offset points", xytext=(6, 4),
                        fontsize=8)
        if "api_usd_per_1k" in rows[0]:
            ax.set_title(f"Cascade on the report prompts (the API alone: ${rows[0]['api_usd_per_1k']:.3g}/1k calls)")
        else:
            ax.set_title("Cascade on the report prompts")
        ax.axhline(1.0, color="#333", lw=0.8)
        ax.set_xlim(-5, 105)
        ax.set_xlabel("calls the student answers (%)")
        ax.set_ylabel("combined gold / teacher gold")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        out["cascade"] = _png(fig)
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_markdown(data: dict, images: dict[str, str] | None = None) -> str:
    """The report as Markdown; with ``images`` (name → file), the charts are linked."""


    lines = [f"# distillery report: {data['recipe']}", "", f"Teacher: `{data['teacher']}`.", ""]
    verdict = data.get("gate")
    if verdict:
        lines += [f"**Quality gate: {gate_head(verdict)}** ({verdict['rule']} rule, level "
                  f"{verdict['level']:g})", ""] + [f"- {line}" for line in gate_lines(verdict)] + [""]
    lines += ["## Speed and cost", "", bench_md(data["bench"]).split("\n", 2)[2]]
    if images:
        lines += [f"![quality vs speed]({images['quality_vs_speed']})", f"![cost]({images['cost']})", ""]
    lines += draft_markdown(data.get("draft"), data["bench"])
    lines += validation_markdown(data.get("validation"))
    lines += [
        "## Quality (lm-eval, held-out prompts)",
        "",
        "```",
        eval_table(data["eval"], data.get("gate")),
        "```",
        "",
    ]
    if images:
        lines += [f"![retention]({images['retention']})", ""]
    lines += [x.replace("## ", "### ", 1) if x.startswith("## ") else x
              for x in label_markdown(data["eval"], data["bench"].get("per_call"))
              + judge_markdown(data["eval"])] + [""]
    if data.get("cascade"):
        lines += cascade_markdown(data["cascade"]) + [""]
        if images and images.get("cascade"):
            lines += [f"![cascade]({images['cascade']})", ""]
    lines += ["## Exported files", "", export_md(data["export"]).split("\n", 2)[2]]
    if data.get("sweep"):
        lines += sweep_markdown(data["sweep"]["students"])
    return "\n".join(lines) + "\n"


def front_basis(students: list[dict]) -> str:
    """What the sweep's Pareto front is drawn on: the validation slice's gold when every student has it (the
    held-out figures then only report), else the held-out gold."""
    return "validation_gold" if all(r.get("validation_gold") is not None for r in students) else "student_gold"


def sweep_markdown(students: list[dict]) -> list[str]:
    basis = front_basis(students)
    lines = [
        "## Sweep: layers kept vs quality and speed",
        "",
        "| layers | MLP channels | key/value heads | hidden size | parameters (M) | validation gold | student gold "
        "| retention | decode tokens/s | on the Pareto front |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    front = set(pareto([(r["decode_tps"], r[basis] or 0) for r in students]))
    for i, r in enumerate(students):
        retention = "-" if r["retention"] is None else f"{r['retention']:.2f}"
        lines.append(
            f"| {r['keep_layers']} | {r.get('intermediate_size') or 'all'} | {r.get('kv_heads') or 'all'} | "
            f"{r.get('hidden_size') or 'all'} | {r['parameters'] / 1e6:.1f} | {_pct(r.get('validation_gold'))} | "
            f"{_pct(r['student_gold'])} | {retention} | {r['decode_tps']:.1f} | {'yes' if i in front else ''} |"
        )
    if basis == "validation_gold":
        lines += ["", "The front is drawn on the validation slice of the training prompts (distill.validation): "
                      "the held-out gold and retention beside it were not used to choose."]
    else:
        lines += ["", "The front is drawn on the held-out gold it also reports: a shape chosen from it looks better "
                      "than it is. Set distill.validation to choose on training prompts kept out of training."]
    return lines + [""]


def _md_to_html(md: str) -> str:
    """Enough Markdown for this report: headings, tables, lists, code blocks, paragraphs, bold, images, inline code."""
    import re

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    out, lines, i = [], md.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1: j])) + "</pre>")
            i = j + 1
            continue
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            head, body = rows[0], [r for r in rows[1:] if not all(set(c) <= set("-:") for c in r)]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        m = re.match(r"^(#{1,3}) (.*)", line)
        if m:
            n = len(m.group(1))
            out.append(f"<h{n}>{inline(m.group(2))}</h{n}>")
        elif (m := re.match(r"^!\[(.*?)\]\((.*?)\)$", line)):
            out.append(f'<img alt="{html.escape(m.group(1))}" src="{m.group(2)}">')
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    return "\n".join(out)


STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:12px}
img{max-width:100%;display:block;margin:1em 0}h1{border-bottom:2px solid #27ae60}"""


def write(cfg: Recipe, runs_root) -> Path:
    """Write runs/<recipe>/report/ (report.md, report.html, the chart PNGs) in one step; returns report.html."""
    data = gather(cfg, runs_root)
    images = charts(data)
    final = Path(runs_root) / cfg.name / "report"
    tmp = final.with_name("report.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {}
    for name, b64 in images.items():
        (tmp / f"{name}.png").write_bytes(base64.b64decode(b64))
        files[name] = f"{name}.png"
    (tmp / "report.md").write_text(render_markdown(data, files), encoding="utf-8")
    embedded = {name: f"data:image/png;base64,{b64}" for name, b64 in images.items()}
    body = _md_to_html(render_markdown(data, embedded))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>distillery report: "
            f"{html.escape(cfg.name)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n")
    (tmp / "report.html").write_text(page, encoding="utf-8")
    (tmp / "data.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final / "report.html"


def screenshot(page: Path, out: Path, width: int = 1200, height: int = 2400) -> Path:
    """Render the page in headless Chromium (the Debian package) to a PNG."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise ExportError("chromium is not installed (apt-get install chromium) — needed to screenshot the report")
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        f"--screenshot={out}",
        page.resolve().as_uri(),
    ]
    done = run_tool(cmd, "chromium's screenshot of the report", 120)
    if not out.is_file():
        raise ExportError(f"chromium wrote no screenshot: {(done.stderr or '').strip().splitlines()[-1:]}")
    return out
