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
from pathlib import Path

import torch

from toolchain.backends import asking
from toolchain.data.rows import iter_jsonl, write_jsonl
from toolchain.models import cut
from toolchain.models.references import file_sha256, load_tokenizer, load_torch_model, resolve
from toolchain.pipeline.runs import RESUME_DIR, Manifest, read_manifest, write_json_atomic
from toolchain.quality import cascade, classical, confidence, heldout, judge, stats
from toolchain.quality import scores as em
from toolchain.quality.gate import gate
from toolchain.recipe import Recipe
from toolchain.render.markdown import eval_markdown
from toolchain.ui import progress


def _models(cfg: Recipe, inputs: dict[str, Path]):
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
        return AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
            merged
        )

    def base():
        return cut.recut(cfg, info), AutoTokenizer.from_pretrained(merged)

    out = [("teacher", teacher, teacher_ref.sha256() if teacher_ref.local else None), ("student", student, student_sha)]
    if heldout.evaluate_base(cfg):
        base_ref = teacher_ref if cfg.student.from_ == "teacher" else resolve(cfg.student.from_)
        out.append(("base", base, base_ref.sha256()))
    return out


def run(cfg: Recipe, inputs: dict[str, Path], out_dir: Path) -> Manifest:
    from transformers import AutoTokenizer

    rows = heldout.heldout_rows(cfg, inputs["generate"])
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
            names = heldout.write_tasks(cfg, rows, student_tok, out_dir / "tasks", role)
            reuse = role == "teacher" and heldout.teacher_from_generate(cfg)
            if reuse:  # its greedy answers from generate, and its likelihood of them where generate recorded it
                ref = resolve(cfg.teacher)
                tok = load_tokenizer(ref) if ref.local else None
                given = heldout.cut_answers(rows, tok, cfg.eval.max_new_tokens) if tok is not None else rows
                results[role] = heldout.answers_as_given(cfg, given, role)
                ppl = [n for n in names if n.endswith("_ppl")]
                recorded = heldout.recorded_likelihood(rows, given, student_tok)
                if recorded is not None:
                    results[role]["metrics"].update(recorded["metrics"])
                    results[role]["samples"].update(recorded["samples"])
                    results[role]["likelihood_source"] = "generate"
                elif ref.local and ppl:
                    model, tok = load()
                    lik = heldout.score(cfg, heldout.hf_lm(cfg, model, tok), out_dir / "tasks" / role, ppl,
                                chat=not heldout.raw_teacher(cfg, role), rows=rows, role=role)
                    results[role]["metrics"].update(lik["metrics"])
                    results[role]["samples"].update(lik["samples"])
                    del model
            else:
                model, tok = load()
                results[role] = heldout.score(cfg, heldout.hf_lm(cfg, model, tok), out_dir / "tasks" / role, names,
                                      chat=not heldout.raw_teacher(cfg, role), rows=rows, role=role)
                if role == "student":  # how sure it was of each answer: what a cascade routes on
                    bar.update(task, info="student confidence")
                    results[role]["confidence"] = confidence.held_out(
                        model, tok, heldout.confidence_items(cfg, rows, results[role]))
                del model
            write_json_atomic(saved, results[role])
            bar.update(task, advance=1)

    judged = _judge(cfg, rows, results, resume)
    report = _report(cfg, rows, results, {role: sha for role, _, sha in models}, training_rows(inputs["generate"]))
    synthetic = read_manifest(inputs["generate"], verify=False)["metrics"].get("synthetic")
    if synthetic:
        report["synthetic"] = synthetic
    if judged:
        report["judge"] = {task: j["summary"] for task, j in judged.items()}
        write_jsonl(out_dir / "judge.jsonl", [{"task": t, **row} for t, j in judged.items() for row in j["rows"]])
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "eval.md").write_text(eval_markdown(report, rows, results), encoding="utf-8")
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


