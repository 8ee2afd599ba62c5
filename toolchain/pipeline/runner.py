"""Runs the stage table (toolchain.pipeline.plans): the checks before any stage (``preflight``), the stages in order
(``run_stages``), the quality gate, and ``sweep``. Each stage module only sees (cfg, inputs, out_dir).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from pydantic import ValidationError

from toolchain.artifacts import gguf_io
from toolchain.artifacts.files import ExportError
from toolchain.data.formats import load_prompts
from toolchain.data.rows import DataError
from toolchain.models import families, licenses
from toolchain.models.references import DIMENSIONS, dimensions, resolve, vocabulary
from toolchain.pipeline.plans import PLANS, STAGES, stage_inputs
from toolchain.pipeline.runs import RunDir, RunError, execute, read_manifest, stage_key
from toolchain.quality import cascade
from toolchain.quality.gate import GateError, gate, gate_lines
from toolchain.quality.metrics import normalise, parse_json
from toolchain.recipe import Recipe, RecipeError, StudentConfig
from toolchain.render.markdown import cascade_markdown, eval_table
from toolchain.serve.targets import default_quant
from toolchain.training import cross_vocab
from toolchain.ui import console, world_size


def preflight(cfg: Recipe) -> None:
    """Checks that need the files, run before any stage (and by ``distillery validate``): every prompt file
    parses (a bad line is named by file and line number) and soft-label teachers share the student's vocabulary."""

    train, heldout = load_prompts(cfg, limits=False)
    known = {p.task for p in train + heldout}
    unknown = sorted(set(cfg.tasks) - known)
    if unknown:
        raise RecipeError(f"{cfg.source}: tasks: {', '.join(unknown)} is not a task of the prompt files "
                          f"(their tasks: {', '.join(sorted(known))})")
    check_golds(cfg, train + heldout)
    check_dimensions(cfg)
    check_family(cfg)

    if cfg.distill.flavour == "soft" and cfg.teacher.startswith("openai:"):
        console.print("  soft-label from an openai: teacher: the token strings of its top log-probs are mapped to ids "
                      "with the student's tokenizer; generate's manifest counts any that do not map")
    elif cfg.distill.flavour == "soft" and cfg.student.from_ != "teacher":
        teacher, student = resolve(cfg.teacher), resolve(cfg.student.from_)
        if vocabulary(teacher) != vocabulary(student):
            check_across_tokenizers(cfg, train + heldout)
            return
        rows = {name: dimensions(ref)["vocab"] for name, ref in (("teacher", teacher), ("student", student))}
        if None not in rows.values() and rows["teacher"] != rows["student"]:
            console.print(f"  soft-label: one tokenizer, but output layers of {rows['teacher']} (teacher) and "
                          f"{rows['student']} (student) rows: the divergence uses the {min(rows.values())} both have "
                          f"(the rest are padding, no token maps to them)")


def check_across_tokenizers(cfg: Recipe, prompts) -> None:
    """Soft labels between two tokenizers (training/cross_vocab.py): what they need, and before any training how
    much of the answers the two tokenizers cut alike (on the prompt files' gold answers, else the prompts)."""
    d, where = cfg.distill, f"{cfg.source}: "
    pair = f"{cfg.teacher} and {cfg.student.from_} tokenize differently"
    if d.soft.teacher_logits != "online":
        raise RecipeError(f"{where}distill.soft.teacher_logits: {pair}, so the teacher reads each answer in its own "
                          "tokens during training; set it to online (a top-k cache holds one tokenizer's ids)")
    if d.on_policy.fraction > 0:
        raise RecipeError(f"{where}distill.on_policy.fraction: {pair}; on-policy steps score the student's own "
                          "tokens with the teacher's, which needs one vocabulary: set it to 0")
    if cfg.student.vocab is not None:
        raise RecipeError(f"{where}student.vocab: {pair}; a trimmed student vocabulary is not aligned with the "
                          "teacher's yet: remove the field")
    golds = [p.gold for p in prompts if p.gold]
    texts = (golds or [p.prompt for p in prompts])[:500]
    report = cross_vocab.text_report(cfg, texts)
    console.print(f"  soft-label across tokenizers, on {len(texts)} {'gold answers' if golds else 'prompts'}:")
    for line in report.lines():
        console.print(f"    {line}")


