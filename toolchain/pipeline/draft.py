"""`distillery draft`: the recipe's student as its teacher's draft model, measured in llama.cpp's speculative
decoding on the recipe's held-out prompts (backends/speculative.py), with the settings that serve it.

Writes runs/<recipe>/draft.json (every row) and draft.md (the table, and the llama-server / LM Studio / Ollama
settings for the best draft length).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from toolchain.backends import speculative
from toolchain.backends.llama_cpp import LlamaCppEngine, LlamaVocab
from toolchain.data.formats import load_prompts
from toolchain.models.chat import context, messages_for
from toolchain.models.references import ModelError
from toolchain.pipeline.runs import RunDir
from toolchain.recipe import Recipe, RecipeError
from toolchain.serve import targets
from toolchain.ui import console, progress


def parse_lengths(text: str) -> list[int]:
    """``--draft-max 2,4,8,16``: the draft lengths to measure, positive integers."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or not all(x.isdigit() and int(x) > 0 for x in items):
        raise RecipeError(f"--draft-max: '{text}' is not comma-separated positive integers (e.g. 2,4,8,16)")
    return sorted(set(map(int, items)))


def pair(cfg: Recipe, runs_root, quant: str | None, student_file: str | None) -> tuple[Path, Path]:
    """(teacher GGUF, draft GGUF) at the same type, checked as llama.cpp checks a draft."""
    quant = quant or targets.default_quant(cfg, "llama_cpp")
    draft = Path(student_file) if student_file else targets.student(cfg, runs_root, "llama_cpp", quant).path
    teacher = targets.teacher(cfg, "llama_cpp", quant).path
    check(teacher, draft, "--student")
    return teacher, draft


def check(served: Path, draft: Path, option: str) -> None:
    """One line when ``draft`` is not a GGUF llama.cpp takes as ``served``'s draft model."""
    if not draft.is_file() or draft.suffix != ".gguf":
        raise ModelError(f"{draft}: not a .gguf file ({option} names the draft's GGUF)")
    why = speculative.incompatibility(served, draft)
    if why:
        raise ModelError(f"{draft.name} cannot draft for {served.name} in llama.cpp: {why}")


def attach(engine, served: Path, draft_file: Path, draft_max: int, n_ctx: int) -> None:
    """``serve --draft``: ``draft_file`` proposes tokens for the served llama.cpp ``engine`` (checked first)."""
    check(served, draft_file, "--draft")
    engine.attach_draft(LlamaCppEngine(draft_file, n_ctx=n_ctx), draft_max)


def prompts(cfg: Recipe, teacher: Path, n: int) -> list[str]:
    """The first ``n`` held-out prompts of the recipe in the teacher's chat template."""
    _, heldout = load_prompts(cfg)
    if not heldout:
        raise ModelError(f"{cfg.source}: no held-out prompts to measure the draft on (data.heldout)")
    vocab = LlamaVocab(teacher)
    try:
        return [vocab.chat_text(messages_for(p.prompt, cfg.generate.system_prompt, context(p))) for p in heldout[:n]]
    finally:
        vocab.close()


def run(cfg: Recipe, runs_root, lengths: list[int], n_prompts: int, max_tokens: int, temperature: float | None,
        quant: str | None = None, student_file: str | None = None) -> Path:
    teacher, draft = pair(cfg, runs_root, quant, student_file)
    texts = prompts(cfg, teacher, n_prompts)
    threads = os.cpu_count() or 1
    temps = (0.0,) if temperature is None else (0.0, temperature)
    with progress() as bar:
        task = bar.add_task("draft", total=len(texts) * (len(lengths) + 1) * len(temps), info="llama.cpp speculative")
        rows = speculative.measure(teacher, draft, texts, max_tokens, lengths, threads, temps, seed=cfg.generate.seed,
                                   tick=lambda: bar.update(task, advance=1))
    out_dir = RunDir.for_recipe(runs_root, cfg.name).root
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"recipe": cfg.name, "teacher": str(teacher), "draft": str(draft), "threads": threads,
              "teacher_bytes": teacher.stat().st_size, "draft_bytes": draft.stat().st_size,
              "max_tokens": max_tokens, "rows": rows}
    text = markdown(report)
    (out_dir / "draft.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "draft.md").write_text(text, encoding="utf-8")
    for line in text.splitlines():
        console.print(line, markup=False, highlight=False)
    return out_dir / "draft.json"


def markdown(report: dict) -> str:
    rows = report["rows"]
    lines = [f"# {report['recipe']}: the student as the teacher's draft (llama.cpp speculative decoding)", "",
             f"Teacher {Path(report['teacher']).name} ({report['teacher_bytes'] / 1e6:.1f} MB), draft "
             f"{Path(report['draft']).name} ({report['draft_bytes'] / 1e6:.1f} MB), {report['threads']} threads, "
             f"{rows[0]['prompts']} held-out prompts, up to {report['max_tokens']} tokens each; draft length 0 is the "
             "teacher alone (llama-cpp-python, the same kernels and threads).", "",
             "| temperature | draft length | decode tok/s | vs teacher alone | acceptance | tokens per teacher pass "
             "| same text as the teacher alone | formula, this pair | formula, a 0.5B draft for a 7B teacher |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = "—" if r["acceptance"] is None else f"{100 * r['acceptance']:.1f} %"
        same = f"{r['same_text_as_teacher']}/{r['prompts']}" if "same_text_as_teacher" in r else "—"
        here = f"{r['predicted_speedup']:.2f}×" if "predicted_speedup" in r else "—"
        large = f"{r['predicted_speedup_large_pair']:.2f}×" if "predicted_speedup_large_pair" in r else "—"
        lines.append(f"| {r['temperature']:g} | {r['draft_max']} | {r['decode_tps']:.1f} | {r['speedup']:.2f}× | {acc} "
                     f"| {r['tokens_per_teacher_pass']:.2f} | {same} | {here} | {large} |")
    timed = next((r for r in rows if "draft_token_cost" in r), None)
    if timed is not None:
        lines += ["", f"The draft alone decodes at {timed['draft_alone_tps']:.1f} tok/s: a draft token costs "
                  f"{timed['draft_token_cost']:.2f} of a teacher token here. "
                  "Formula: tokens per teacher pass / (1 + draft tokens per "
                  "pass × that cost), the speed-up if checking the draft's tokens cost one teacher token (the gap to "
                  "the measured column is what the batched check costs on this machine). The last column puts "
                  f"this draft's measured tokens per pass at a cost of {speculative.LARGE_PAIR_COST:.3f} (0.5/7: "
                  "one sequence's decode on a CPU reads every weight per token, so cost follows bytes)."]
    best = speculative.best(rows)
    lines.append("")
    if best is None or best["speedup"] <= 1.0:
        lines.append("No draft length was faster than the teacher alone on this machine: serve the teacher without "
                     "a draft (a draft pays when its tokens cost far less than a teacher pass and most are accepted).")
    else:
        t, d, n = Path(report["teacher"]).name, Path(report["draft"]).name, best["draft_max"]
        lines += [f"Best: draft length {n}, {best['speedup']:.2f}× the teacher alone. To serve it:", "",
                  f"- llama-server: `llama-server -m {t} -md {d} --spec-draft-n-max {n} --spec-draft-n-min 0 "
                  f"-t {report['threads']} -td {report['threads']}`",
                  f"- LM Studio: load {t}, choose {d} as its draft model (or send `\"draft_model\"` with each "
                  "request to its OpenAI-compatible API)",
                  "- Ollama: has no draft-model setting (ollama/ollama#5800); serve through llama-server instead"]
    return "\n".join(lines) + "\n"
