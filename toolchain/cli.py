"""distillery command line: parse, load the recipe, call a stage. No ML code lives here."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click
import yaml

# Set before transformers/tqdm are imported: stages draw their own rich progress bars, and per-tensor tqdm bars
# from transformers' GGUF loader would bury them.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from toolchain import __version__  # noqa: E402
from toolchain.artifacts.files import ExportError
from toolchain.artifacts.inspection import inspect as inspect_file
from toolchain.backends.openai_http import EndpointError
from toolchain.data import init_recipe as scaffold
from toolchain.data.rows import DataError
from toolchain.models.licenses import LicenceError
from toolchain.models.references import ModelError
from toolchain.pipeline.plans import finished
from toolchain.pipeline.plans import status as stage_status
from toolchain.pipeline.budget import plan_lines
from toolchain.pipeline import draft as drafting
from toolchain.pipeline.runner import licence_decision, parse_shapes, preflight, run_stages
from toolchain.pipeline.runner import sweep as run_sweep
from toolchain.pipeline.runs import RunError
from toolchain.quality.gate import GateError
from toolchain.recipe import Recipe, RecipeError, dump, load, parse
from toolchain.render import publish as pub
from toolchain.render.recipe_page import markdown
from toolchain.render.report import write
from toolchain.render import traffic as traffic_report
from toolchain.serve import gateway as gateway_app
from toolchain.serve import targets as served
from toolchain.serve.app import serve as run_server
from toolchain.serve import promotion
from toolchain.serve.routing import open_routing
from toolchain.serve.settings import Settings, is_loopback
from toolchain.serve.upstream import parse_upstream
from toolchain.data.traffic import Recorder, Redactor, TrafficStore, is_store, store_path
from toolchain.quality.cost import read_prices
from toolchain.backends.openai_http import api_key as upstream_api_key
from toolchain.stages.synthesize import preview as show
from toolchain.training.launch import launch
from toolchain.ui import is_main, world_size

RUNS_HELP = "Where run directories live (default: ./runs, or $DISTILLERY_RUNS)."


class UsageFailure(click.ClickException):
    """A problem with what the user asked for: exit code 2."""

    exit_code = 2


class GateFailure(click.ClickException):
    """The quality gate: the student kept less of the teacher than eval.min_retention. Exit code 3."""

    exit_code = 3


def _user_errors():
    """Exception types that are the user's to fix: shown as one line, never a traceback."""

    return (RecipeError, ModelError, LicenceError, DataError), (RunError, ExportError, EndpointError)


class Share(click.FloatRange):
    """click's FloatRange that also refuses NaN (which passes every comparison of a range)."""

    def convert(self, value, param, ctx):
        out = super().convert(value, param, ctx)
        if out != out:
            self.fail(f"{value!r} is not a number", param, ctx)
        return out


