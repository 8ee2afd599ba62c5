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
from toolchain.chat import context, flat_prompt, messages_for, with_instruction  # noqa: E402
from toolchain.data import iter_jsonl, write_jsonl  # noqa: E402
from toolchain.models import file_sha256, load_tokenizer, load_torch_model, resolve  # noqa: E402
from toolchain.runs import RESUME_DIR, Manifest, read_manifest  # noqa: E402
from toolchain.ui import progress  # noqa: E402

EVALS = Path(__file__).resolve().parents[2] / "evals"
SAMPLES_IN_REPORT = 5
ROLES = ("teacher", "student", "base")


def _raw_teacher(cfg, role: str) -> bool:
    """A base teacher asked through generate.prompt_template (no chat template) is evaluated the same way."""
    return role == "teacher" and cfg.generate.prompt_template is not None


CONTEXT = "\u2060ctx:"  # a doc prompt that starts CONTEXT<id>\u2060 is rendered with that row's system and turns


def _prompt_for(cfg, role: str, row: dict) -> str:
    """What each model is asked: the teacher as in generate; the student as it was trained. A row with its own
    system message or earlier turns is marked so ``with_context`` renders them in the model's chat template."""
    r, prompt = cfg.reasoning, row["prompt"]
    if cfg.distill.flavour == "reasoning" and (role == "teacher" or r.train_with_instruction):
        prompt = with_instruction(prompt, r.instruction)
    if _raw_teacher(cfg, role):
        return cfg.generate.prompt_template.replace("{prompt}", flat_prompt(prompt, context(row)))
    return f"{CONTEXT}{row['id']}\u2060{prompt}" if context(row) else prompt


