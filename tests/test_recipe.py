from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from toolchain.cli import main
from toolchain.recipe import RecipeError, load, parse

ROOT = Path(__file__).resolve().parent.parent
BASE = yaml.safe_load((ROOT / "recipes" / "ci.yaml").read_text())


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    cfg = load(path)
    assert cfg.name
    for p in cfg.data.train + cfg.data.heldout:
        assert cfg.data_path(p).is_file(), p


def _with(**changes):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for k in parents:
            node = node.setdefault(k, {})
        if value is ...:
            node.pop(leaf)
        else:
            node[leaf] = value
    return data


BAD = [
    (_with(distill__learning_rate=0.1), "distill.learning_rate: unknown key"),
    (_with(distill__epochs="many"), "distill.epochs"),
    (_with(teacher=...), "teacher: required field is missing"),
    (_with(distill__lr=-1.0), "distill.lr"),
    (_with(distill__flavour="telepathy"), "distill.flavour"),
    (_with(student__keep_layers=0), "student.keep_layers"),
    (_with(distill__method="lora", distill__lora={"targets": ["lm_head"]}), "lm_head"),
    (_with(teacher="hf:no-slash"), "teacher"),
]


@pytest.mark.parametrize("data,needle", BAD, ids=[n for _, n in BAD])
def test_bad_recipe_names_the_field_and_exits_2(tmp_path, data, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=None) as info:
        load(path)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert needle in result.output
    assert "Traceback" not in result.output


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("name: [unclosed\n")
    r = CliRunner().invoke(main, ["validate", str(bad)])
    assert r.exit_code == 2 and "not valid YAML" in r.output
    r = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "recipe file not found" in r.output


def test_validate_prints_resolved_defaults():
    r = CliRunner().invoke(main, ["validate", str(ROOT / "recipes" / "ci.yaml")])
    assert r.exit_code == 0, r.output
    printed = yaml.safe_load(r.output)
    assert printed["distill"]["warmup_steps"] == 10  # a default, filled in
    assert printed["student"]["from"] == "teacher"
    assert parse(printed, "roundtrip").name == "ci"


@pytest.mark.parametrize("cmd", ["validate", "status", "run", "generate", "distill", "merge", "eval"])
def test_help_explains_each_command(cmd):
    r = CliRunner().invoke(main, [cmd, "--help"])
    assert r.exit_code == 0
    assert "RECIPE" in r.output and len(r.output.splitlines()) >= 4


def test_top_level_help():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for cmd in ("generate", "distill", "merge", "status", "validate"):
        assert cmd in r.output


PREFLIGHT = [
    (_with(student__keep_layers=999), "student.keep_layers: 999 is more than the teacher's 30 layers"),
    (_with(student__keep_layers=3, student__select=[0, 5, 30]), "student.select: layer 30 does not exist; the teacher has 30 layers (0-29)"),
    (_with(student__vocab=50_000), "student.vocab: 50000 keeps every one of the tokenizer's 49,152 tokens"),
    (_with(distill__seq_len=9000), "distill.seq_len: 9000 is longer than the student's context of 8192 tokens"),
    (_with(tasks={"clasify": {"metric": "label"}}), "tasks: clasify is not a task of the prompt files"),
]


@pytest.mark.parametrize("data,needle", PREFLIGHT, ids=[n.split(":")[0] for _, n in PREFLIGHT])
def test_validate_checks_the_recipe_against_the_teacher_before_any_compute(tmp_path, data, needle):
    """The teacher's dimensions come from its GGUF header: a recipe that cannot run fails at validate, exit 2."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert needle in result.output and result.output.count("\n") == 1
    assert "Traceback" not in result.output