def friendly(fn):
    """Turn known errors into one-line messages; usage errors exit 2, runtime failures exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        usage, runtime = _user_errors()
        try:
            return fn(*args, **kwargs)
        except usage as err:
            raise UsageFailure(str(err)) from None
        except GateError as err:
            raise GateFailure(str(err)) from None
        except runtime as err:
            raise click.ClickException(str(err)) from None
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            click.echo("interrupted; finished work is kept and the stage resumes on the next run", err=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader went away (`distillery status … | head`): stop quietly, as cat does
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush has nowhere to fail
            sys.exit(141)
        except Exception as err:  # anything else: one line (and the work done so far is kept); the trace on request
            if os.environ.get("DISTILLERY_DEBUG"):
                raise
            raise click.ClickException(f"{type(err).__name__}: {err} (set DISTILLERY_DEBUG=1 for the trace)") from None

    return wrapper


def _load(recipe_path: str):
    return load(recipe_path)


recipe_arg = click.argument("recipe", type=click.Path(dir_okay=False))
no_gate_opt = click.option("--no-gate", is_flag=True, help="Report retention without failing on eval.min_retention.")
runs_opt = click.option("--runs", "runs_root", default=lambda: os.environ.get("DISTILLERY_RUNS", "runs"),
                        show_default="runs", help=RUNS_HELP)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="distillery")
def main() -> None:
    """Distill a small student model from an open-weight teacher, offline.

    A recipe (YAML) says which teacher, which student, what data and how to train. Stages run in order
    (generate → distill → merge → eval → export → bench); each writes runs/<recipe>/<stage>-<key>/ with a
    manifest, and a stage whose inputs and settings have not changed is skipped.
    """


@main.command()
@recipe_arg
@friendly
def validate(recipe: str) -> None:
    """Check RECIPE and print it with every default filled in (exit 2 naming the bad field).

    Beyond the schema it resolves the teacher, applies the licence policy and, for soft-label recipes whose
    teacher and student tokenize differently, reports how much of the answers the two tokenizers cut alike.
    """

    cfg = _load(recipe)
    preflight(cfg)
    decision = licence_decision(cfg)
    click.echo(dump(cfg), nl=False)
    click.echo(f"# teacher licence: {decision.teacher_licence} ({decision.source}). {decision.student_terms}")


@main.command()
@recipe_arg
@click.option("--gpu", "capacity", type=click.Choice(["16GB", "24GB", "40GB", "48GB", "80GB", "141GB"]), default=None,
              help="A device's memory: say whether distill fits it, and with which settings if not.")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True,
              help="Training processes (one per GPU): the batch is split, FSDP shards the weights.")
@click.option("--tflops", type=click.FloatRange(min=0.001), default=None,
              help="A GPU's sustained TFLOP/s, for a time estimate there (this machine's is measured).")
@runs_opt
@friendly
def plan(recipe: str, capacity: str | None, gpus: int, tflops: float | None, runs_root: str) -> None:
    """Print what RECIPE needs before it runs: each stage's peak memory from the models' configs alone (no weights
    loaded), the training run's work and time, and which settings make distill fit a GPU (docs/plan.md)."""

    cfg = _load(recipe)
    size = int(capacity.removesuffix("GB")) * 1024**3 if capacity else None
    for line in plan_lines(cfg, size, gpus, tflops, runs_root):
        click.echo(line)


@main.command()
@click.option("--markdown", "fmt", flag_value="markdown", default=True, help="The reference page (docs/recipes.md).")
@click.option("--json", "fmt", flag_value="json", help="The JSON Schema, for editors that complete YAML.")
def schema(fmt: str) -> None:
    """Print every recipe field with its type, default and description (docs/recipes.md is this output)."""

    if fmt == "json":
        click.echo(json.dumps(Recipe.model_json_schema(by_alias=True), indent=2))
    else:
        click.echo(markdown(), nl=False)


@main.command()
@recipe_arg
@runs_opt
@friendly
def status(recipe: str, runs_root: str) -> None:
    """List each stage of RECIPE as done, stale (older settings), missing or waiting (on an earlier stage)."""

    cfg = _load(recipe)
    for stage, state, path in stage_status(cfg, runs_root):
        click.echo(f"{stage:10s} {state:8s} {path or ''}")


def _stage_command(name: str, doc: str):
    @main.command(name=name, help=doc)
    @recipe_arg
    @runs_opt
    @click.option("--force", is_flag=True, help="Re-run this stage even if it is up to date.")
    @friendly
    def cmd(recipe: str, runs_root: str, force: bool) -> None:
        cfg = _load(recipe)
        out = run_stages(cfg, runs_root, only=name, force=force)
        click.echo(out[name])

    return cmd


@main.command()
@recipe_arg
@runs_opt
@click.option("--force", is_flag=True, help="Re-run this stage even if it is up to date.")
@click.option("--preview", type=click.IntRange(min=1), default=None,
              help="Then print N kept and N dropped new prompts, with the reason each was dropped.")
