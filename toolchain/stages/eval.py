"""eval: how much of the teacher the student kept, measured with lm-eval, offline.

Inputs: generate's held-out prompts with the teacher's own answers, distill's student.json, merge's model/.
Outputs: eval.json (every number, lm-eval version, seeds, sample counts, model sha256s), eval.md (teacher |
student | retention per task and five side-by-side samples per task), tasks/ (the lm-eval task YAMLs and JSONL
this run used, so anyone can rerun them with ``lm_eval --include_path``) and, with ``eval.log_samples``,
samples.jsonl (every sample of every model).

The tasks are the YAMLs in evals/ over local JSONL built from the recipe's held-out prompts: one generation
task per task type (gold accuracy, agreement with the teacher) and one likelihood task (perplexity of the
teacher's answers). Teacher, student and the student before distillation run through the same tasks, seeds,
batch size and generation settings, each as an in-memory ``HFLM``. Nothing reaches a hub.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from toolchain import eval_metrics as em  # noqa: E402
from toolchain import student as students  # noqa: E402
from toolchain.chat import with_instruction  # noqa: E402
from toolchain.data import iter_jsonl, write_jsonl  # noqa: E402
from toolchain.models import file_sha256, load_tokenizer, load_torch_model, resolve  # noqa: E402
from toolchain.runs import RESUME_DIR, Manifest  # noqa: E402
from toolchain.ui import progress  # noqa: E402

EVALS = Path(__file__).resolve().parents[2] / "evals"
SAMPLES_IN_REPORT = 5
ROLES = ("teacher", "student", "base")


def _raw_teacher(cfg, role: str) -> bool:
    """A base teacher asked through generate.prompt_template (no chat template) is evaluated the same way."""
    return role == "teacher" and cfg.generate.prompt_template is not None


def _prompt_for(cfg, role: str, prompt: str) -> str:
    """What each model is asked: the teacher as in generate; the student as it was trained."""
    r = cfg.reasoning
    if cfg.distill.flavour == "reasoning" and (role == "teacher" or r.train_with_instruction):
        prompt = with_instruction(prompt, r.instruction)
    if _raw_teacher(cfg, role):
        prompt = cfg.generate.prompt_template.replace("{prompt}", prompt)
    return prompt


def write_tasks(cfg, rows: list[dict], student_tok, root: Path, role: str) -> list[str]:
    """lm-eval task YAMLs + JSONL for one model under root/role; returns the task names."""
    folder = root / role
    folder.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append({
            "id": r["id"], "prompt": _prompt_for(cfg, role, r["prompt"]), **_scored_doc(cfg, r),
            "target_tokens": len(student_tok(r["response"], add_special_tokens=False).input_ids),
        })
    names = []
    for task, docs in sorted(by_task.items()):
        answered = [d for d in docs if d["teacher_response"].strip()]  # no likelihood of an empty answer
        for kind, template, subset in (("", "distillery_generate.yaml", docs),
                                       ("_ppl", "distillery_likelihood.yaml", answered)):
            if not subset:
                continue
            name = f"{task}{kind}"
            data = folder / f"{name}.jsonl"
            write_jsonl(data, subset)
            body = {"include": str(EVALS / template), "task": name,
                    "dataset_kwargs": {"data_files": {"test": str(data)}}}
            if not kind:
                until = list(cfg.generate.stop) if _raw_teacher(cfg, role) else []
                body["generation_kwargs"] = {"until": until, "do_sample": False, "max_gen_toks": cfg.eval.max_new_tokens}
            (folder / f"{name}.yaml").write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
            names.append(name)
    return names


def _scored_doc(cfg, r: dict) -> dict:
    """What the per-doc metric hooks (toolchain.eval_metrics) read from a held-out row."""
    pattern = cfg.reasoning.answer_pattern if cfg.distill.flavour == "reasoning" else None
    return {"task": r["task"], "gold": r["gold"], "teacher_response": r["response"], "answer_pattern": pattern}


def hf_lm(cfg, model, tok):
    """An in-memory PyTorch model as an lm-eval model."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.eval.batch_size, device="cpu")