def with_context(cfg, lm, rows: list[dict]):
    """``lm`` rendering a marked doc prompt as its row's whole chat: lm-eval itself only knows one system
    instruction and one user turn per doc."""
    contexts = {r["id"]: context(r) for r in rows if context(r)}
    if not contexts:
        return lm
    render = lm.apply_chat_template

    def apply(chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        last = chat_history[-1]["content"] if chat_history else ""
        if last.startswith(CONTEXT):
            pid, _, prompt = last[len(CONTEXT):].partition("\u2060")
            chat_history = messages_for(prompt, cfg.generate.system_prompt, contexts[pid])
        return render(chat_history, add_generation_prompt=add_generation_prompt)

    lm.apply_chat_template = apply
    return lm


def write_tasks(cfg, rows: list[dict], student_tok, root: Path, role: str) -> list[str]:
    """lm-eval task YAMLs + JSONL for one model under root/role; returns the task names."""
    folder = root / role
    folder.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[dict]] = defaultdict(list)
    specs = cfg.task_specs(rows)
    for r in rows:
        by_task[r["task"]].append({
            "id": r["id"], "prompt": _prompt_for(cfg, role, r), **_scored_doc(cfg, r, specs),
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
                body["generation_kwargs"] = {
                    "until": until,
                    "do_sample": False,
                    "max_gen_toks": cfg.eval.max_new_tokens,
                }
            (folder / f"{name}.yaml").write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
            names.append(name)
    return names


def undeclared_notes(cfg, rows: list[dict]) -> list[str]:
    tasks = sorted({r["task"] for r in rows if r["gold"] is not None} - set(cfg.tasks))
    return [f"'{t}' has gold answers but no tasks: entry in the recipe; scored by exact match" for t in tasks]


def _scored_doc(cfg, r: dict, specs: dict[str, dict]) -> dict:
    """What the per-doc metric hooks (toolchain.eval_metrics) read from a held-out row."""
    pattern = cfg.reasoning.answer_pattern if cfg.distill.flavour == "reasoning" else None
    return {"task": r["task"], "gold": r["gold"], "teacher_response": r["response"], "answer_pattern": pattern,
            "metric": json.dumps(specs[r["task"]])}


def hf_lm(cfg, model, tok):
    """An in-memory PyTorch model as an lm-eval model."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.eval.batch_size, device="cpu")


def score(cfg, lm, task_dir: Path, names: list[str], chat: bool, rows: list[dict] = ()) -> dict:
    """Run the tasks ``names`` (written by ``write_tasks`` from ``rows``) on an lm-eval model: metrics and
    per-doc samples."""
    import logging

    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # it warns that an in-memory model was passed
    from lm_eval.tasks import TaskManager

    e = cfg.eval
    out = lm_eval.simple_evaluate(
        model=with_context(cfg, lm, rows) if chat else lm,
        tasks=names,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        apply_chat_template=chat,
        system_instruction=cfg.generate.system_prompt if chat else None,
        log_samples=True,
        bootstrap_iters=0,
        random_seed=e.seed,
        numpy_random_seed=e.seed,
        torch_random_seed=e.seed,
        fewshot_random_seed=e.seed,
        verbosity="ERROR",
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


def teacher_from_generate(cfg) -> bool:
    """Score the teacher on the held-out answers it gave in generate instead of generating them again: always
    for an endpoint (it cannot be loaded), on request, or (auto) where they are what lm-eval would produce —
    greedy, with no shorter limit than eval's (longer ones are cut to eval.max_new_tokens)."""
    e, g = cfg.eval, cfg.generate
    if not resolve(cfg.teacher).local or g.answers != "teacher":  # the answers the student learned from
        return True
    if e.teacher_answers != "auto":
        return e.teacher_answers == "generate"
    return g.temperature == 0 and g.max_new_tokens >= e.max_new_tokens


def _cut(rows: list[dict], tok, max_tokens: int) -> list[dict]:
    out = []
    for r in rows:
        ids = tok(r["response"], add_special_tokens=False).input_ids
        out.append({**r, "response": tok.decode(ids[:max_tokens])} if len(ids) > max_tokens else r)
    return out


def _answers_as_given(cfg, rows: list[dict], role: str) -> dict:
    """Score the held-out answers the teacher gave in generate with the same per-doc hooks (the likelihood
    tasks are filled in separately where the teacher can be loaded)."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    specs = cfg.task_specs(rows)
    for r in rows:
        scored = em.process_generation(_scored_doc(cfg, r, specs), [r["response"]])
        by_task[r["task"]].append({"id": r["id"], "response": r["response"], **scored})
    metrics, samples = {}, {}
    for task, ss in by_task.items():
        metrics[task] = {k: em.mean_known([s[k] for s in ss]) for k in ("gold", "exact", "chrf")}
        metrics[f"{task}_ppl"] = {"perplexity": None, "greedy": None}
        samples[task] = ss
        samples[f"{task}_ppl"] = []
    given = sum(r.get("source") == "reference" for r in rows)
    source = ("generate (the teacher's held-out answers)" if not given else
              f"the data's reference answers{' (' + cfg.data.answers_from + ')' if cfg.data.answers_from else ''}"
              + (f" for {given} of {len(rows)} prompts, the teacher's for the rest" if given < len(rows) else ""))
    return {"metrics": metrics, "samples": samples, "source": source}


def _recorded_likelihood(rows: list[dict], given: list[dict], student_tok) -> dict | None:
    """The likelihood tasks' results for the teacher from what generate recorded of its own decoding (the
    log-likelihood of each held-out answer under the logits llama.cpp chose it from): the numbers lm-eval's
    likelihood task computes, without loading the teacher. None unless every answered row has them and none
    was cut to eval.max_new_tokens."""
    answered = [r for r in rows if r["response"].strip()]
    if not answered or any(r.get("teacher_logprob") is None for r in answered):
        return None
    if any(a["response"] != b["response"] for a, b in zip(rows, given)):
        return None
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in answered:  # the same per-doc values as toolchain.eval_metrics.process_likelihood
        n = len(student_tok(r["response"], add_special_tokens=False).input_ids)
        by_task[f"{r['task']}_ppl"].append({"id": r["id"], "response": None, "perplexity": [r["teacher_logprob"], n],
                                            "greedy": float(r["teacher_greedy"])})
    metrics = {name: {"perplexity": em.token_perplexity([tuple(s["perplexity"]) for s in ss]),
                      "greedy": em.mean_known([s["greedy"] for s in ss])} for name, ss in by_task.items()}
    return {"metrics": metrics, "samples": dict(by_task)}


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
        return AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
            merged
        )

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
    if evaluate_base(cfg):
        base_ref = teacher_ref if cfg.student.from_ == "teacher" else resolve(cfg.student.from_)
        out.append(("base", base, base_ref.sha256()))
    return out


def evaluate_base(cfg) -> bool:
    """The student before distillation is worth its time for a pretrained student; an untrained pruned copy of
    the teacher only says what pruning alone leaves (measured: 0/96 gold at 16 of 30 layers), so it runs on
    request (eval.base: true)."""
    return cfg.eval.base if cfg.eval.base is not None else cfg.student.from_ != "teacher"


BASE_SKIPPED = ("student before distillation: not evaluated (an untrained pruned copy of the teacher, which "
                "scores near 0 before training; eval.base: true measures it)")


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
            reuse = role == "teacher" and teacher_from_generate(cfg)
            if reuse:  # its greedy answers from generate, and its likelihood of them where generate recorded it
                ref = resolve(cfg.teacher)
                tok = load_tokenizer(ref) if ref.local else None
                given = _cut(rows, tok, cfg.eval.max_new_tokens) if tok is not None else rows
                results[role] = _answers_as_given(cfg, given, role)
                ppl = [n for n in names if n.endswith("_ppl")]
                recorded = _recorded_likelihood(rows, given, student_tok)
                if recorded is not None:
                    results[role]["metrics"].update(recorded["metrics"])
                    results[role]["samples"].update(recorded["samples"])
                    results[role]["likelihood_source"] = "generate"
                elif ref.local and ppl:
                    model, tok = load()
                    lik = score(cfg, hf_lm(cfg, model, tok), out_dir / "tasks" / role, ppl,
                                chat=not _raw_teacher(cfg, role), rows=rows)
                    results[role]["metrics"].update(lik["metrics"])
                    results[role]["samples"].update(lik["samples"])
                    del model
            else:
                model, tok = load()
                results[role] = score(cfg, hf_lm(cfg, model, tok), out_dir / "tasks" / role, names,
                                      chat=not _raw_teacher(cfg, role), rows=rows)
                del model
            saved.write_text(json.dumps(results[role]), encoding="utf-8")
            bar.update(task, advance=1)

    judged = _judge(cfg, rows, results, resume)
    report = _report(cfg, rows, results, {role: sha for role, _, sha in models})
    synthetic = read_manifest(inputs["generate"], verify=False)["metrics"].get("synthetic")
    if synthetic:
        report["synthetic"] = synthetic
    if judged:
        report["judge"] = {task: j["summary"] for task, j in judged.items()}
        write_jsonl(out_dir / "judge.jsonl", [{"task": t, **row} for t, j in judged.items() for row in j["rows"]])
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


def _judge(cfg, rows: list[dict], results: dict, resume: Path) -> dict:
    """tasks with metric judge: the judge model compares the student's held-out answers with the teacher's
    (toolchain.judge), both orders; kept in the resume folder so a kill does not ask it again."""
    from toolchain import judge
    from toolchain.backends import endpoint_options, open_engine

    tasks = {t: spec for t, spec in cfg.tasks.items() if spec.metric == "judge" and any(r["task"] == t for r in rows)}
    saved = resume / "judge.json"
    done = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else {}
    todo = [t for t in sorted(tasks) if t not in done]
    if todo:
        prompts = {r["id"]: r["prompt"] for r in rows}
        with progress() as bar:
            bar_task = bar.add_task("judge", total=sum(r["task"] in todo for r in rows), info="")
            for t in todo:
                ref = resolve(tasks[t].judge or cfg.teacher)
                engine = open_engine(ref, "auto", n_ctx=cfg.generate.n_ctx, threads=cfg.generate.threads,
                                     endpoint=endpoint_options(cfg.generate) if ref.kind == "openai" else None)
                answers = {role: {s["id"]: s["response"] or "" for s in results[role]["samples"][t]}
                           for role in ("teacher", "student")}
                docs = [{"id": i, "prompt": prompts[i], "teacher": answers["teacher"][i], "student": s}
                        for i, s in answers["student"].items()]
                bar.update(bar_task, info=f"{t} ({ref.ref})")
                judged = judge.judge_task(
                    engine, tasks[t].rubric, docs, on_done=lambda: bar.update(bar_task, advance=1)
                )
                engine.close()
                done[t] = {"rows": judged, "summary": {**judge.summary(judged, cfg.eval.bootstrap_iters, cfg.eval.seed),
                                                       "judge": ref.ref, "rubric": tasks[t].rubric or judge.RUBRIC}}
                saved.write_text(json.dumps(done), encoding="utf-8")
    return done


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

    from toolchain import stats

    tasks = sorted({r["task"] for r in rows})
    scores = {role: task_scores(res, tasks) for role, res in results.items()}
    counts = gold_counts(rows)
    paired = em.paired_tables(results, tasks)
    tables = {t: (v["teacher"], v["student"]) for t, v in paired.items()}
    specs = cfg.task_specs(rows)
    return {
        "recipe": cfg.name,
        "scores": scores,
        "retention": em.retention_table(scores, counts),
        "intervals": stats.summarize(tables, cfg.eval.bootstrap_iters, cfg.eval.seed),
        "gate": em.gate(paired, cfg.eval, cfg.eval.seed, cfg.task_floors()),
        "paired": paired,
        "metrics": specs,
        "labels": em.label_tables(specs, rows, results),
        "notes": undeclared_notes(cfg, rows),
        "base": {"evaluated": "base" in results, "note": None if "base" in results else BASE_SKIPPED},
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
            "teacher_prompt_template": cfg.generate.prompt_template,
            "limit": cfg.eval.limit,
        },
        "versions": {p: version(p) for p in ("lm_eval", "transformers", "torch", "sacrebleu")},
        "quality_ceiling": em.QUALITY_CEILING,
    }


def _fmt(x, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.2f}"


def _ci(lo_hi, pct: bool = True) -> str:
    if not lo_hi:
        return ""
    lo, hi = lo_hi
    return f"[{100 * lo:.0f}-{100 * hi:.0f}]" if pct else f"[{lo:.2f}-{hi:.2f}]"


def _quality_rows(report: dict, verdict: dict | None):
    """(task, n, teacher, student, retention, McNemar p, gate) cells per gold task and the pool, as strings."""
    ret, iv = report["retention"], report.get("intervals", {}).get("tasks", {})
    judged = (verdict or {}).get("tasks", {})
    names = [t for t, r in ret["tasks"].items() if r["teacher"] is not None] + ["overall"]
    for name in names:
        row = ret["overall"] if name == "overall" else ret["tasks"][name]
        if row["teacher"] is None:
            continue
        i = iv.get(name, {})
        p = i.get("p_student_below")
        g = judged.get(name)
        gate = "" if g is None else ("pass" if g["passed"] else "FAIL") + f" ({g['why']}, floor {g['floor']:g})"
        n = row["gold_docs"] if name != "overall" else ret["overall"]["gold_docs"]
        yield (name, str(n), f"{_fmt(row['teacher'])} {_ci(i.get('teacher'))}".strip(),
               f"{_fmt(row['student'])} {_ci(i.get('student'))}".strip(),
               f"{_fmt(row['retention'], False)} {_ci(i.get('retention'), False)}".strip(),
               "-" if p is None else f"{p:.3f}", gate)


def render_table(report: dict, verdict: dict | None = None) -> str:
    """The console table: gold accuracy of teacher and student with 95% intervals, retention, McNemar's p of
    "student below teacher" and the gate's decision per task; then agreement with the teacher and perplexity."""
    verdict = verdict if verdict is not None else report.get("gate")
    lines = [
        f"{'task':12s} {'n':>4s}  {'teacher gold':17s} {'student gold':17s} {'retention':17s} {'p(s<t)':>7s}  gate"
    ]
    for name, n, t, s, r, p, g in _quality_rows(report, verdict):
        lines.append(f"{name:12s} {n:>4s}  {t:17s} {s:17s} {r:17s} {p:>7s}  {g}")
    scores = report["scores"]
    lines += ["", f"{'task':12s} {'n':>4s} {'agree':>6s} {'chrF':>6s} {'ppl s/t':>13s}"
              + (f" {'before':>7s}" if "base" in scores else "")]
    for task in report["retention"]["tasks"]:
        s = scores["student"][task]
        ppl = f"{_fmt(s['perplexity'], False)}/{_fmt(scores['teacher'][task]['perplexity'], False)}"
        before = f" {_fmt(scores['base'][task].get('gold')):>7s}" if "base" in scores else ""
        lines.append(f"{task:12s} {report['docs'][task]:4d} {_fmt(s['exact']):>6s} {s['chrf']:6.1f} {ppl:>13s}{before}")
    lines += [""] + interval_notes(report) + gate_notes(report, verdict) + ceiling_notes(report)
    return "\n".join(lines).rstrip()


def interval_notes(report: dict) -> list[str]:
    iv = report.get("intervals")
    if not iv:
        return []
    out = [f"[..]: 95% intervals, {iv['method']}, {iv['iters']} resamples, seed {iv['seed']}; "
           f"p(s<t): McNemar's exact one-sided test of \"student below teacher\""]
    source = str(report.get("teacher_answers", ""))
    if source.startswith("generate"):
        out.append("teacher gold: its greedy held-out answers from the generate stage (eval.teacher_answers)")
    elif source.startswith("the data's reference answers"):
        out.append(f"teacher column: {source} (generate.answers), what the student learned from")
    if report.get("teacher_likelihood") == "generate":
        out.append("teacher perplexity: of its held-out answers under the logits llama.cpp chose them from in generate")
    if report.get("base", {}).get("note"):
        out.append(report["base"]["note"])
    metrics = report.get("metrics", {})
    if metrics:
        out.append("gold checked by: " + ", ".join(
            f"{t} {m['metric']}" + (f" (at most {m['max_words']} words)" if m.get("max_words") else "")
            for t, m in sorted(metrics.items()) if report.get("gold_docs", {}).get(t) or m["metric"] == "judge"))
    return out + list(report.get("notes", []))


def gate_notes(report: dict, verdict: dict | None) -> list[str]:
    if not verdict:
        return []
    head = (f"gate ({verdict['rule']}, level {verdict['level']:g}): "
            + ("passed" if verdict["passed"] else "FAILED: " + ", ".join(verdict["failed"])))
    notes = [f"  {name}: {v['note']}" for name, v in verdict["tasks"].items() if v.get("note")]
    return [head, *notes]


def ceiling_notes(report: dict) -> list[str]:
    ret = report["retention"]
    out = []
    for task, row in ret["tasks"].items():
        if row["ceiling"]:
            out.append(f"quality ceiling: the teacher itself gets {_fmt(row['teacher'])}% of '{task}' right "
                       f"(below {100 * em.QUALITY_CEILING:.0f}%); a better teacher, not more distillation, moves it")
    for task, lab in (report.get("labels") or {}).items():
        teacher, base = ret["tasks"].get(task, {}).get("teacher"), lab["baselines"]
        if teacher is not None and base["majority"] is not None and teacher <= base["majority"]:
            out.append(f"'{task}': the teacher ({_fmt(teacher)}%) is no better than always answering "
                       f"'{base['majority_label']}' ({_fmt(base['majority'])}%): distil from reference answers or a "
                       "stronger teacher; distilling this one teaches the student nothing")
    return out


def label_markdown(report: dict) -> list[str]:
    """Per label task: precision and recall per label for each model, the baselines, and the confusion matrices."""
    out = []
    for task, lab in (report.get("labels") or {}).items():
        roles = [r for r in ROLES if r in lab]
        base = lab["baselines"]
        out += [
            "",
            f"## {task}: labels",
            "",
            f"Baselines: always '{base['majority_label']}' {_fmt(base['majority'])}%, a uniform guess "
            f"{_fmt(base['uniform'])}%. Precision / recall (%) per label; the label an answer names first "
            'counts, "(none)" when it names none.',
            "",
            "| label | support | " + " | ".join(f"{r} P / R" for r in roles) + " |",
            "|---|---:|" + "---:|" * len(roles),
        ]
        for x in lab["labels"]:
            cells = [
                f"{_fmt(lab[r]['per_label'][x]['precision'])} / {_fmt(lab[r]['per_label'][x]['recall'])}" for r in roles
            ]
            out.append(f"| {x} | {lab[roles[0]]['per_label'][x]['support']} | " + " | ".join(cells) + " |")
        for r in roles:
            cols = list(lab["labels"]) + [em.NO_LABEL]
            out += ["", f"{r}: gold (rows) against the label answered (columns)", "",
                    "| gold | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
            for gold, row in lab[r]["confusion"].items():
                out.append(f"| {gold} | " + " | ".join(str(row.get(c, 0)) for c in cols) + " |")
    return out


def render_markdown(report: dict, rows: list[dict], results: dict[str, dict]) -> str:
    ret, scores = report["retention"], report["scores"]
    verdict = report.get("gate")
    out = [f"# Evaluation: {report['recipe']}", ""]
    if verdict:
        out += [f"**Quality gate: {'passed' if verdict['passed'] else 'FAILED'}** ({verdict['rule']} rule, "
                f"level {verdict['level']:g}; docs/evaluation.md explains it).", ""]
    out += ["Gold accuracy (%) per task with 95% intervals; retention = student / teacher; p(s<t): McNemar's exact "
            "test of \"student below teacher\".", "",
            "| task | n | teacher | student | retention | p(s<t) | gate |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, n, t, s_, r, p, g in _quality_rows(report, verdict):
        bold = "**" if name == "overall" else ""
        out.append(f"| {bold}{name}{bold}{' (ceiling)' if name != 'overall' and ret['tasks'][name]['ceiling'] else ''} "
                   f"| {n} | {t} | {s_} | {bold}{r}{bold} | {p} | {g} |")
    roles = [r for r in ROLES if r in scores]
    names = {"teacher": "teacher", "student": "student", "base": "student before distillation"}
    out += [
        "",
        "Agreement and chrF against the teacher's own held-out answers; perplexity of the teacher's answers "
        "per student token.",
        "",
        "| task | docs | "
        + " | ".join(f"{names[r]} gold" for r in roles)
        + " | exact agree | chrF | ppl (student / teacher) |",
        "|---|---:|" + "---:|" * len(roles) + "---:|---:|---:|",
    ]
    for task in ret["tasks"]:
        s_, t = scores["student"][task], scores["teacher"][task]
        out.append(
            f"| {task} | {report['docs'][task]} | "
            + " | ".join(_fmt(scores[r][task].get("gold")) for r in roles)
            + f" | {_fmt(s_['exact'])} | {s_['chrf']:.1f} | {_fmt(s_['perplexity'], False)} / "
              f"{_fmt(t['perplexity'], False)} |"
        )
    out += [""] + [f"> {n}" for n in interval_notes(report) + gate_notes(report, verdict) + ceiling_notes(report)
                   + synthetic_notes(report)]
    out += label_markdown(report) + judge_markdown(report)
    by_id = {r["id"]: r for r in rows}
    for task in ret["tasks"]:
        out += ["", f"## {task}: samples", ""]
        student = results["student"]["samples"][task][:SAMPLES_IN_REPORT]
        teacher = {s["id"]: s for s in results["teacher"]["samples"][task]}
        for s in student:
            r = by_id[s["id"]]
            out += [
                f"**{r['id']}** — {_one_line(r['prompt'])}"
                + (f" (gold: {r['gold']})" if r["gold"] is not None else ""),
                f"- teacher: {_one_line(teacher[s['id']]['response'])}",
                f"- student: {_one_line(s['response'])}",
                "",
            ]
    return "\n".join(out) + "\n"


def synthetic_notes(report: dict) -> list[str]:
    """Where the training prompts came from when the teacher wrote some (synthesize), and how many of those were
    dropped for resembling a held-out prompt: the user sees that the scores above are not inflated by them."""
    s = report.get("synthetic")
    if not s:
        return []
    return [f"training prompts: {s['seeds']} from the data and {s['kept']} written by the teacher ({s['method']}; "
            f"{s['written']} written); {s.get('dropped_contaminated', 0)} dropped as contaminated (sharing at least "
            f"{s['decontaminate_threshold']:.0%} of their word {s['decontaminate_ngram']}-grams with a held-out "
            f"prompt), {s.get('dropped_exact_duplicate', 0) + s.get('dropped_near_duplicate', 0)} as duplicates"]


def judge_markdown(report: dict) -> list[str]:
    """The judge tasks: the student's answer against the teacher's, as the judge model saw them."""
    judged = report.get("judge") or {}
    if not judged:
        return []
    out = ["", "## Judged tasks", "",
           "A judge model compared the student's answer with the teacher's for each held-out prompt, asked twice with "
           "the answers swapped. Score: 1 = student better in both orders, 0.5 = tie (or the orders disagree), "
           "0 = teacher better; 0.5 overall is as good as the teacher.", "",
           "| task | judge | n | student wins | ties | teacher wins | score [95%] | orders agree | parse failures |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for task, j in judged.items():
        iv = f" [{j['interval'][0]:.2f}-{j['interval'][1]:.2f}]" if j["interval"] else ""
        agree = "-" if j["order_agreement"] is None else f"{100 * j['order_agreement']:.0f}%"
        score = "-" if j["score"] is None else f"{j['score']:.2f}{iv}"
        out.append(f"| {task} | {j['judge']} | {j['n']} | {j['wins']} | {j['ties']} | {j['losses']} | {score} | "
                   f"{agree} "
                   f"| {j['parse_failures']} of {j['asked']} |")
    weak = [t for t, j in judged.items() if j["order_agreement"] is not None and j["order_agreement"] < 0.5]
    if weak:
        out += ["", f"> {', '.join(weak)}: the judge changed its verdict with the answers' order for most prompts; "
                    "it is too weak for this task: name a stronger judge in tasks.<task>.judge (an openai: endpoint)."]
    return out


def _one_line(text: str | None, width: int = 200) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"