@friendly
def synthesize(recipe: str, runs_root: str, force: bool, preview: int | None) -> None:
    """Have the teacher write new training prompts like RECIPE's seeds (its synthesize: section; resumes after a
    kill). generate then answers seeds and new prompts alike."""

    cfg = _load(recipe)
    if cfg.synthesize is None:
        raise click.UsageError(f"{recipe}: no synthesize: section (see docs/recipes.md#synthesize)")
    out = run_stages(cfg, runs_root, only="synthesize", force=force)["synthesize"]
    if preview:
        kept, dropped = show(out, preview)
        for title, rows in (("kept", kept), ("dropped", dropped)):
            click.echo(f"{title} ({len(rows)}):")
            for r in rows:
                why = "" if r["kept"] else f"[{r['reason']}] "
                click.echo(f"  {why}{r['task']}: {r['prompt'][:160]!r}  (from {r['seed_id']}, round {r['round']})")
    click.echo(out)


_stage_command("generate", "Have the teacher answer RECIPE's prompts (resumes after a kill).")
@main.command()
@recipe_arg
@runs_opt
@click.option("--force", is_flag=True, help="Re-run this stage even if it is up to date.")
@click.option("--processes", type=click.IntRange(min=1), default=None,
              help="Train in N processes under accelerate (DDP; gloo on a CPU). distill.batch_size stays the global "
                   "batch.")
@click.option("--accelerate-config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="An accelerate config file (several GPUs or machines, FSDP, mixed precision); see "
                   "configs/accelerate/.")
@friendly
def distill(recipe: str, runs_root: str, force: bool, processes: int | None, accelerate_config: str | None) -> None:
    """Train the student on the teacher's answers (needs generate; resumes after a kill, with any number of
    processes). Also runs as `accelerate launch -m toolchain.cli distill RECIPE`."""

    cfg = _load(recipe)
    if ((processes or 1) > 1 or accelerate_config) and world_size() == 1 and not os.environ.get("DISTILLERY_LAUNCHED"):
        finished(cfg, runs_root, "generate")  # a usage error here, not in every process
        args = ["distill", recipe, "--runs", runs_root] + (["--force"] if force else [])
        rc = launch(["-m", "toolchain.cli", *args], processes or 0, accelerate_config)
        if rc:
            raise click.ClickException(f"distill failed under accelerate (exit {rc}); finished steps are kept and "
                                       "the next run resumes from the last checkpoint")
        return
    out = run_stages(cfg, runs_root, only="distill", force=force)

    if is_main():
        click.echo(out["distill"])
_stage_command("merge", "Merge LoRA into a standalone student directory and check it (needs distill).")


@main.command()
@recipe_arg
@runs_opt
@click.option("--until", type=click.Choice(["synthesize", "generate", "distill", "merge", "eval", "export", "bench"]),
              default=None,
              help="Stop after this stage.")
@no_gate_opt
@friendly
def run(recipe: str, runs_root: str, until: str | None, no_gate: bool) -> None:
    """Run every stage of RECIPE in order, skipping the ones already done (exit 3: quality gate failed)."""

    cfg = _load(recipe)
    out = run_stages(cfg, runs_root, until=until, gate=not no_gate)
    for stage, path in out.items():
        click.echo(f"{stage:10s} {path}")
    if until in (None, "bench"):
        click.echo(f"{'report':10s} {write(cfg, runs_root)}")


@main.command(name="eval")
@recipe_arg
@runs_opt
@no_gate_opt
@click.option("--log-samples", is_flag=True, help="Keep every sample of every model in samples.jsonl.")
@click.option("--force", is_flag=True, help="Re-run the evaluation even if it is up to date.")
@friendly
def eval_(recipe: str, runs_root: str, no_gate: bool, log_samples: bool, force: bool) -> None:
    """lm-eval the teacher, the student and the student before distillation on RECIPE's held-out prompts.

    Prints gold accuracy, retention (student / teacher), agreement and perplexity per task; writes eval.json
    and eval.md. Exit 3 when retention is below eval.min_retention (the quality gate), unless --no-gate.
    Needs merge.
    """

    cfg = _load(recipe)
    if log_samples:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"log_samples": True})})
    out = run_stages(cfg, runs_root, only="eval", force=force, gate=not no_gate)
    click.echo(out["eval"] / "eval.md")


@main.command()
@recipe_arg
@runs_opt
@click.option("--format", "fmt", type=click.Choice(["gguf", "onnx", "all"]), default=None,
              help="Build only this format (default: the recipe's export.formats).")
