"""Stage keys of the shipped recipes are pinned: a finished run stays finished across a change of the code's layout.

Each key is computed as the pipeline computes it (the stage's config, its external inputs by content, the
toolchain version), with every upstream stage's output digest replaced by a fixed name, so no stage has to run.
A deliberate change of a key (a new field that changes outputs) regenerates tests/data/stage_keys.json with
``python -m tests.test_stage_keys`` and says why in its commit.
"""

import json
import sys

import pytest

from tests.conftest import ROOT
from toolchain.pipeline.plans import PLANS, STAGES, external_inputs
from toolchain.pipeline.runs import stage_key
from toolchain.recipe import load

PINNED = ROOT / "tests" / "data" / "stage_keys.json"
# Recipes whose models are on this machine (endpoint-7b names a vLLM server, reasoning a hub model).
RECIPES = ("default", "ci", "ci-soft", "ci-reasoning", "synthetic", "gemma3-to-smollm2")


def keys(recipe: str) -> dict[str, str]:
    cfg = load(ROOT / "recipes" / f"{recipe}.yaml")
    out = {}
    for stage in STAGES:
        plan = PLANS[stage]
        if not plan.active(cfg):
            continue
        inputs = {k: v[0] for k, v in external_inputs(cfg, stage).items()}
        inputs |= {up: f"<{up}>" for up in plan.upstream if PLANS[up].active(cfg)}
        out[stage] = stage_key(stage, plan.config(cfg), inputs)
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_stage_keys_are_the_pinned_ones(recipe):
    pinned = json.loads(PINNED.read_text())[recipe]
    assert keys(recipe) == pinned


def test_a_changed_field_changes_its_stage_and_no_earlier_one(tmp_path):
    import yaml

    data = yaml.safe_load((ROOT / "recipes" / "ci.yaml").read_text())
    data["distill"]["lr"] = 0.123
    data["data"]["train"] = [str(ROOT / p) for p in data["data"]["train"]]
    data["data"]["heldout"] = [str(ROOT / p) for p in data["data"]["heldout"]]
    (tmp_path / "ci.yaml").write_text(yaml.safe_dump(data))
    cfg = load(tmp_path / "ci.yaml")
    before = keys("ci")
    plan, gen = PLANS["distill"], PLANS["generate"]
    ext = {k: v[0] for k, v in external_inputs(cfg, "distill").items()}
    assert stage_key("distill", plan.config(cfg), ext | {"generate": "<generate>"}) != before["distill"]
    ext = {k: v[0] for k, v in external_inputs(cfg, "generate").items()}
    assert stage_key("generate", gen.config(cfg), ext) == before["generate"]


if __name__ == "__main__":
    PINNED.write_text(json.dumps({r: keys(r) for r in RECIPES}, indent=1, sort_keys=True) + "\n")
    sys.exit(0)
