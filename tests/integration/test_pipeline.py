"""The whole chain on the real embedded teacher (SmolLM2-135M-Instruct GGUF) with recipes/ci.yaml."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, distillery, recipe_copy as _recipe, stage_dirs as _stage_dirs

pytestmark = pytest.mark.integration


def test_chain_generate_distill_merge_eval(ci_run):
    recipe, runs, proc = ci_run
    dirs = _stage_dirs(runs, "ci")
    assert set(dirs) == {"generate", "distill", "merge", "eval", "export", "bench"}
    gen = json.loads((dirs["generate"] / "manifest.json").read_text())
    assert gen["metrics"]["answers"] == 12 + 4
    assert gen["metrics"]["kept"] + gen["metrics"]["dropped_empty"] + gen["metrics"]["dropped_truncated"] == 12
    assert gen["licence"]["teacher_licence"] == "apache-2.0"
    rows = [json.loads(l) for l in (dirs["generate"] / "train.jsonl").read_text().splitlines()]
    assert rows and all(r["response"] and r["finish_reason"] == "stop" for r in rows)

    dist = json.loads((dirs["distill"] / "manifest.json").read_text())
    info = json.loads((dirs["distill"] / "student.json").read_text())
    assert len(info["kept_layers"]) == 8 and info["teacher_layers"] == 30
    assert len(info["influence"]) == 30
    top8 = sorted(range(30), key=lambda i: info["influence"][i], reverse=True)[:8]
    assert sorted(top8) == info["kept_layers"]
    assert dist["inputs"]["generate"] == gen["digest"]

    merge = json.loads((dirs["merge"] / "manifest.json").read_text())
    assert merge["metrics"]["max_abs_logit_diff"] <= 1e-4
    assert merge["metrics"]["tied_embeddings"] is True
    model_dir = dirs["merge"] / "model"
    for f in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md"):
        assert (model_dir / f).is_file(), f
    card = (model_dir / "README.md").read_text()
    assert "apache-2.0" in card and "8 of the teacher's 30" in card


def test_eval_reports_teacher_student_and_base_with_lm_eval(ci_run):
    _, runs, proc = ci_run
    out = _stage_dirs(runs, "ci")["eval"]
    report = json.loads((out / "eval.json").read_text())
    assert set(report["scores"]) == {"teacher", "student", "base"}
    assert report["docs"] == {"fact": 2, "classify": 1, "extract": 1} and report["gold_docs"]["fact"] == 2
    for role in ("teacher", "student", "base"):
        fact = report["scores"][role]["fact"]
        assert fact["gold"] in (0.0, 0.5, 1.0) and 0 <= fact["chrf"] <= 100 and fact["perplexity"] > 1
    # the teacher's gold answers are the greedy ones it gave in generate, cut at eval.max_new_tokens
    assert report["teacher_answers"].startswith("generate")
    assert report["metrics"]["classify"]["metric"] == "label" and report["metrics"]["extract"]["metric"] == "exact"
    assert report["versions"]["lm_eval"] and len(report["models"]["student"]["sha256"]) == 64
    # the teacher is best at reproducing its own answers
    assert report["scores"]["teacher"]["extract"]["perplexity"] < report["scores"]["base"]["extract"]["perplexity"]
    md = (out / "eval.md").read_text()
    assert "| task | n | teacher | student | retention | p(s<t) | gate |" in md and "**Quality gate: passed**" in md
    assert "| task | docs | teacher gold | student gold | student before distillation gold |" in md
    iv = report["intervals"]
    assert iv["seed"] == 1234 and iv["iters"] == 10_000 and set(iv["tasks"]) == set(report["paired"]) | {"overall"}
    for task, v in report["paired"].items():
        lo, hi = iv["tasks"][task]["teacher"]
        assert lo <= report["scores"]["teacher"][task]["gold"] <= hi and len(v["teacher"]) == len(v["ids"])
    assert report["gate"]["rule"] == "noninferior" and report["gate"]["passed"]  # floor 0: nothing to show
    assert "## fact: samples" in md and "- teacher: " in md and "- student: " in md
    tasks = {p.name for p in (out / "tasks" / "student").iterdir()}
    assert {"fact.jsonl", "fact.yaml", "fact_ppl.yaml"} <= tasks
    assert "retention" in proc.stdout + proc.stderr  # the table is printed
    # the student's confidence in each held-out answer, the score each task routes on, and the cascade table
    conf = report["confidence"]
    assert {pid for v in report["paired"].values() for pid in v["ids"]} <= set(conf)
    assert all(0.0 <= v <= 1.0 for scores in conf.values() for v in scores.values())
    assert all({"min_prob", "mean_prob", "first_margin"} <= set(s) for s in conf.values())
    classify = report["paired"].get("classify", {}).get("ids", [])
    assert all("label" in conf[pid] for pid in classify)  # a label task's answers carry their label's probability
    assert [r["target"] for r in report["cascade"]["targets"]] == [0.95, 0.98, 1.0]
    assert "## Cascade: the student answers when it is sure" in md


def test_quality_gate_fails_below_and_passes_at_the_measured_retention(ci_run, tmp_path):
    """Real models: the teacher against a student 8 of its 30 layers deep trained for 3 steps. Changing the
    threshold re-runs nothing; a threshold above what the student reaches exits 3 naming the failing tasks."""
    _, runs, _ = ci_run
    eval_dir = _stage_dirs(runs, "ci")["eval"]
    measured = json.loads((eval_dir / "eval.json").read_text())["retention"]["overall"]["retention"]
    assert measured is not None and measured < 1.5
    above = _recipe(tmp_path, "ci", eval__min_retention=round(measured + 0.01, 4), eval__gate="point")
    proc = distillery("eval", str(above), "--runs", str(runs), check=False)
    assert proc.returncode == 3, proc.stderr
    assert "quality gate failed (eval.gate point" in proc.stderr and "overall: FAIL, retention" in proc.stderr
    assert "Traceback" not in proc.stderr and "eval: up to date" in proc.stderr
    assert distillery("eval", str(above), "--runs", str(runs), "--no-gate").returncode == 0
    at = _recipe(tmp_path, "ci", eval__min_retention=max(0.0, round(measured, 4) - 0.0001), eval__gate="point")
    assert distillery("eval", str(at), "--runs", str(runs)).returncode == 0
    assert [p.name for p in (runs / "ci").glob("eval-*")] == [eval_dir.name]


def test_eval_is_reproducible(ci_run, tmp_path):
    _, runs, _ = ci_run
    first = json.loads((_stage_dirs(runs, "ci")["eval"] / "eval.json").read_text())
    recipe = _recipe(tmp_path, "ci")
    distillery("eval", str(recipe), "--runs", str(runs), "--force", "--no-gate", "--log-samples")
    dirs = sorted((runs / "ci").glob("eval-*"), key=lambda p: (p / "manifest.json").stat().st_mtime)
    second = json.loads((dirs[-1] / "eval.json").read_text())
    assert second["scores"] == first["scores"] and second["retention"] == first["retention"]
    samples = [json.loads(l) for l in (dirs[-1] / "samples.jsonl").read_text().splitlines()]
    assert {s["model"] for s in samples} == {"teacher", "student", "base"} and len(samples) == 3 * 4 * 2


def test_generate_is_reproducible(ci_run, tmp_path):
    """The teacher asked again (--force) writes byte-identical training and held-out files on this machine."""
    _, runs, _ = ci_run
    gen = _stage_dirs(runs, "ci")["generate"]
    before = {f: (gen / f).read_bytes() for f in ("train.jsonl", "heldout.jsonl")}
    proc = distillery("generate", str(_recipe(tmp_path, "ci")), "--runs", str(runs), "--force")
    assert "reusing" not in proc.stderr
    after = _stage_dirs(runs, "ci")["generate"]
    assert after.name == gen.name and {f: (after / f).read_bytes() for f in before} == before


def test_malformed_heldout_line_is_named_by_file_and_line(ci_run, tmp_path):
    _, runs, _ = ci_run
    bad = tmp_path / "heldout.jsonl"
    lines = (ROOT / "recipes/data/heldout.jsonl").read_text().splitlines()[:4]
    bad.write_text("\n".join(lines[:2] + ['{"id": "x", "prompt": '] + lines[2:]) + "\n")
    recipe = _recipe(tmp_path, "ci", data__heldout=[str(bad)])
    proc = distillery("eval", str(recipe), "--runs", str(runs), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and f"{bad}:3" in proc.stderr, proc.stderr


def test_merged_student_loads_and_stops_on_im_end(ci_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, runs, _ = ci_run
    model_dir = _stage_dirs(runs, "ci")["merge"] / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert tok.eos_token == "<|im_end|>"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok("hello")["input_ids"][0] != tok.convert_tokens_to_ids("<|im_start|>")  # no stray BOS
    assert model.model.embed_tokens.weight.data_ptr() == model.lm_head.weight.data_ptr()
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt")
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert torch.isfinite(model(ids).logits).all()


def test_rerun_skips_and_one_distill_field_reruns_only_downstream(ci_run, tmp_path):
    recipe, runs, _ = ci_run
    before = _stage_dirs(runs, "ci")
    again = distillery("run", str(recipe), "--runs", str(runs))
    assert again.stderr.count("up to date") == 6  # generate, distill, merge, eval, export, bench
    # the README's `make run` / `make recipe=...` path: the same chain through the Makefile, exit 0
    made = subprocess.run(["make", "run", f"recipe={recipe}", f"RUNS={runs}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert made.returncode == 0 and made.stderr.count("up to date") == 6, made.stdout + made.stderr
    one = subprocess.run(["make", "distill", f"recipe={recipe}", f"RUNS={runs}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert one.returncode == 0 and "distill: up to date" in one.stderr, one.stdout + one.stderr
    changed = _recipe(tmp_path, "ci", distill__lr=3e-4)  # not over the shared recipe file
    st = distillery("status", str(changed), "--runs", str(runs)).stdout.split("\n")
    states = {line.split()[0]: line.split()[1] for line in st if line.strip()}
    assert states == {"generate": "done", "distill": "stale", "merge": "stale", "eval": "stale", "export": "stale",
                      "bench": "stale"}
    proc = distillery("run", str(changed), "--runs", str(runs), "--until", "merge")
    assert "generate: up to date" in proc.stderr
    assert "▶ distill" in proc.stderr and "▶ merge" in proc.stderr
    after = {p.name for p in (runs / "ci").glob("*-*")}
    assert before["generate"].name in after and before["distill"].name in after  # old results kept
    assert len([n for n in after if n.startswith("distill-")]) == 2


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "toolchain.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "DISTILLERY_NO_PROGRESS": "1"})


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended before the kill point:\n{proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("kill point never reached")


def test_kill_generate_then_resume_loses_and_duplicates_nothing(tmp_path):
    recipe = _recipe(tmp_path, "killgen", data__limit=24)
    runs = tmp_path / "runs"
    proc = _spawn("generate", str(recipe), "--runs", str(runs))
    work = lambda: list((runs / "killgen" / ".work").glob("generate-*/responses.jsonl"))  # noqa: E731
    _wait_for(lambda: work() and len(work()[0].read_text().splitlines()) >= 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = [json.loads(l) for l in work()[0].read_text().splitlines() if l.endswith("}")]
    assert 6 <= len(partial) < 28
    resumed = distillery("generate", str(recipe), "--runs", str(runs))
    assert "resuming" in resumed.stderr
    rows = [json.loads(l) for l in (_stage_dirs(runs, "killgen")["generate"] / "responses.jsonl").read_text().splitlines()]
    ids = [(r["id"], r["sample"]) for r in rows]
    assert len(ids) == len(set(ids)) == 24 + 4
    by_id = {r["id"]: r for r in rows}
    for r in partial:  # answers from before the kill are kept as they were
        assert by_id[r["id"]]["response"] == r["response"]
    # ... and equal what an uninterrupted run of the same recipe gives (greedy decoding, per-prompt seeds, and
    # batches of fixed prompts: a group with a missing answer is decoded whole again)
    whole = tmp_path / "uninterrupted"
    distillery("generate", str(recipe), "--runs", str(whole))
    for f in ("train.jsonl", "heldout.jsonl"):
        assert (_stage_dirs(whole, "killgen")["generate"] / f).read_bytes() == \
            (_stage_dirs(runs, "killgen")["generate"] / f).read_bytes()


def test_kill_distill_then_resume_replays_exactly(tmp_path, ci_run):
    ci_recipe, ci_runs, _ = ci_run
    runs = tmp_path / "runs"
    # Same generate output as the ci run (copied), then a distill with enough steps to kill mid-way.
    src = _stage_dirs(ci_runs, "ci")["generate"]
    (runs / "ci").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(src), str(runs / "ci" / src.name)], check=True)
    recipe = _recipe(tmp_path, "ci", distill__max_steps=10, distill__batch_size=2)
    proc = _spawn("distill", str(recipe), "--runs", str(runs))
    ckpt = lambda: list((runs / "ci" / ".work").glob("distill-*/.resume/checkpoint.pt"))  # noqa: E731
    _wait_for(lambda: bool(ckpt()), proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    import torch

    killed_at = torch.load(ckpt()[0], weights_only=False)["step"]
    assert 1 <= killed_at < 10
    resumed = distillery("distill", str(recipe), "--runs", str(runs))
    assert "resuming from step" in resumed.stderr
    log = [json.loads(l) for l in (_stage_dirs(runs, "ci")["distill"] / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11))  # nothing lost, nothing twice
    # An uninterrupted run with the same settings gives the same loss curve.
    fresh = tmp_path / "fresh"
    (fresh / "ci").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(src), str(fresh / "ci" / src.name)], check=True)
    distillery("distill", str(recipe), "--runs", str(fresh))
    ref = [json.loads(l) for l in (_stage_dirs(fresh, "ci")["distill"] / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref], rel=1e-3)


def test_stage_needs_its_upstream(tmp_path):
    recipe = _recipe(tmp_path, "lonely")
    proc = distillery("merge", str(recipe), "--runs", str(tmp_path / "runs"), check=False)
    assert proc.returncode == 1
    assert "'generate' has not run" in proc.stderr and "Traceback" not in proc.stderr


def test_hf_backend_answers_like_llama_cpp():
    """The transformers engine on the same GGUF teacher (dequantized): same prompt tokens, stops on <|im_end|>.

    Greedy text may differ from llama.cpp's: llama.cpp multiplies with 8-bit activations, torch in float32.
    """
    from toolchain.backends import open_engine
    from toolchain.models.references import DEFAULT_TEACHER, resolve

    ref = resolve(DEFAULT_TEACHER)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    hf = open_engine(ref, "hf", threads=2).chat(msgs, max_tokens=32)
    cpp = open_engine(ref, "llama_cpp", threads=2).chat(msgs, max_tokens=32)
    assert hf.finish_reason == "stop" and "Paris" in hf.text
    assert cpp.text and cpp.completion_tokens > 0
    assert hf.prompt_tokens == cpp.prompt_tokens  # same chat template, same tokenizer


def test_pretrained_student_from_a_local_directory_with_lora(ci_run, tmp_path):
    """student.from = a local HF directory (here: the ci student), trained with LoRA and merged."""
    _, ci_runs, _ = ci_run
    dirs = _stage_dirs(ci_runs, "ci")
    local = dirs["merge"] / "model"
    recipe = _recipe(tmp_path, "ci", student={"from": str(local)}, distill__max_steps=2)
    runs = tmp_path / "runs"
    (runs / "ci").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(dirs["generate"]), str(runs / "ci" / dirs["generate"].name)], check=True)
    distillery("run", str(recipe), "--runs", str(runs), "--until", "merge")
    out = _stage_dirs(runs, "ci")
    info = json.loads((out["distill"] / "student.json").read_text())
    assert info["from"] == str(local) and len(info["kept_layers"]) == 8
    assert (out["distill"] / "adapter" / "adapter_model.safetensors").is_file()
    merge = json.loads((out["merge"] / "manifest.json").read_text())
    assert merge["metrics"]["tied_embeddings"] and merge["metrics"]["max_abs_logit_diff"] <= 1e-4


def test_unknown_licence_is_refused_before_any_work(tmp_path, ci_run):
    """A local teacher whose files name no licence needs licence.acknowledge (exit 2, nothing written)."""
    _, ci_runs, _ = ci_run
    teacher = tmp_path / "teacher"
    subprocess.run(["cp", "-r", str(_stage_dirs(ci_runs, "ci")["merge"] / "model"), str(teacher)], check=True)
    (teacher / "README.md").unlink()
    recipe = _recipe(tmp_path, "nolicence", teacher=str(teacher))
    runs = tmp_path / "runs"
    proc = distillery("generate", str(recipe), "--runs", str(runs), check=False)
    assert proc.returncode == 2
    assert "licence 'unknown'" in proc.stderr and "licence.acknowledge" in proc.stderr
    assert not runs.exists() or not list(runs.rglob("responses.jsonl"))


def test_batched_greedy_decoding_gives_each_prompt_its_own_answer():
    """llama.cpp decoding 4 prompts together (continuous batching, shared prefix read once) gives each the
    tokens it gets alone, but where the lone run itself was at a near tie (other batch shapes round otherwise)."""
    import numpy as np

    from toolchain.backends.llama_cpp import LlamaCppEngine
    from toolchain.models.references import DEFAULT_TEACHER, resolve

    engine = LlamaCppEngine(resolve(DEFAULT_TEACHER).path, n_ctx=512, logits_all=True)
    questions = ["What is the capital of France?", "Name three colours of the rainbow.", "What is 2 + 2?",
                 "Write one sentence about the sea.", "Is a tomato a fruit?", "Say hello in Spanish."]
    prompts = [engine.tokenize(engine.chat_text([{"role": "user", "content": q}])) for q in questions]
    seen = {}
    for i, toks, _ in engine.greedy_stream(prompts, 24, slots=4):
        assert i not in seen
        seen[i] = toks
    assert sorted(seen) == list(range(len(prompts)))  # each prompt answered once
    same = 0
    for i, p in enumerate(prompts):
        alone = engine.greedy(p, 24)
        if alone == seen[i]:
            same += 1
            continue
        k = next(j for j in range(min(len(alone), len(seen[i]))) if alone[j] != seen[i][j])
        top2 = np.sort(engine.logits(p + alone[:k])[-1])[-2:]
        assert top2[1] - top2[0] < 0.5, f"prompt {i} parts at token {k} with a margin of {top2[1] - top2[0]:.2f}"
    assert same >= len(prompts) - 2
    again = {i: toks for i, toks, _ in engine.greedy_stream(prompts, 24, slots=8)}
    assert engine.greedy_batch(prompts, 24) == [again[i] for i in range(len(prompts))]  # prompt order, same tokens
    engine.close()
