"""The held-out harness: lm-eval tasks written from the held-out rows, any model scored on them, and the teacher's
answers from generate scored with the same per-prompt hooks. Eval runs it for teacher, student and base; export
for every exported file; bench and publish read its rows.

The tasks are the YAMLs in evals/ over local JSONL built from the recipe's held-out prompts: one generation task
per task type (gold accuracy, agreement with the teacher) and one likelihood task (perplexity of the teacher's
answers). Nothing reaches a hub.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from toolchain.data.rows import iter_jsonl, write_jsonl
from toolchain.models.chat import context, flat_prompt, messages_for, with_instruction
from toolchain.models.references import resolve
from toolchain.quality import scores as em
from toolchain.recipe import Recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

EVALS = Path(__file__).resolve().parents[2] / "evals"


ROLES = ("teacher", "student", "base")


def raw_teacher(cfg: Recipe, role: str) -> bool:
    """A base teacher asked through generate.prompt_template (no chat template) is evaluated the same way."""
    return role == "teacher" and cfg.generate.prompt_template is not None


CONTEXT = "\u2060ctx:"  # a doc prompt that starts CONTEXT<id>\u2060 is rendered with that row's system and turns


def instructed(cfg: Recipe, role: str) -> bool:
    """Whether ``role`` sees the rows' instructions (system prompt, earlier turns): always, except the student
    (and the base it was cut from) under data.strip_instructions, which answer the last user message alone."""
    return role == "teacher" or not cfg.data.strip_instructions


def _prompt_for(cfg: Recipe, role: str, row: dict) -> str:
    """What each model is asked: the teacher as in generate; the student as it was trained. A row with its own
    system message or earlier turns is marked so ``with_context`` renders them in the model's chat template."""
    r, prompt = cfg.reasoning, row["prompt"]
    if cfg.distill.flavour == "reasoning" and (role == "teacher" or r.train_with_instruction):
        prompt = with_instruction(prompt, r.instruction)
    if raw_teacher(cfg, role):
        return cfg.generate.prompt_template.replace("{prompt}", flat_prompt(prompt, context(row)))
    return f"{CONTEXT}{row['id']}\u2060{prompt}" if context(row) and instructed(cfg, role) else prompt


def messages(cfg: Recipe, role: str, row: dict) -> list[dict]:
    """The chat a chat-templated model is asked for a held-out row: what ``_prompt_for`` marks and ``with_context``
    renders, with the recipe's system prompt where lm-eval adds it."""
    r, prompt = cfg.reasoning, row["prompt"]
    if cfg.distill.flavour == "reasoning" and (role == "teacher" or r.train_with_instruction):
        prompt = with_instruction(prompt, r.instruction)
    if not instructed(cfg, role):
        return messages_for(prompt, None)
    return messages_for(prompt, cfg.generate.system_prompt, context(row))


def with_context(cfg: Recipe, lm, rows: list[dict]):
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


def write_tasks(cfg: Recipe, rows: list[dict], student_tok, root: Path, role: str) -> list[str]:
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
                until = list(cfg.generate.stop) if raw_teacher(cfg, role) else []
                body["generation_kwargs"] = {
                    "until": until,
                    "do_sample": False,
                    "max_gen_toks": cfg.eval.max_new_tokens,
                }
            (folder / f"{name}.yaml").write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
            names.append(name)
    return names


def undeclared_notes(cfg: Recipe, rows: list[dict]) -> list[str]:
    tasks = sorted({r["task"] for r in rows if r["gold"] is not None} - set(cfg.tasks))
    return [f"'{t}' has gold answers but no tasks: entry in the recipe; scored by exact match" for t in tasks]


def _scored_doc(cfg: Recipe, r: dict, specs: dict[str, dict]) -> dict:
    """What the per-doc metric hooks (toolchain.quality.scores) read from a held-out row."""
    pattern = cfg.reasoning.answer_pattern if cfg.distill.flavour == "reasoning" else None
    return {"task": r["task"], "gold": r["gold"], "teacher_response": r["response"], "answer_pattern": pattern,
            "metric": json.dumps(specs[r["task"]])}


