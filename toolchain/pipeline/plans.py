"""The stage table: which stages exist, in which order, what each reads, which recipe fields and input files make
up its key, and where a recipe's finished stages are. One floor below the pipeline that runs them, so stages,
serving and publishing can find a finished stage without importing the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from toolchain.data.formats import source_digest, source_path, split_source
from toolchain.data.rows import DataError
from toolchain.models.references import resolve
from toolchain.models.vocab import RULES
from toolchain.pipeline.runs import RunDir, RunError, read_manifest, stage_key
from toolchain.recipe import Recipe

STAGES = ("synthesize", "generate", "distill", "merge", "eval", "export", "bench")
GATE = (
    "min_retention",
    "gate",
    "gate_level",
    "gate_margin",
    "allow_undecided",
    "cascade",
)  # judged after the fact, never in a key (nor tasks.*.min_retention)


@dataclass(frozen=True)
class StagePlan:
    name: str
    upstream: tuple[str, ...]
    config: Callable  # cfg -> dict (the fields that define this stage's output)
    module: str
    active: Callable = lambda cfg: True  # a stage a recipe does not use is skipped, and is no input of later ones


def _teacher_io(cfg: Recipe) -> dict:
    return {"teacher": cfg.teacher}


def _generate_extras(cfg: Recipe) -> dict:
    """Only what changes generate's output: hard and online soft-label share one generate result."""
    d = cfg.distill
    if d.flavour == "reasoning":
        return {"reasoning": cfg.section("reasoning")}
    if d.flavour == "soft" and d.soft.teacher_logits == "cache":
        return {"topk": {"k": d.soft.top_k, "temperature": d.soft.temperature}}
    return {}


# Distill settings added after runs existed: at these values they enter no key, so recipes without them keep the
# keys (and finished runs) they had. teacher_device never does: where the teacher runs changes no result.
_LATER_DEFAULTS = {"warmup_epochs": 0.0, "dtype": "float32", "teacher_dtype": "float32", "loss_chunk": None,
                   "gradient_checkpointing": False, "validation": None}


def _distill_section(cfg: Recipe) -> dict:
    d = cfg.section("distill")
    if not cfg.distill.on_policy.fraction:
        d.pop("on_policy")
    d.pop("teacher_device")
    return {k: v for k, v in d.items() if k not in _LATER_DEFAULTS or _LATER_DEFAULTS[k] != v}


def _validation_scoring(cfg: Recipe) -> dict:
    """distill.validation scores its slice as eval scores held-out prompts: the same metrics and answer length."""
    if cfg.distill.validation is None:
        return {}
    return {"validation_scoring": {"tasks": _scoring(cfg), "max_new_tokens": cfg.eval.max_new_tokens,
                                   "reasoning": cfg.reasoning.answer_pattern if cfg.distill.flavour == "reasoning"
                                   else None}}


def _scoring(cfg: Recipe) -> dict:
    """The tasks section as scoring sees it: each task's metric, without its gate floor (judged afterwards)."""
    return {name: t.model_dump(exclude={"min_retention"}) for name, t in sorted(cfg.tasks.items())}


def _vocab_rules(cfg: Recipe) -> dict:
    """A trimmed vocabulary depends on the rules that choose it (toolchain.models.vocab.RULES), not only on its size."""
    if cfg.student.vocab is None:
        return {}

    return {"vocab_rules": RULES}


def _data_settings(cfg: Recipe) -> dict:
    # Prompt files enter keys by content (see external_inputs), not by path: moving a recipe or its data does not
    # re-run the teacher.
    # settings added after runs existed enter no key at their defaults, so recipes without them keep their runs
    return {k: v for k, v in cfg.section("data").items()
            if k not in ("train", "heldout", "strip_instructions") and not (k == "reference_is_gold" and v is False)}


def _student_input(cfg: Recipe) -> dict:
    """data.strip_instructions changes what the student sees (distill and everything after it), not what the
    teacher answered: it enters distill's key, never generate's (and, off, no key at all)."""
    return {"strip_instructions": True} if cfg.data.strip_instructions else {}