def check_family(cfg: Recipe) -> None:
    """A student whose architecture the pinned llama.cpp converter cannot convert is refused here, in one line, when
    the recipe exports GGUF — not after training, at export."""
    ref = cfg.student_source()
    if "gguf" not in cfg.export.formats or ref.startswith(("hf:", "openai:")):
        return
    arch = families.architecture(resolve(ref))
    if arch is None:
        return
    try:
        known = gguf_io.convertible()
    except ExportError as err:  # the converter could not be fetched (offline): export will say, not validate
        console.print(f"  {arch}: not checked against llama.cpp's converter ({err})")
        return
    if arch not in known:
        raise RecipeError(f"{cfg.source}: export.formats: llama.cpp's converter (llama-cpp-python "
                          f"{importlib.metadata.version('llama_cpp_python')}) cannot convert {arch}, the "
                          "student's architecture; leave gguf out of export.formats (ONNX still exports) or choose "
                          "another student")


def check_golds(cfg: Recipe, prompts) -> None:
    """Every gold answer is one its task's metric can match: one of a label task's declared labels, JSON for a
    json task (a gold no answer can ever equal would score the task 0 and say nothing)."""

    for p in prompts:
        task = cfg.tasks.get(p.task)
        if task is None or p.gold is None:
            continue
        if task.metric == "label" and task.labels and normalise(p.gold) not in {normalise(x) for x in task.labels}:
            raise DataError(
                f"{p.where}: gold '{p.gold}' is not one of tasks.{p.task}.labels ({', '.join(task.labels)})"
            )
        if task.metric == "json":
            try:
                parse_json(p.gold)
            except ValueError:
                raise DataError(
                    f"{p.where}: gold of task '{p.task}' (metric json) is not JSON: {p.gold[:60]!r}"
                ) from None


def check_dimensions(cfg: Recipe) -> None:
    """The recipe against the models it names, from their metadata only: layers kept and selected exist in the
    teacher, a trimmed vocabulary is smaller than the tokenizer's, seq_len fits the student's context."""

    def dims(ref: str) -> dict:
        if ref.startswith(("hf:", "openai:")):  # not fetched to validate; checked where the files are
            return dict.fromkeys(DIMENSIONS)
        return dimensions(resolve(ref))

    st = cfg.student
    teacher = dims(cfg.teacher)
    student = teacher if st.from_ == "teacher" else dims(st.from_)
    where = f"{cfg.source}: "
    layers = teacher["layers"]
    if st.from_ == "teacher" and layers:
        if st.keep_layers is not None and st.keep_layers > layers:
            raise RecipeError(
                f"{where}student.keep_layers: {st.keep_layers} is more than the teacher's {layers} layers"
            )
        if isinstance(st.select, list) and max(st.select, default=-1) >= layers:
            bad = sorted(i for i in st.select if i >= layers)
            raise RecipeError(f"{where}student.select: layer {bad[0]} does not exist; the teacher has {layers} "
                              f"layers (0-{layers - 1})")
    for field, have, what in (("intermediate_size", teacher["intermediate"], "MLP channels"),
                              ("kv_heads", teacher["kv_heads"], "key/value heads"),
                              ("hidden_size", teacher["hidden"], "hidden channels")):
        want = getattr(st, field)
        if want is not None and have and want >= have:
            raise RecipeError(f"{where}student.{field}: {want} is not fewer than the teacher's {have} {what} a "
                              "layer; use a smaller number or remove the field")
    for field in ("kv_heads", "hidden_size"):
        if getattr(st, field) is None or "gguf" not in cfg.export.formats:
            continue
        arch = families.architecture(resolve(cfg.teacher))
        if arch in families.FIXED_HEAD_LAYOUT:
            raise RecipeError(f"{where}student.{field}: llama.cpp sizes {arch}'s query projection by the hidden "
                              "size, so a student whose heads do not fill its hidden size would make a GGUF it "
                              "cannot load; cut student.intermediate_size or layers instead, or drop gguf from "
                              "export.formats")
    vocab = student["vocab"]
    if st.vocab is not None and vocab and st.vocab >= vocab:
        raise RecipeError(f"{where}student.vocab: {st.vocab} keeps every one of the tokenizer's {vocab:,} tokens; "
                          f"use a smaller number or remove the field")
    context = student["context"]
    if context and cfg.distill.seq_len > context:
        raise RecipeError(f"{where}distill.seq_len: {cfg.distill.seq_len} is longer than the student's context of "
                          f"{context} tokens")


