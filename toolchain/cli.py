"""distillery command line: parse, load the recipe, call a stage. No ML code lives here."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

# Set before transformers/tqdm are imported: stages draw their own rich progress bars, and per-tensor tqdm bars
# from transformers' GGUF loader would bury them.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from toolchain import __version__  # noqa: E402

RUNS_HELP = "Where run directories live (default: ./runs, or $DISTILLERY_RUNS)."


class UsageFailure(click.ClickException):
    """A problem with what the user asked for: exit code 2."""

    exit_code = 2


def _user_errors():
    """Exception types that are the user's to fix: shown as one line, never a traceback."""
    from toolchain.data import DataError
    from toolchain.licenses import LicenceError
    from toolchain.models import ModelError
    from toolchain.recipe import RecipeError
    from toolchain.runs import RunError

    return (RecipeError, ModelError, LicenceError, DataError), (RunError,)


def friendly(fn):
    """Turn known errors into one-line messages; usage errors exit 2, runtime failures exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        usage, runtime = _user_errors()
        try:
            return fn(*args, **kwargs)
        except usage as err:
            raise UsageFailure(str(err)) from None
        except runtime as err:
            raise click.ClickException(str(err)) from None
        except KeyboardInterrupt:
            click.echo("interrupted; finished work is kept and the stage resumes on the next run", err=True)
            sys.exit(130)
        except (RuntimeError, ValueError, OSError) as err:
            if os.environ.get("DISTILLERY_DEBUG"):
                raise
            raise click.ClickException(f"{type(err).__name__}: {err}") from None

    return wrapper


def _load(recipe_path: str):
    from toolchain.recipe import load

    return load(recipe_path)


recipe_arg = click.argument("recipe", type=click.Path(dir_okay=False))
runs_opt = click.option("--runs", "runs_root", default=lambda: os.environ.get("DISTILLERY_RUNS", "runs"),
                        show_default="runs", help=RUNS_HELP)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="distillery")
def main() -> None:
    """Distill a small student model from an open-weight teacher, offline.

    A recipe (YAML) says which teacher, which student, what data and how to train. Stages run in order
    (generate → distill → merge); each writes runs/<recipe>/<stage>-<key>/ with a manifest, and a stage
    whose inputs and settings have not changed is skipped.
    """


@main.command()
@recipe_arg
@friendly
def validate(recipe: str) -> None:
    """Check RECIPE and print it with every default filled in (exit 2 naming the bad field).

    Beyond the schema it resolves the teacher, applies the licence policy and, for soft-label recipes,
    checks that teacher and student share one vocabulary.
    """
    from toolchain.pipeline import licence_decision, preflight
    from toolchain.recipe import dump

    cfg = _load(recipe)
    preflight(cfg)
    decision = licence_decision(cfg)
    click.echo(dump(cfg), nl=False)
    click.echo(f"# teacher licence: {decision.teacher_licence} ({decision.source}). {decision.student_terms}")


@main.command()
@recipe_arg
@runs_opt
@friendly
def status(recipe: str, runs_root: str) -> None:
    """List each stage of RECIPE as done, stale (older settings), missing or waiting (on an earlier stage)."""
    from toolchain.pipeline import status as stage_status

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
        from toolchain.pipeline import run_stages

        cfg = _load(recipe)
        out = run_stages(cfg, runs_root, only=name, force=force)
        click.echo(out[name])

    return cmd


_stage_command("generate", "Have the teacher answer RECIPE's prompts (resumes after a kill).")
_stage_command("distill", "Train the student on the teacher's answers (needs generate; resumes after a kill).")
_stage_command("merge", "Merge LoRA into a standalone student directory and check it (needs distill).")


@main.command()
@recipe_arg
@runs_opt
@click.option("--until", type=click.Choice(["generate", "distill", "merge"]), default=None,
              help="Stop after this stage.")
@friendly
def run(recipe: str, runs_root: str, until: str | None) -> None:
    """Run every stage of RECIPE in order, skipping the ones already done."""
    from toolchain.pipeline import run_stages

    cfg = _load(recipe)
    out = run_stages(cfg, runs_root, until=until)
    for stage, path in out.items():
        click.echo(f"{stage:10s} {path}")


@main.command()
@recipe_arg
@runs_opt
@click.option("--limit", type=int, default=None, help="Score only the first N held-out prompts.")
@friendly
def score(recipe: str, runs_root: str, limit: int | None) -> None:
    """Score the merged student on RECIPE's held-out prompts next to the teacher (gold accuracy, agreement)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolchain.heldout import evaluate
    from toolchain.pipeline import run_stages

    cfg = _load(recipe)
    out = run_stages(cfg, runs_root, only="merge")
    model_dir = out["merge"] / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    result, _, _ = evaluate(model, tok, out["generate"] / "heldout.jsonl", cfg.generate.system_prompt,
                            cfg.eval.max_new_tokens, limit or cfg.eval.limit)
    click.echo(f"{'task':10s} {'n':>4s} {'teacher gold':>13s} {'student gold':>13s} {'agree':>6s}")
    for task, t in sorted(result["tasks"].items()) + [("total", result["total"])]:
        gold = f"{t['teacher_gold']}/{t['gold_n']}" if t["gold_n"] else "-"
        sgold = f"{t['student_gold']}/{t['gold_n']}" if t["gold_n"] else "-"
        click.echo(f"{task:10s} {t['n']:4d} {gold:>13s} {sgold:>13s} {t['agree']:6d}")
    click.echo(json.dumps(result["total"]))


if __name__ == "__main__":
    main()