PLANS = {
    "synthesize": StagePlan(
        "synthesize", (),
        lambda c: {**_teacher_io(c), "synthesize": c.section("synthesize") if c.synthesize else None,
                   "data": _data_settings(c),
                   "backend": c.generate.backend, "system_prompt": c.generate.system_prompt},
        "toolchain.stages.synthesize",
        active=lambda c: c.synthesize is not None,
    ),
    "generate": StagePlan(
        "generate", ("synthesize",),
        lambda c: {**_teacher_io(c), "generate": c.section("generate"), "data": _data_settings(c),
                   **_generate_extras(c)},
        "toolchain.stages.generate",
    ),
    "distill": StagePlan(
        "distill", ("generate",),
        lambda c: {**_teacher_io(c), "distill": _distill_section(c), "student": c.section("student"),
                   "system_prompt": c.generate.system_prompt, **_vocab_rules(c), **_student_input(c),
                   **_validation_scoring(c)},
        "toolchain.stages.distill",
    ),
    "merge": StagePlan(
        "merge", ("distill",),
        lambda c: {"merge": c.section("merge"), "max_new_tokens": c.eval.max_new_tokens,
                   "flavour": c.distill.flavour, "system_prompt": c.generate.system_prompt,
                   "reasoning": c.section("reasoning") if c.distill.flavour == "reasoning" else None},
        "toolchain.stages.merge",
    ),
    "eval": StagePlan(
        "eval", ("generate", "distill", "merge"),
        # The gate (floors, rule, level) is applied to the results afterwards: changing it re-runs nothing.
        lambda c: {**_teacher_io(c), "eval": {k: v for k, v in c.section("eval").items() if k not in GATE},
                   "tasks": _scoring(c), "system_prompt": c.generate.system_prompt, "flavour": c.distill.flavour,
                   "reasoning": c.section("reasoning") if c.distill.flavour == "reasoning" else None},
        "toolchain.stages.eval",
    ),
    "export": StagePlan(
        "export", ("generate", "merge", "eval"),
        # Scored like eval (same tasks, prompts and settings), so eval's settings are part of the key too.
        # serve.constrain: task at export time adds the free/constrained comparison to every GGUF's scores; like the
        # gate it is no part of the key (turning it on must not make the served files stale): `export --force` adds it.
        lambda c: {"export": c.section("export"),
                   "eval": {k: v for k, v in c.section("eval").items() if k not in (*GATE, "base", "log_samples")},
                   "tasks": _scoring(c),
                   "system_prompt": c.generate.system_prompt, "flavour": c.distill.flavour,
                   "reasoning": c.section("reasoning") if c.distill.flavour == "reasoning" else None},
        "toolchain.stages.export",
    ),
    "bench": StagePlan(
        "bench", ("generate", "distill", "merge", "eval", "export"),
        lambda c: {**_teacher_io(c), "bench": c.section("bench"), "cost": c.section("cost"),
                   "system_prompt": c.generate.system_prompt, "stream_interval_ms": c.serve.stream_interval_ms},
        "toolchain.stages.bench",
    ),
}


def external_inputs(cfg: Recipe, stage: str) -> dict[str, tuple[str, Path | None]]:
    """Inputs from outside the run directory: model files and prompt files, by content hash."""
    out: dict[str, tuple[str, Path | None]] = {}
    if stage in ("synthesize", "generate"):
        out["teacher"] = (resolve(cfg.teacher).sha256(), None)
        for split in ("train", "heldout"):
            for i, source in enumerate(getattr(cfg.data, split)):
                path = source_path(split_source(str(source))[0], cfg.data_path)
                if path is not None and not path.exists():
                    raise DataError(f"{path}: prompt file not found (data.{split}[{i}])")
                digest = source_digest(str(source), path, "train" if split == "train" else "test")
                out[f"data:{split}:{i}"] = (digest, None)
    if stage == "distill":
        ref = cfg.student_source()
        out["student_init"] = (resolve(ref).sha256(), None)
        r = cfg.distill.recovery
        for i, name in enumerate(r.text if r is not None and r.text != "teacher" else []):
            path = cfg.data_path(name)
            if not path.is_file():
                raise DataError(f"{path}: text file not found (distill.recovery.text[{i}])")
            out[f"recovery:{i}"] = (source_digest(name, path, "train"), None)
    return out


def stage_inputs(cfg: Recipe, run: RunDir, stage: str, finished: dict[str, Path]) -> dict[str, tuple[str, Path | None]]:
    inputs = external_inputs(cfg, stage)
    for up in PLANS[stage].upstream:
        if not PLANS[up].active(cfg):
            continue
        manifest = read_manifest(finished[up], verify=False)
        inputs[up] = (manifest["digest"], finished[up])
    return inputs


def status(cfg: Recipe, runs_root: str | Path) -> list[tuple[str, str, Path | None]]:
    """(stage, done|stale|missing|waiting, dir) for every stage, without running anything."""
    run = RunDir.for_recipe(runs_root, cfg.name)
    rows: list[tuple[str, str, Path | None]] = []
    finished: dict[str, Path] = {}
    for stage in STAGES:
        plan = PLANS[stage]
        if not plan.active(cfg):
            continue
        if any(up not in finished for up in plan.upstream if PLANS[up].active(cfg)):
            others = run.others(stage, "")
            rows.append((stage, "stale" if others else "waiting", others[-1] if others else None))
            continue
        inputs = stage_inputs(cfg, run, stage, finished)
        key = stage_key(stage, plan.config(cfg), {k: v[0] for k, v in inputs.items()})
        done = run.done(stage, key)
        if done:
            finished[stage] = done
            rows.append((stage, "done", done))
        elif run.others(stage, key):
            rows.append((stage, "stale", run.others(stage, key)[-1]))
        else:
            rows.append((stage, "missing", run.final(stage, key)))
    return rows


def finished(cfg: Recipe, runs_root: str | Path, stage: str) -> Path:
    """The finished directory of ``stage`` for the recipe as it is now (RunError naming what to run otherwise)."""
    for name, state, path in status(cfg, runs_root):
        if name == stage:
            if state != "done" or path is None:
                command = f"distillery {stage} {cfg.source or ''}".rstrip()
                raise RunError(f"'{stage}' is {state} for {cfg.name}; run it first ({command})")
            return path
    raise RunError(f"unknown stage '{stage}'")