def hf_lm(cfg: Recipe, model, tok):
    """An in-memory PyTorch model as an lm-eval model."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.eval.batch_size, device="cpu")


def score(cfg: Recipe, lm, task_dir: Path, names: list[str], chat: bool, rows: list[dict] = (),
          role: str = "student") -> dict:
    """Run the tasks ``names`` (written by ``write_tasks`` from ``rows`` for ``role``) on an lm-eval model: metrics
    and per-doc samples."""
    import logging

    import lm_eval
    import lm_eval.evaluator

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # it warns that an in-memory model was passed
    # lm-eval records the git commit of the current directory (not what was evaluated: eval.json has the models'
    # sha256s and the versions), and outside a checkout git prints "fatal: not a git repository" to the console
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    from lm_eval.tasks import TaskManager

    e = cfg.eval
    out = lm_eval.simple_evaluate(
        model=with_context(cfg, lm, rows) if chat and instructed(cfg, role) else lm,
        tasks=names,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        apply_chat_template=chat,
        system_instruction=cfg.generate.system_prompt if chat and instructed(cfg, role) else None,
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


def teacher_from_generate(cfg: Recipe) -> bool:
    """Score the teacher on the held-out answers it gave in generate instead of generating them again: always
    for an endpoint (it cannot be loaded), on request, or (auto) where they are what lm-eval would produce —
    greedy, with no shorter limit than eval's (longer ones are cut to eval.max_new_tokens)."""
    e, g = cfg.eval, cfg.generate
    if not resolve(cfg.teacher).local or g.answers != "teacher":  # the answers the student learned from
        return True
    if e.teacher_answers != "auto":
        return e.teacher_answers == "generate"
    return g.temperature == 0 and g.max_new_tokens >= e.max_new_tokens


def cut_answers(rows: list[dict], tok, max_tokens: int) -> list[dict]:
    out = []
    for r in rows:
        ids = tok(r["response"], add_special_tokens=False).input_ids
        out.append({**r, "response": tok.decode(ids[:max_tokens])} if len(ids) > max_tokens else r)
    return out


def answers_as_given(cfg: Recipe, rows: list[dict], role: str) -> dict:
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


def recorded_likelihood(rows: list[dict], given: list[dict], student_tok) -> dict | None:
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
    for r in answered:  # the same per-doc values as toolchain.quality.scores.process_likelihood
        n = len(student_tok(r["response"], add_special_tokens=False).input_ids)
        by_task[f"{r['task']}_ppl"].append({"id": r["id"], "response": None, "perplexity": [r["teacher_logprob"], n],
                                            "greedy": float(r["teacher_greedy"])})
    metrics = {name: {"perplexity": em.token_perplexity([tuple(s["perplexity"]) for s in ss]),
                      "greedy": em.mean_known([s["greedy"] for s in ss])} for name, ss in by_task.items()}
    return {"metrics": metrics, "samples": dict(by_task)}


def _response(sample: dict):
    r = sample["filtered_resps"][0]
    return r if isinstance(r, str) else None


def confidence_items(cfg: Recipe, rows: list[dict], result: dict) -> list[tuple[str, list[dict], str, list | None]]:
    """(prompt id, the student's chat, its answer, the task's labels or None) for every answered held-out
    generation sample of a scored student: what ``toolchain.quality.confidence.held_out`` scores."""
    by_id = {r["id"]: r for r in rows}
    specs = cfg.task_specs(rows)
    items = []
    for name, samples in sorted(result["samples"].items()):
        if name.endswith("_ppl"):
            continue
        for s in samples:
            row, answer = by_id.get(s.get("id")), s.get("response")
            if row is None or answer is None:
                continue
            spec = specs.get(row["task"], {})
            labels = spec.get("labels") if spec.get("metric") == "label" else None
            items.append((row["id"], messages(cfg, "student", row), answer, labels))
    return items


def evaluate_base(cfg: Recipe) -> bool:
    """The student before distillation is worth its time for a pretrained student; an untrained pruned copy of
    the teacher only says what pruning alone leaves (measured: 0/96 gold at 16 of 30 layers), so it runs on
    request (eval.base: true)."""
    return cfg.eval.base if cfg.eval.base is not None else cfg.student.from_ != "teacher"


BASE_SKIPPED = ("student before distillation: not evaluated (an untrained pruned copy of the teacher, which "
                "scores near 0 before training; eval.base: true measures it)")


def base_skipped(cfg: Recipe) -> str:
    """Why the student before distillation has no column: a pruned copy is not worth it; a pretrained one was
    switched off."""
    return BASE_SKIPPED if cfg.student.from_ == "teacher" else \
        f"student before distillation ({cfg.student.from_}): not evaluated (eval.base: false)"


def task_scores(result: dict, tasks: list[str]) -> dict[str, dict]:
    """One model's metrics per task: the generation task's and its likelihood task's side by side."""
    no_ppl = {"perplexity": None, "greedy": None}
    return {t: {**result["metrics"][t], **result["metrics"].get(f"{t}_ppl", no_ppl)} for t in tasks}


def gold_counts(rows: list[dict]) -> dict[str, int]:
    tasks = sorted({r["task"] for r in rows})
    return {t: sum(1 for r in rows if r["task"] == t and r["gold"] is not None) for t in tasks}


def heldout_rows(cfg: Recipe, generate_dir: Path) -> list[dict]:
    rows = [r for _, r in iter_jsonl(generate_dir / "heldout.jsonl")][: cfg.eval.limit]
    if not rows:
        raise ValueError("eval needs held-out prompts: the recipe's data.heldout is empty")
    return rows