@click.option("--force", is_flag=True, help="Re-run the export even if it is up to date.")
@friendly
def export(recipe: str, runs_root: str, fmt: str | None, force: bool) -> None:
    """Write the student as GGUF (llama.cpp quantized types) and ONNX (onnxruntime), check every file against
    PyTorch (tokenizer, greedy output, logits) and score each on the held-out tasks: export.md. Needs eval."""

    cfg = _load(recipe)
    if fmt:
        formats = ["gguf", "onnx"] if fmt == "all" else [fmt]
        cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"formats": formats})})
    out = run_stages(cfg, runs_root, only="export", force=force)
    click.echo(out["export"] / "export.md")


_stage_command("bench", "Teacher vs student on this machine at the same quantization: decode and prompt tokens/s, time "
               "to first token, peak RSS, size, $ per 1M output tokens, quality, ratios, break-even (needs export).")


@main.command()
@recipe_arg
@runs_opt
@friendly
def report(recipe: str, runs_root: str) -> None:
    """Write runs/<recipe>/report/report.md and a self-contained report.html (charts: quality vs speed for
    teacher, student and every exported file, $ per 1M tokens, retention per task; the sweep when one ran)."""

    click.echo(write(_load(recipe), runs_root))


@main.command()
@recipe_arg
@runs_opt
@click.option("--to", "to", required=True, type=click.Path(file_okay=False), help="Folder to write the two model "
                                                                                  "folders in.")
@click.option("--repo", help="Also upload them to the Hugging Face Hub as ORG/NAME and ORG/NAME-GGUF (network, token).")
@click.option("--base-model", help="The teacher's Hub id for the card (default: from an hf: teacher or its GGUF).")
@click.option("--force", is_flag=True, help="Replace folders that exist.")
@click.option("--include-flagged", is_flag=True,
              help="Also ship files export flagged as significantly below the PyTorch student.")
@friendly
def publish(recipe: str, runs_root: str, to: str, repo: str | None, base_model: str | None, force: bool,
            include_flagged: bool) -> None:
    """A folder a model hub takes as it is: the merged student with a model card (YAML metadata, eval table,
    per-file quality and speed, inherited licence terms) and a -GGUF sibling with the GGUFs and Modelfiles."""

    model, gguf = pub.build(_load(recipe), runs_root, Path(to), repo, force, base_model, include_flagged)
    click.echo(f"{model}\n{gguf}")
    if repo:
        for url in pub.upload(model, gguf, repo):
            click.echo(url)


@main.command()
@recipe_arg
@runs_opt
@click.option("--keep-layers", default=None, help="Comma-separated depths to try, e.g. 6,10,15,20.")
@click.option("--shapes", default=None,
              help="Comma-separated student shapes LAYERS[xMLP[xKV]][hHIDDEN]: depth, MLP channels, key/value head "
                   "groups and hidden size kept, e.g. 20,30x768,16x1024x2,20x768h512 (width pruning: "
                   "docs/student.md).")
@friendly
def sweep(recipe: str, runs_root: str, keep_layers: str | None, shapes: str | None) -> None:
    """Build one student per depth or shape (distill, eval, export, bench each) and add the retention-vs-speed
    Pareto front to the report."""

    if (keep_layers is None) == (shapes is None):
        raise RecipeError("sweep: give --keep-layers (depths) or --shapes (depth x width), one of the two")
    found = parse_shapes(keep_layers, "--keep-layers") if keep_layers is not None else parse_shapes(shapes)
    if keep_layers is not None and any(len(s) > 1 for s in found):
        raise RecipeError(f"--keep-layers: expected comma-separated integers, got '{keep_layers}' (--shapes takes "
                          "widths)")
    cfg = _load(recipe)
    click.echo(run_sweep(cfg, runs_root, found))
    try:
        click.echo(write(cfg, runs_root))
    except RunError as err:  # the sweep itself is done; the report also needs the recipe's own student
        click.echo(f"report not written: {err}", err=True)


@main.command()
@recipe_arg
@runs_opt
@click.option("--draft-max", "lengths", default="2,4,8,16", show_default=True,
              help="Comma-separated draft lengths to measure (tokens the student proposes per teacher pass).")