def score(cfg, lm, task_dir: Path, names: list[str], chat: bool) -> dict:
    """Run the tasks ``names`` (written by ``write_tasks``) on an lm-eval model: metrics and per-doc samples."""
    import logging

    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # it warns that an in-memory model was passed
    from lm_eval.tasks import TaskManager

    e = cfg.eval
    out = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        apply_chat_template=chat, system_instruction=cfg.generate.system_prompt if chat else None, log_samples=True,
        bootstrap_iters=0, random_seed=e.seed, numpy_random_seed=e.seed, torch_random_seed=e.seed,
        fewshot_random_seed=e.seed, verbosity="ERROR",
    )
    metrics = {}
    for name in names:
        res = out["results"][name]
        metrics[name] = {k.split(",")[0]: v for k, v in res.items() if "," in k and "stderr" not in k}
    samples = {}
    for name in names:
        samples[name] = [{"id": s["doc"]["id"], "response": _response(s), **{k: s.get(k) for k in s["metrics"]}}
                         for s in out["samples"][name]]
    return {"metrics": metrics, "samples": samples}


def _answers_as_given(cfg, rows: list[dict], role: str) -> dict:
    """A teacher behind an API cannot be loaded: score the held-out answers it gave in generate with the same
    per-doc hooks (its likelihood of its own answers is not available)."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        scored = em.process_generation(_scored_doc(cfg, r), [r["response"]])
        by_task[r["task"]].append({"id": r["id"], "response": r["response"], **scored})
    metrics, samples = {}, {}
    for task, ss in by_task.items():
        metrics[task] = {k: em.mean_known([s[k] for s in ss]) for k in ("gold", "exact", "chrf")}
        metrics[f"{task}_ppl"] = {"perplexity": None, "greedy": None}
        samples[task] = ss
        samples[f"{task}_ppl"] = []
    return {"metrics": metrics, "samples": samples, "source": "generate (answers given by the endpoint)"}


def _response(sample: dict):
    r = sample["filtered_resps"][0]
    return r if isinstance(r, str) else None


def _models(cfg, inputs: dict[str, Path]):
    """(role, loader, sha256) for teacher, student and, where it means something, the student before training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = inputs["merge"] / "model"
    info = json.loads((inputs["distill"] / "student.json").read_text(encoding="utf-8"))
    teacher_ref = resolve(cfg.teacher)
    student_sha = file_sha256(merged / "model.safetensors")

    def teacher():
        if not teacher_ref.local:  # an endpoint: its held-out answers from generate are what it is scored on
            return None, None
        return load_torch_model(teacher_ref), load_tokenizer(teacher_ref)

    def student():
        return AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(merged)

    def base():
        tok = AutoTokenizer.from_pretrained(merged)
        if cfg.student.from_ == "teacher":
            full = load_torch_model(teacher_ref)
            keep = info["kept_layers"]
            model = students.prune(full, keep) if len(keep) < len(students.decoder_layers(full)) else full
        else:
            model = load_torch_model(resolve(cfg.student.from_))
        if info.get("vocab_kept"):  # the same trimmed vocabulary as the student, before training
            from toolchain import vocab

            model = vocab.model(model, info["vocab_kept"])
        return model, tok

    out = [("teacher", teacher, teacher_ref.sha256() if teacher_ref.local else None), ("student", student, student_sha)]
    if cfg.eval.base:
        base_ref = teacher_ref if cfg.student.from_ == "teacher" else resolve(cfg.student.from_)
        out.append(("base", base, base_ref.sha256()))
    return out