def licence_decision(cfg: Recipe) -> licenses.LicenceDecision:
    return licenses.decide(resolve(cfg.teacher), cfg.licence.teacher, cfg.licence.acknowledge, cfg.data.answers_from,
                           uses_answers=cfg.generate.answers != "teacher")


def gate_verdict(cfg: Recipe, report: dict) -> dict:
    """The gate as the recipe says now (floors and rule are not part of eval's key): re-decided from eval.json's
    per-prompt table, so editing a floor re-runs nothing."""

    if "paired" not in report:
        raise RunError("this eval.json has no per-prompt table (made by an older distillery); run eval --force")
    try:
        return gate(report["paired"], cfg.eval, report["intervals"]["seed"], cfg.task_floors())
    except ValueError as e:
        raise RecipeError(f"{cfg.source}: {e}") from None


def quality_gate(cfg: Recipe, eval_dir: Path, enforce: bool = True) -> dict:
    """Print the eval table with the gate's decision per task; return the verdict, or (enforced) raise
    GateError naming every task that failed and why."""
    import json


    report = json.loads((eval_dir / "eval.json").read_text(encoding="utf-8"))
    verdict = gate_verdict(cfg, report)
    console.print(eval_table(report, verdict), highlight=False, soft_wrap=True)
    c = cfg.eval.cascade  # as the recipe says now: its settings are not part of eval's key
    table = cascade.from_eval(report, c.targets, c.calibration, c.seed, cfg.eval.gate_level, c.rule)
    if table:
        console.print("\n".join(cascade_markdown(table)[2:]), highlight=False, soft_wrap=True, markup=False)
    if not verdict["passed"] and enforce:
        failed = [line for line in gate_lines(verdict) if ": FAIL" in line or ": UNDECIDED" in line]
        raise GateError(f"quality gate failed (eval.gate {verdict['rule']}; report: {eval_dir / 'eval.md'}): "
                        + "; ".join(failed))
    return verdict


def run_stages(cfg: Recipe, runs_root: str | Path, until: str | None = None, only: str | None = None,
               force: bool = False, gate: bool = True) -> dict[str, Path]:
    """Run stages in order up to ``until`` (or just ``only``, whose upstream must then be done).

    After eval, the quality gate prints the table and stops the run (GateError) when the student kept too
    little of the teacher, unless ``gate`` is False.
    """
    import importlib


    if world_size() > 1 and only != "distill":
        raise RunError(f"only the distill stage runs in several processes (WORLD_SIZE={world_size()}); "
                       "run the other stages without accelerate")
    run = RunDir.for_recipe(runs_root, cfg.name)
    preflight(cfg)
    decision = licence_decision(cfg).as_dict()
    last = STAGES.index(only or until or STAGES[-1])
    finished: dict[str, Path] = {}
    for stage in STAGES[: last + 1]:
        plan = PLANS[stage]
        if not plan.active(cfg):
            continue
        inputs = stage_inputs(cfg, run, stage, finished)
        if only and stage != only:
            key = stage_key(stage, plan.config(cfg), {k: v[0] for k, v in inputs.items()})
            done = run.done(stage, key)
            if done is None:
                raise RunError(f"'{stage}' has not run for this recipe yet; run it first (distillery {stage})")
            read_manifest(done)
            finished[stage] = done
            continue
        fn = importlib.import_module(plan.module).run
        finished[stage] = execute(run, stage, fn, cfg, plan.config(cfg), inputs, licence=decision,
                                  force=force and (only is None or stage == only))
        if stage == "eval":
            quality_gate(cfg, finished[stage], enforce=gate)
    return finished


SHAPE_FIELDS = ("keep_layers", "intermediate_size", "kv_heads")


def parse_shapes(text: str, option: str = "--shapes") -> list[dict]:
    """``LAYERS[xMLP[xKV]][hHIDDEN]`` items, comma-separated (``20,16x1024,20x1536x2,20x768h512``): each a student
    shape as student.keep_layers, student.intermediate_size, student.kv_heads and student.hidden_size (left out: the
    recipe's own)."""
    shapes = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        dims, has_hidden, hidden = item.lower().partition("h")
        parts = dims.split("x")
        numbers = parts + ([hidden] if has_hidden else [])
        if len(parts) > 3 or not all(p.isdigit() and int(p) > 0 for p in numbers):
            raise RecipeError(f"{option}: '{item}' is not LAYERS, LAYERSxMLP or LAYERSxMLPxKV, each optionally "
                              "followed by hHIDDEN (positive integers, e.g. 20, 16x1024, 20x1536x2, 20x768h512)")
        shape = dict(zip(SHAPE_FIELDS, map(int, parts)))
        if has_hidden:
            shape["hidden_size"] = int(hidden)
        shapes.append(shape)
    if not shapes:
        raise RecipeError(f"{option}: give at least one student shape")
    return shapes