def _judge(cfg: Recipe, rows: list[dict], results: dict, resume: Path) -> dict:
    """tasks with metric judge: the judge model compares the student's held-out answers with the teacher's
    (toolchain.quality.judge), both orders; kept in the resume folder so a kill does not ask it again."""
    tasks = {t: spec for t, spec in cfg.tasks.items() if spec.metric == "judge" and any(r["task"] == t for r in rows)}
    saved = resume / "judge.json"
    done = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else {}
    todo = [t for t in sorted(tasks) if t not in done]
    if todo:
        prompts = {r["id"]: r["prompt"] for r in rows}
        with progress() as bar:
            bar_task = bar.add_task("judge", total=sum(r["task"] in todo for r in rows), info="")
            for t in todo:
                own = tasks[t].judge is not None  # a judge of its own is asked with its own key variable
                pool = asking.Pool(cfg, seed=0, ref=tasks[t].judge or cfg.teacher, backend="auto",
                                   key=(tasks[t].judge_api_key_env, f"tasks.{t}.judge_api_key_env") if own else None)
                ref = pool.ref
                answers = {role: {s["id"]: s["response"] or "" for s in results[role]["samples"][t]}
                           for role in ("teacher", "student")}
                docs = [{"id": i, "prompt": prompts[i], "teacher": answers["teacher"][i], "student": s}
                        for i, s in answers["student"].items()]
                bar.update(bar_task, info=f"{t} ({ref.ref})")
                with pool:
                    judged = judge.judge_task(pool.engine, tasks[t].rubric, docs,
                                              on_done=lambda: bar.update(bar_task, advance=1))
                done[t] = {"rows": judged, "summary": {**judge.summary(judged, cfg.eval.bootstrap_iters, cfg.eval.seed),
                                                       "judge": ref.ref, "rubric": tasks[t].rubric or judge.RUBRIC}}
                write_json_atomic(saved, done)
    return done


def training_rows(generate_dir: Path) -> list[dict]:
    """Every training prompt generate asked, once each (its first sample), with its gold where the data had one:
    what a classical baseline trains on (the teacher's answers, and which of them were kept, do not matter)."""
    path = generate_dir / "responses.jsonl"
    seen: dict[str, dict] = {}
    for _, r in iter_jsonl(path if path.is_file() else generate_dir / "train.jsonl"):
        if r.get("split", "train") == "train":
            seen.setdefault(r["id"], r)
    return list(seen.values())


def _report(cfg: Recipe, rows: list[dict], results: dict[str, dict], shas: dict[str, str | None],
            train: list[dict]) -> dict:
    from importlib.metadata import version

    tasks = sorted({r["task"] for r in rows})
    scores = {role: heldout.task_scores(res, tasks) for role, res in results.items()}
    counts = heldout.gold_counts(rows)
    paired = em.paired_tables(results, tasks)
    tables = {t: (v["teacher"], v["student"]) for t, v in paired.items()}
    specs = cfg.task_specs(rows)
    out = {
        "recipe": cfg.name,
        "scores": scores,
        "retention": em.retention_table(scores, counts),
        "intervals": stats.summarize(tables, cfg.eval.bootstrap_iters, cfg.eval.seed),
        "gate": gate(paired, cfg.eval, cfg.eval.seed, cfg.task_floors()),
        "confidence": results["student"].get("confidence"),
        "paired": paired,
        "metrics": specs,
        "labels": classical.label_tables(em.label_tables(specs, rows, results), specs, train, rows, results,
                                         cfg.cost.usd_per_hour, cfg.eval.bootstrap_iters, cfg.eval.seed),
        "notes": heldout.undeclared_notes(cfg, rows),
        "base": {"evaluated": "base" in results, "note": None if "base" in results else heldout.base_skipped(cfg)},
        "teacher_answers": results["teacher"].get("source", "lm-eval (generated again)"),
        "teacher_likelihood": results["teacher"].get("likelihood_source", "lm-eval"),
        "docs": {t: sum(1 for r in rows if r["task"] == t) for t in tasks},
        "gold_docs": counts,
        "models": {role: {"sha256": sha} for role, sha in shas.items()},
        "settings": {
            "batch_size": cfg.eval.batch_size,
            "seed": cfg.eval.seed,
            "max_new_tokens": cfg.eval.max_new_tokens,
            "greedy": True,
            "apply_chat_template": True,
            "system_prompt": cfg.generate.system_prompt,
            "student_system_prompt": cfg.student_system_prompt(),
            "strip_instructions": cfg.data.strip_instructions,
            "teacher_prompt_template": cfg.generate.prompt_template,
            "limit": cfg.eval.limit,
        },
        "versions": {p: version(p) for p in ("lm_eval", "transformers", "torch", "sacrebleu")},
        "quality_ceiling": em.QUALITY_CEILING,
    }
    c = cfg.eval.cascade
    out["cascade"] = cascade.from_eval(out, c.targets, c.calibration, c.seed, cfg.eval.gate_level, c.rule)
    return out