def run(cfg, inputs: dict[str, Path], out_dir: Path) -> Manifest:
    from transformers import AutoTokenizer

    rows = heldout_rows(cfg, inputs["generate"])
    student_tok = AutoTokenizer.from_pretrained(inputs["merge"] / "model")
    resume = out_dir / RESUME_DIR
    resume.mkdir(exist_ok=True)
    models = _models(cfg, inputs)
    results: dict[str, dict] = {}
    with progress() as bar:
        task = bar.add_task("eval", total=len(models), info="")
        for role, load, _sha in models:
            saved = resume / f"{role}.json"
            if saved.is_file():  # a finished model survives a kill
                results[role] = json.loads(saved.read_text(encoding="utf-8"))
                bar.update(task, advance=1)
                continue
            bar.update(task, info=role)
            names = write_tasks(cfg, rows, student_tok, out_dir / "tasks", role)
            model, tok = load()
            if model is None:
                results[role] = _answers_as_given(cfg, rows, role)
            else:
                results[role] = score(cfg, hf_lm(cfg, model, tok), out_dir / "tasks" / role, names,
                                      chat=not _raw_teacher(cfg, role))
            del model
            saved.write_text(json.dumps(results[role]), encoding="utf-8")
            bar.update(task, advance=1)

    report = _report(cfg, rows, results, {role: sha for role, _, sha in models})
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "eval.md").write_text(render_markdown(report, rows, results), encoding="utf-8")
    if cfg.eval.log_samples:
        write_jsonl(out_dir / "samples.jsonl", [
            {"model": role, "task": name, **s}
            for role, res in results.items() for name, ss in res["samples"].items() for s in ss
        ])
    overall = report["retention"]["overall"]
    return Manifest(
        metrics={"retention": overall["retention"], "teacher_gold": overall["teacher"],
                 "student_gold": overall["student"], "gold_docs": overall["gold_docs"], "docs": len(rows)},
        seeds={"lm_eval": cfg.eval.seed},
    )


def task_scores(result: dict, tasks: list[str]) -> dict[str, dict]:
    """One model's metrics per task: the generation task's and its likelihood task's side by side."""
    no_ppl = {"perplexity": None, "greedy": None}
    return {t: {**result["metrics"][t], **result["metrics"].get(f"{t}_ppl", no_ppl)} for t in tasks}


def gold_counts(rows: list[dict]) -> dict[str, int]:
    tasks = sorted({r["task"] for r in rows})
    return {t: sum(1 for r in rows if r["task"] == t and r["gold"] is not None) for t in tasks}


def heldout_rows(cfg, generate_dir: Path) -> list[dict]:
    rows = [r for _, r in iter_jsonl(generate_dir / "heldout.jsonl")][: cfg.eval.limit]
    if not rows:
        raise ValueError("eval needs held-out prompts: the recipe's data.heldout is empty")
    return rows


def _report(cfg, rows: list[dict], results: dict[str, dict], shas: dict[str, str | None]) -> dict:
    from importlib.metadata import version

    tasks = sorted({r["task"] for r in rows})
    scores = {role: task_scores(res, tasks) for role, res in results.items()}
    counts = gold_counts(rows)
    return {
        "recipe": cfg.name,
        "scores": scores,
        "retention": em.retention_table(scores, counts),
        "docs": {t: sum(1 for r in rows if r["task"] == t) for t in tasks},
        "gold_docs": counts,
        "models": {role: {"sha256": sha} for role, sha in shas.items()},
        "settings": {"batch_size": cfg.eval.batch_size, "seed": cfg.eval.seed, "max_new_tokens": cfg.eval.max_new_tokens,
                     "greedy": True, "apply_chat_template": True, "system_prompt": cfg.generate.system_prompt,
                     "teacher_prompt_template": cfg.generate.prompt_template,
                     "limit": cfg.eval.limit},
        "versions": {p: version(p) for p in ("lm_eval", "transformers", "torch", "sacrebleu")},
        "quality_ceiling": em.QUALITY_CEILING,
    }


def _fmt(x, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.2f}"