@click.option("--prompts", "n_prompts", type=click.IntRange(1), default=8, show_default=True,
              help="Held-out prompts to decode at each length.")
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--sampled", "temperature", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Also measure sampled decoding at this temperature (acceptance only differs; the output follows "
                   "the teacher's distribution).")
@click.option("--quant", default=None, help="GGUF type of both files (default: q8_0 when exported).")
@click.option("--student", "student_file", type=click.Path(), default=None,
              help="The draft's .gguf instead of the recipe's exported student.")
@friendly
def draft(recipe: str, runs_root: str, lengths: str, n_prompts: int, max_tokens: int, temperature: float | None,
          quant: str | None, student_file: str | None) -> None:
    """Measure the student as the teacher's draft model in llama.cpp's speculative decoding (acceptance, tokens per
    teacher pass, decode speed vs the teacher alone, per draft length) and write the settings that serve it."""

    found = drafting.parse_lengths(lengths)
    click.echo(drafting.run(_load(recipe), runs_root, found, n_prompts, max_tokens, temperature, quant, student_file))


@main.command()
@recipe_arg
@runs_opt
@click.option("--model", "role", type=click.Choice(["student", "teacher"]), default="student", show_default=True)
@click.option("--backend", type=click.Choice(["llama_cpp", "onnxruntime", "onnxruntime-genai"]), default="llama_cpp",
              show_default=True, help="onnxruntime-genai: its own C++ generation loop, for genai_int4 / genai_fp32.")
@click.option("--quant", default=None,
              help="GGUF type (q8_0, q4_k_m, ...) or ONNX variant (fp32, int8, ...). Default: q8_0 / int8 when "
                   "exported; "
                   "a teacher is rebuilt at this type once to compare like with like.")
@click.option("--file", "model_file", type=click.Path(), default=None, help="Serve this .gguf file or ONNX folder "
                                                                            "instead.")
@click.option("--served-model-name", "names", multiple=True,
              help="Another name requests may use in `model` (repeatable); any other name gets 404 model_not_found.")
@click.option("--host", default=None, help="Bind address (default: the recipe's serve.host, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: the recipe's serve.port).")
@click.option("--include-flagged", is_flag=True,
              help="Serve a file export flagged as significantly below the PyTorch student.")
@click.option("--api-key", envvar="DISTILLERY_API_KEY", default=None,
              help="Clients must send 'Authorization: Bearer KEY' (also $DISTILLERY_API_KEY). Required off loopback.")
@click.option("--watch", is_flag=True,
              help="Re-open the served file when it is replaced on disk (distillery promote), between two requests; "
                   "llama_cpp, serve.batch 1.")
@click.option("--draft", "draft_file", type=click.Path(), default=None,
              help="A draft model's .gguf (e.g. the student's, with the teacher's vocabulary): greedy requests decode "
                   "speculatively, the served model checking its proposals (llama_cpp, serve.batch 1).")
