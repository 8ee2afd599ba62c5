"""synthesize on the real embedded teacher, CI-sized: 10 seed prompts become more than 60 training prompts."""

import json

import pytest

from tests.conftest import ROOT, distillery, recipe_copy, stage_dirs

pytestmark = pytest.mark.integration


def test_ten_seeds_become_at_least_fifty_new_prompts_that_generate_answers(tmp_path):
    recipe = recipe_copy(tmp_path, "ci-syn", data__limit=10,
                         synthesize={"target": 62, "per_seed": 2, "max_rounds": 10, "max_new_tokens": 96})
    runs = tmp_path / "runs"
    proc = distillery("synthesize", str(recipe), "--runs", str(runs), "--preview", "3")
    assert "kept (3):" in proc.stdout and "dropped" in proc.stdout
    out = stage_dirs(runs, "ci-syn")["synthesize"]
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["seeds"] == 10 and m["kept"] >= 50 and m["reached"]
    assert m["written"] == m["kept"] + sum(v for k, v in m.items() if k.startswith("dropped_"))
    prompts = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == m["kept"] and all(p["seed_id"] and p["method"] == "self_instruct" for p in prompts)
    assert len({p["prompt"].lower() for p in prompts}) == len(prompts)  # no exact duplicates kept
    heldout = {json.loads(x)["prompt"] for x in open(ROOT / "recipes/data/heldout.jsonl")}
    assert not any(p["prompt"] in heldout for p in prompts)

    distillery("run", str(recipe), "--runs", str(runs), "--until", "generate")
    gen = stage_dirs(runs, "ci-syn")["generate"]
    answered = {json.loads(x)["id"] for x in (gen / "responses.jsonl").read_text().splitlines()}
    assert {p["id"] for p in prompts} <= answered  # generate answers the new prompts like any other
    assert json.loads((gen / "manifest.json").read_text())["metrics"]["synthetic"]["kept"] == m["kept"]