def render_table(report: dict) -> str:
    """The console table: gold accuracy per model, retention, agreement and perplexity per task."""
    ret, scores = report["retention"], report["scores"]
    roles = [r for r in ROLES if r in scores]
    head = f"{'task':12s} {'n':>4s} " + " ".join(f"{r + ' gold':>13s}" for r in roles)
    head += f" {'retention':>9s} {'agree':>6s} {'chrF':>6s} {'ppl s/t':>13s}"
    lines = [head]
    for task, row in ret["tasks"].items():
        cells = " ".join(f"{_fmt(scores[r][task].get('gold')):>13s}" for r in roles)
        s = scores["student"][task]
        ppl = f"{_fmt(s['perplexity'], False)}/{_fmt(scores['teacher'][task]['perplexity'], False)}"
        flag = "  ceiling" if row["ceiling"] else ""
        lines.append(f"{task:12s} {report['docs'][task]:4d} {cells} {_fmt(row['retention'], False):>9s} "
                     f"{_fmt(s['exact']):>6s} {s['chrf']:6.1f} {ppl:>13s}{flag}")
    o = ret["overall"]
    lines.append(f"{'overall':12s} {o['gold_docs']:4d} " + " ".join(
        f"{_fmt(o[r]) if r in ('teacher', 'student') else '':>13s}" for r in roles) + f" {_fmt(o['retention'], False):>9s}")
    lines += ceiling_notes(report)
    return "\n".join(lines)


def ceiling_notes(report: dict) -> list[str]:
    ret = report["retention"]
    out = []
    for task, row in ret["tasks"].items():
        if row["ceiling"]:
            out.append(f"quality ceiling: the teacher itself gets {_fmt(row['teacher'])}% of '{task}' right "
                       f"(below {100 * em.QUALITY_CEILING:.0f}%); a better teacher, not more distillation, moves it")
    return out


def render_markdown(report: dict, rows: list[dict], results: dict[str, dict]) -> str:
    ret, scores = report["retention"], report["scores"]
    roles = [r for r in ROLES if r in scores]
    names = {"teacher": "teacher", "student": "student", "base": "student before distillation"}
    out = [f"# Evaluation: {report['recipe']}", "",
           "Gold accuracy (%) per task; retention = student / teacher; agreement and chrF against the teacher's "
           "own held-out answers; perplexity of the teacher's answers per student token.", "",
           "| task | docs | " + " | ".join(names[r] for r in roles) + " | retention | exact agree | chrF | ppl (student / teacher) |",
           "|---|---:|" + "---:|" * len(roles) + "---:|---:|---:|---:|"]
    for task, row in ret["tasks"].items():
        s, t = scores["student"][task], scores["teacher"][task]
        out.append(f"| {task}{' (ceiling)' if row['ceiling'] else ''} | {report['docs'][task]} | "
                   + " | ".join(_fmt(scores[r][task].get("gold")) for r in roles)
                   + f" | {_fmt(row['retention'], False)} | {_fmt(s['exact'])} | {s['chrf']:.1f} | "
                     f"{_fmt(s['perplexity'], False)} / {_fmt(t['perplexity'], False)} |")
    o = ret["overall"]
    out.append(f"| **overall** | {o['gold_docs']} | " + " | ".join(
        _fmt(o[r]) if r in ("teacher", "student") else "" for r in roles) + f" | **{_fmt(o['retention'], False)}** | | | |")
    out += [""] + [f"> {n}" for n in ceiling_notes(report)]
    by_id = {r["id"]: r for r in rows}
    for task in ret["tasks"]:
        out += ["", f"## {task}: samples", ""]
        student = results["student"]["samples"][task][:SAMPLES_IN_REPORT]
        teacher = {s["id"]: s for s in results["teacher"]["samples"][task]}
        for s in student:
            r = by_id[s["id"]]
            out += [f"**{r['id']}** — {_one_line(r['prompt'])}" + (f" (gold: {r['gold']})" if r["gold"] is not None else ""),
                    f"- teacher: {_one_line(teacher[s['id']]['response'])}",
                    f"- student: {_one_line(s['response'])}", ""]
    return "\n".join(out) + "\n"


def _one_line(text: str | None, width: int = 200) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"