@click.option("--draft-max", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Tokens the draft proposes per pass of the served model (distillery draft measures the best).")
@friendly
def serve(recipe: str, runs_root: str, role: str, backend: str, quant: str | None, model_file: str | None,
          names: tuple[str, ...], host: str | None, port: int | None, include_flagged: bool,
          api_key: str | None, watch: bool, draft_file: str | None, draft_max: int) -> None:
    """Serve the student (or the teacher) behind an OpenAI-compatible API with per-request cost.

    POST /v1/chat/completions and /v1/completions (stream: true for server-sent events), GET /v1/models,
    /health and /metrics. Each response adds a `cost` object (time to first token, decode tokens/s, USD at
    cost.usd_per_hour, and the reference API's price for the same tokens). Needs export for the student.
    """

    cfg = _load(recipe)
    backend = backend.replace("-", "_")
    host = host or cfg.serve.host
    if not is_loopback(host) and not api_key:
        raise RecipeError(f"refusing to listen on {host} without an API key (--api-key or DISTILLERY_API_KEY)")
    if model_file:
        target = served.from_file(Path(model_file), backend)
    elif role == "student":
        target = served.student(cfg, runs_root, backend, quant, include_flagged)
    else:
        target = served.teacher(cfg, backend, quant)
    if watch and (backend != "llama_cpp" or cfg.serve.batch != 1):
        raise UsageFailure("--watch: re-opening a promoted file needs --backend llama_cpp and serve.batch: 1")
    served.check_accelerators(cfg.serve.n_gpu_layers, cfg.serve.onnx_providers)
    options = {"n_ctx": cfg.serve.n_ctx, "n_gpu_layers": cfg.serve.n_gpu_layers, "providers": cfg.serve.onnx_providers}
    engine = served.open_engine(target, **options)
    if draft_file:
        if backend != "llama_cpp" or cfg.serve.batch != 1:
            raise UsageFailure("--draft: speculative decoding needs --backend llama_cpp and serve.batch: 1")
        drafting.attach(engine, target.path, Path(draft_file), draft_max, cfg.serve.n_ctx)
    recipe_name = () if model_file else (cfg.name if role == "student" else f"{cfg.name}-teacher",)
    constraints, unconstrained = served.task_constraints(cfg)
    routes = open_routing(cfg, runs_root, engine, active=role == "student")  # a teacher answers every call
    settings = Settings.from_recipe(cfg, target.model_id, target.path.name, aliases=(*recipe_name, *names),
                                    api_key=api_key, constraints=constraints, unconstrained=unconstrained,
                                    routes=routes)
    port = port or cfg.serve.port
    click.echo(f"serving {target.model_id} ({target.path}) on http://{host}:{port}/v1"
               + (f"; route {settings.route}, shadow {settings.shadow:g}, upstream {routes.upstream.public}"
                  if routes.upstream else ""), err=True)
    run_server(engine, settings, host, port, routes.upstream, routes.recorder, target.path if watch else None,
               lambda path: served.open_engine(served.Served(path, target.backend, target.model_id, target.role,
                                                             target.quant), **options))


@main.command()
@recipe_arg
@runs_opt
@click.option("--quant", default=None, help="GGUF type of the recipe's export to promote (default q8_0 when exported).")
@click.option("--file", "candidate", type=click.Path(dir_okay=False), default=None,
              help="Promote this GGUF instead of the recipe's finished export.")
@click.option("--to", "target", type=click.Path(dir_okay=False), default=None,
              help="The served file it would replace (default runs/<recipe>/served/<recipe>-<quant>.gguf).")
@click.option("--margin", type=Share(0.0, 1.0, max_open=True), default=0.05, show_default=True,
              help="Promote when the candidate keeps at least 1 - margin of the served file's right answers (one-sided "
                   "lower bound at eval.gate_level).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Compare on the newest N held-out prompts only.")
@friendly
def promote(recipe: str, runs_root: str, quant: str | None, candidate: str | None, target: str | None, margin: float,
            limit: int | None) -> None:
    """Replace the served student with the recipe's newer one only when it is not worse.

    Both files answer the same newest held-out prompts with gold answers through llama.cpp; the paired one-sided
    test decides; the served file is replaced atomically (a server started with --watch re-opens it between two
    requests) and the decision goes to promotions.jsonl beside it. Exit 0 when promoted, 3 when the served file
    is kept.
    """
    cfg = _load(recipe)
    quant = quant or served.default_quant(cfg, "llama_cpp")
    path = Path(candidate) if candidate else served.student(cfg, runs_root, "llama_cpp", quant).path
    to = Path(target) if target else promotion.served_path(cfg, runs_root, quant)
    record = promotion.promote(cfg, path, to, margin, limit)
    numbers = (f" (n={record['n']}: served {record['served_right']} right, candidate {record['candidate_right']}; "
               f"{record['why']})" if "n" in record else f" ({record['why']})")
    click.echo(("promoted: " if record["promote"] else "kept the served file: ") + f"{path} → {to}" + numbers)
    if record["promote"]:
        click.echo(f"serve it: distillery serve {recipe} --file {to} --watch", err=True)
    else:
        sys.exit(3)


@main.command()
@click.option("--upstream", default=None,
              help="The API the calls go to: openai:<base_url>[#<model>] (default: --recipe's openai: teacher).")
@click.option("--recipe", "recipe", type=click.Path(dir_okay=False), default=None,
              help="Take the upstream (and generate.api_key_env) from this recipe's openai: teacher.")
@click.option("--store", default="traffic.db", show_default=True,
              help="The traffic store: a SQLite file (or sqlite:///path), created when missing.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8090, show_default=True)
@click.option("--log-fraction", type=float, default=1.0, show_default=True,
              help="Record this share of the calls (the rest are counted in /metrics).")
@click.option("--redact", multiple=True,
              help="Replace matches before anything is written: email, phone, key, or a regular expression "
                   "(repeatable).")
@click.option("--keep-days", type=float, default=None, help="Delete recorded calls older than this (at start, hourly).")
@click.option("--api-key-env", default=None,
              help="The variable holding the upstream's key, sent when a client sends none (or always, with "
                   "--api-key).")
@click.option("--api-key", envvar="DISTILLERY_API_KEY", default=None,
              help="Clients must send 'Authorization: Bearer KEY' (also $DISTILLERY_API_KEY); their header is then "
                   "never passed upstream. Required off loopback.")
@friendly
def gateway(upstream: str | None, recipe: str | None, store: str, host: str, port: int, log_fraction: float,
            redact: tuple[str, ...], keep_days: float | None, api_key_env: str | None, api_key: str | None) -> None:
    """Put an OpenAI-compatible proxy in front of an API and record every call in a traffic store.

    Clients point their base URL at http://HOST:PORT/v1 and change nothing else: requests and answers pass
    through unchanged (streamed or not), and each call (request, answer, usage, latency, status, tags) lands in
    the store, which `distillery traffic` reads. Tag a call with metadata.task or the X-Distillery-Task header.
    """
    if recipe and not upstream:
        cfg = _load(recipe)
        if not cfg.teacher.startswith("openai:"):
            raise RecipeError(f"{recipe}: teacher {cfg.teacher!r} is not an openai: endpoint; pass --upstream")
        upstream, api_key_env = cfg.teacher, api_key_env or cfg.generate.api_key_env
    try:
        base_url, model = parse_upstream(upstream or "")
    except ValueError as err:
        raise RecipeError(f"--upstream {err}") from None
    if not 0.0 < log_fraction <= 1.0:
        raise RecipeError(f"--log-fraction {log_fraction}: a share of the calls, above 0 and at most 1")
    if keep_days is not None and not keep_days > 0:  # NaN too
        raise RecipeError(f"--keep-days {keep_days}: a positive number of days")
    if not is_loopback(host) and not api_key:
        raise RecipeError(f"refusing to listen on {host} without an API key (--api-key or DISTILLERY_API_KEY)")
    redactor = Redactor(list(redact))
    key = upstream_api_key(base_url, api_key_env, field="--api-key-env")
    traffic = TrafficStore(store_path(store))
    settings = gateway_app.GatewaySettings(base_url=base_url, model=model or None, upstream_key=key, api_key=api_key,
                                           log_fraction=log_fraction)
    recorder = Recorder(traffic, redactor, keep_days)
    click.echo(f"gateway on http://{host}:{port}/v1 → {base_url}, recording in {traffic.path} "
               f"({traffic.count()} calls so far)", err=True)
    gateway_app.run(settings, recorder, host, port)


@main.command()
@click.argument("store")
@click.option("--prices", default=None,
              help="Upstream prices: input,cached_input,output USD per 1M tokens, or a YAML/JSON file by model id "
                   "(default: a dated table of common models).")
@click.option("--recipe", "recipe", type=click.Path(dir_okay=False), default=None,
              help="Price the student as this recipe's finished bench measured it (else an estimate, stated).")
@runs_opt
@click.option("--json", "as_json", is_flag=True, help="The whole report as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Also write a PNG of the bill per task (API against student, $ per day).")
@click.option("--agreement", is_flag=True,
              help="Instead: the shadow pairs (serve.shadow): per task, the student's agreement with the teacher, "
                   "its bounds and whether the student can take the task (with --recipe: its metrics and floors).")
@click.option("--floor", type=Share(0.0, 1.0), default=None,
              help="With --agreement: the agreement a task must be shown to keep (default: the recipe's task floor, "
                   "else 0.9).")
@friendly
def traffic(store: str, prices: str | None, recipe: str | None, runs_root: str, as_json: bool,
            plot: str | None, agreement: bool, floor: float | None) -> None:
    """What the calls in a traffic store are: tasks, volumes, token lengths, answer shapes and the bill.

    Calls are grouped into tasks by their tag (metadata.task, X-Distillery-Task), else by their instructions
    (system prompt and few-shot turns, near-duplicates merged), else by the shared wording of one-message
    templates; sorted by what a local student would save a day.
    """
    if agreement:
        cfg = _load(recipe) if recipe else None
        specs = served.task_specs(cfg) if cfg else {}
        floors = {} if floor is not None or cfg is None else {
            t: c.min_retention for t, c in cfg.tasks.items() if c.min_retention}
        report = traffic_report.agreement(store_path(store), specs, floors, cfg.eval.gate_level if cfg else 0.05,
                                          floor)
        click.echo(json.dumps(report, indent=1) if as_json else traffic_report.agreement_markdown(report),
                   nl=not as_json)
        return
    local = traffic_report.local_speed(_load(recipe), runs_root) if recipe else traffic_report.ESTIMATE
    report = traffic_report.analyse(store_path(store), read_prices(prices) if prices else None, local)
    click.echo(json.dumps(report, indent=1) if as_json else traffic_report.markdown(report), nl=not as_json)
    if plot and report["tasks"]:
        click.echo(f"wrote {traffic_report.plot(report, Path(plot))}", err=True)


@main.command()
@click.argument("data")
@click.option("--out", "out", type=click.Path(dir_okay=False), help="Where to write it (default recipes/<name>.yaml).")
@click.option("--teacher", help="Teacher reference (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--name", help="Recipe name (default: from the file name).")
@click.option("--force", is_flag=True, help="Overwrite an existing recipe file.")
@click.option("--task", default=None, help="With a traffic store: the task to distil (distillery traffic lists them).")
@friendly
def init(data: str, out: str | None, teacher: str | None, name: str | None, force: bool, task: str | None) -> None:
    """Write a commented recipe for DATA (a CSV/TSV/Parquet/JSONL file, a saved dataset folder, hf:<id>, or a
    gateway's traffic store with --task): its format, columns, tasks, metrics and a held-out split, inferred and
    printed for you to check. From a traffic store, the logged answers train the student and are its golds."""
    from_store = is_store(data)
    name = name or (task if from_store and task else scaffold.recipe_name(data))
    path = Path(out or f"recipes/{name}.yaml")
    if path.exists() and not force:
        raise UsageFailure(f"{path} exists; pass --force to overwrite it or --out to write elsewhere")
    found = scaffold.inspect_traffic(store_path(data), task) if from_store else scaffold.inspect(data, name)
    text, check = scaffold.recipe_text(found, name, teacher)
    preflight(parse(yaml.safe_load(text), str(path)))  # what validate checks, before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    tasks = ", ".join(f"{t} ({n})" for t, n in sorted(found["tasks"].items()))
    click.echo(f"{data}: {found['rows']} rows, {found['format']} format; tasks: {tasks}"
               + (f"; {found['multi_turn']} multi-turn" if found["multi_turn"] else ""))
    click.echo(f"wrote {path}; check:")
    for line in check:
        click.echo(f"  - {line}")
    click.echo(f"then: distillery validate {path} && distillery run {path}")
    click.echo(f"(to choose the student's cut by measurement first: distillery sweep {path} --shapes 20,20x768,14)")


@main.command()
@click.argument("path", type=click.Path())
@friendly
def inspect(path: str) -> None:
    """Check a model file (.gguf, .onnx or an ONNX folder, .safetensors) and print what is in it, as JSON.
    A truncated or corrupt file, or ONNX external data outside its folder: one line naming it, exit 1."""
    click.echo(json.dumps(inspect_file(Path(path)), indent=2))


if __name__ == "__main__":
    main()