def shape_label(shape: dict) -> str:
    label = f"{shape['keep_layers']}L"
    if shape.get("intermediate_size"):
        label += f" x {shape['intermediate_size']} MLP"
    if shape.get("kv_heads"):
        label += f" x {shape['kv_heads']} KV"
    if shape.get("hidden_size"):
        label += f" x {shape['hidden_size']} hidden"
    return label


def sweep(cfg: Recipe, runs_root: str | Path, shapes: list[dict]) -> Path:
    """One student per shape in ``shapes`` (``parse_shapes``: depth, and optionally MLP width and key/value head
    groups; the recipe otherwise unchanged), each distilled, evaluated, exported at the bench type and benched
    once; runs/<recipe>/sweep.json holds the retention-vs-speed points (and, with distill.validation, each
    student's gold on the validation slice: the figure to choose a shape by, the held-out ones only report).

    The students share the recipe's run directory, so the teacher's answers are generated once; each shape is
    its own distill/merge/eval/export/bench key. Per student, eval skips the before-distillation model, export
    writes only the GGUF type bench runs, and bench runs once without the served or per-file timings.
    """
    import json

    if cfg.student.from_ != "teacher":
        raise RecipeError(
            f"{cfg.source}: sweep cuts the teacher into students of other shapes; student.from must be 'teacher'"
        )
    if isinstance(cfg.student.select, list):
        raise RecipeError(f"{cfg.source}: sweep needs student.select 'influence' or 'even', not explicit indices")
    quant = cfg.bench.quant or default_quant(cfg, "llama_cpp")
    variants = []
    for shape in shapes:  # every shape checked against the teacher before the first one trains
        try:  # the shape's fields checked as the recipe checks them (a width a multiple of 32, ...)
            student = StudentConfig.model_validate({**cfg.student.model_dump(by_alias=True), **shape})
        except ValidationError as err:
            first = err.errors()[0]
            raise RecipeError(f"--shapes: {shape_label(shape)}: student.{first['loc'][0]}: {first['msg']}") from None
        variant = cfg.model_copy(update={
            "student": student,
            "eval": cfg.eval.model_copy(update={"base": False}),
            "export": cfg.export.model_copy(update={"formats": ["gguf"], "quants": [quant], "score": False}),
            "bench": cfg.bench.model_copy(update={"backend": "llama_cpp", "quant": quant, "repeats": 1,
                                                  "served": False, "each_file": False}),
        })
        check_dimensions(variant)
        variants.append((shape, variant))
    students = []
    for shape, variant in variants:
        console.print(f"[bold]sweep: {shape_label(shape)}[/]")
        done = run_stages(variant, runs_root, until="bench", gate=False)
        ev = json.loads((done["eval"] / "eval.json").read_text(encoding="utf-8"))["retention"]["overall"]
        bench = json.loads((done["bench"] / "bench.json").read_text(encoding="utf-8"))
        merge = json.loads((done["merge"] / "merge_check.json").read_text(encoding="utf-8"))
        trained = read_manifest(done["distill"], verify=False).get("metrics", {})
        st = variant.student
        students.append({"keep_layers": st.keep_layers, "intermediate_size": st.intermediate_size,
                         "kv_heads": st.kv_heads, "hidden_size": st.hidden_size, "label": shape_label(shape),
                         "parameters": merge["student_params"], "teacher_gold": ev["teacher"],
                         "student_gold": ev["student"], "retention": ev["retention"],
                         "validation_gold": trained.get("validation_gold"),
                         "decode_tps": bench["summary"]["student"]["decode_tps"]["median"],
                         "teacher_decode_tps": bench["summary"]["teacher"]["decode_tps"]["median"],
                         "bytes": bench["bytes"]["student"], "quant": quant,
                         "dirs": {s: str(p) for s, p in done.items()}})
    out = RunDir.for_recipe(runs_root, cfg.name).root / "sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"recipe": cfg.name, "quant": quant, "students": students}, indent=2) + "\n", encoding="utf-8"
    )
    tmp.replace(out)
    return out
