"""Width pruning on every family: a cut that keeps everything computes the same logits, dead channels and
heads go first, and a cut model saves, reloads and runs in llama.cpp with PyTorch's greedy tokens."""

import numpy as np
import pytest
import torch

from tests.test_families import FAMILIES, PROMPT, SMOLLM2, _logits, _model, check_gguf, check_onnx
from toolchain.models import families, sizes, student, width
from toolchain.models.references import load_tokenizer, resolve

SEQS = [PROMPT, [5, 77, 310, 42, 9, 1000, 12], [400, 401, 402, 403]]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cut_that_keeps_every_channel_and_head_computes_the_same_logits(family):
    model = _model(family)
    want = _logits(model, PROMPT)
    c = model.config
    n = len(student.decoder_layers(model))
    everything = {"mlp": [list(range(c.intermediate_size))] * n, "kv_heads": [list(range(c.num_key_value_heads))] * n,
                  "hidden": list(range(c.hidden_size))}
    width.apply(model, everything)  # every weight sliced and put back through the same code a real cut takes
    np.testing.assert_array_equal(_logits(model, PROMPT), want)
    assert width.plan(model, SEQS, c.intermediate_size, c.num_key_value_heads,
                      c.hidden_size) == {"mlp": None, "kv_heads": None}


@pytest.mark.parametrize("family", ["llama3", "phi3", "gemma3"])
def test_dead_channels_and_head_groups_are_cut_first(family):
    model = _model(family)
    c = model.config
    hd = width.head_dim(model)
    dead_channels, dead_group = [3, 17, 40], 1
    with torch.no_grad():
        for layer in student.decoder_layers(model):
            mlp, attn = layer.mlp, layer.self_attn
            if hasattr(mlp, "gate_up_proj"):
                mlp.gate_up_proj.weight[[i + c.intermediate_size for i in dead_channels]] = 0  # up half: product 0
            else:
                mlp.up_proj.weight[dead_channels] = 0
            per = c.num_attention_heads // c.num_key_value_heads
            v_rows = slice(dead_group * hd, (dead_group + 1) * hd)
            if hasattr(attn, "qkv_proj"):
                q = c.num_attention_heads * hd
                kv = c.num_key_value_heads * hd
                attn.qkv_proj.weight[q + kv + v_rows.start: q + kv + v_rows.stop] = 0
            else:
                attn.v_proj.weight[v_rows] = 0
                if attn.v_proj.bias is not None:
                    attn.v_proj.bias[v_rows] = 0
            assert per >= 1
    kept = width.plan(model, SEQS, c.intermediate_size - len(dead_channels), c.num_key_value_heads - 1)
    for layer_kept in kept["mlp"]:
        assert not set(dead_channels) & set(layer_kept) and len(layer_kept) == c.intermediate_size - 3
    assert all(dead_group not in g for g in kept["kv_heads"])


def _reloads_and_runs_in_llama_cpp(model, tmp_path) -> None:
    """The cut model saves and reloads with the same logits, and llama.cpp runs it as PyTorch does."""
    from transformers import AutoModelForCausalLM

    want = _logits(model, PROMPT)
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32,
                                                    attn_implementation="eager")
    np.testing.assert_allclose(_logits(reloaded.eval(), PROMPT), want, atol=1e-5, rtol=0)
    check_gguf(model, tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cut_model_reloads_and_runs_in_llama_cpp_with_the_same_greedy_tokens(family, tmp_path):

    model = _model(family)
    before = student.parameter_count(model)
    shape = sizes.from_config(model.config.to_dict())
    # half the MLP, one of two key/value groups (where llama.cpp allows fewer heads than the hidden size implies)
    heads = family not in ("qwen2", "phi3")
    assert (type(model).__name__ in families.FIXED_HEAD_LAYOUT) != heads
    width.apply(model, width.plan(model, SEQS, 64, 1 if heads else None))
    c = model.config
    assert c.intermediate_size == 64 and (c.num_key_value_heads, c.num_attention_heads) == ((1, 2) if heads else (2, 4))
    cut = shape.with_width(64, 1 if heads else None)  # what plan counts for the student
    bias = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    assert student.parameter_count(model) < before and cut.params == pytest.approx(student.parameter_count(model) - bias, rel=0.01)
    _reloads_and_runs_in_llama_cpp(model, tmp_path)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_a_cut_model_exports_to_onnx_with_pytorchs_logits(family, tmp_path):
    """Fewer heads of the same size and a narrower hidden size also in optimum's export and onnxruntime (Qwen2's
    too: only llama.cpp's graph cannot take them)."""

    model = _model(family)
    width.apply(model, width.plan(model, SEQS, 64, 1, 32))  # and a hidden size half the teacher's
    assert model.config.hidden_size == 32
    check_onnx(model, tmp_path)


def test_distill_cuts_layers_and_width_and_eval_cuts_the_same_student_again(tmp_path):
    import json

    from tests.conftest import tiny_generate_dir, tiny_recipe
    from toolchain.models import cut
    from toolchain.stages import distill

    folder = tmp_path / "llama3"
    _model("llama3").save_pretrained(folder)
    load_tokenizer(resolve(SMOLLM2)).save_pretrained(folder)
    cfg = tiny_recipe(folder, tmp_path, student={"from": "teacher", "keep_layers": 2, "select": "even",
                                                 "intermediate_size": 64, "kv_heads": 1, "hidden_size": 32})
    out = tmp_path / "out"
    out.mkdir()
    manifest = distill.run(cfg, {"generate": tiny_generate_dir(tmp_path)}, out)
    info = json.loads((out / "student.json").read_text())
    assert len(info["width"]["mlp"]) == 2 and all(len(k) == 64 for k in info["width"]["mlp"])
    assert info["width"]["kv_heads"] in ([[0], [0]], [[0], [1]], [[1], [0]], [[1], [1]])
    saved = json.loads((out / "model" / "config.json").read_text())
    assert (saved["intermediate_size"], saved["num_key_value_heads"], saved["num_attention_heads"]) == (64, 1, 2)
    assert saved["head_dim"] == 16 and manifest.metrics["student_params"] == info["student_params"]
    assert saved["hidden_size"] == 32 and len(info["width"]["hidden"]) == 32
    again = cut.recut(cfg, info)  # eval's student before distillation: the same shape, the same kept rows
    assert student.parameter_count(again) == info["student_params"]
    assert again.config.intermediate_size == 64 and again.config.num_key_value_heads == 1
    assert again.config.hidden_size == 32


def test_sweep_shapes_are_depth_width_and_head_groups_and_bad_ones_name_the_item():
    from toolchain.pipeline.runner import parse_shapes, shape_label
    from toolchain.recipe import RecipeError

    assert parse_shapes("20, 16x1024,20X1536x2,20x768h512,14H512") == [
        {"keep_layers": 20}, {"keep_layers": 16, "intermediate_size": 1024},
        {"keep_layers": 20, "intermediate_size": 1536, "kv_heads": 2},
        {"keep_layers": 20, "intermediate_size": 768, "hidden_size": 512}, {"keep_layers": 14, "hidden_size": 512}]
    assert shape_label({"keep_layers": 20, "intermediate_size": 1536, "kv_heads": 2}) == "20L x 1536 MLP x 2 KV"
    assert shape_label({"keep_layers": 14, "hidden_size": 512}) == "14L x 512 hidden"
    for bad in ("20x", "0", "1x2x3x4", "a", ",", "20h", "h512", "20h0", "20hx5"):
        with pytest.raises(RecipeError, match="--shapes"):
            parse_shapes(bad)


@pytest.mark.parametrize("family", ["llama3", "gemma3", "mistral"])
def test_a_narrower_hidden_size_cuts_the_dead_channels_and_runs_in_llama_cpp(family, tmp_path):
    """student.hidden_size: a residual channel nothing writes to is ranked last and cut first; the cut model's
    every hidden-sized weight is narrower, its parameter count is what plan counts, it reloads from disk with the
    same logits, and llama.cpp's converter and runtime take it with PyTorch's greedy tokens (the attention keeps its
    head size, written as attention.key_length)."""
    model = _model(family)
    c = model.config
    full, hd = c.hidden_size, width.head_dim(model)
    dead = [5, 11]
    with torch.no_grad():  # channels the embedding and every layer leave at zero: their normalised value is zero
        model.get_input_embeddings().weight[:, dead] = 0
        for layer in student.decoder_layers(model):
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
    shape = sizes.from_config(model.config.to_dict())
    kept = width.plan(model, SEQS, None, None, full - 16)
    assert len(kept["hidden"]) == full - 16 and not set(dead) & set(kept["hidden"])
    width.apply(model, kept)
    assert (model.config.hidden_size, width.head_dim(model)) == (full - 16, hd)
    assert model.get_input_embeddings().weight.shape[1] == full - 16
    bias = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert shape.with_width(None, None, full - 16).params == pytest.approx(
        student.parameter_count(model) - bias, rel=0.01, abs=norms)
    _reloads_and_runs_in_llama_cpp(model, tmp_path)


def test_a_hidden_size_the_teacher_lacks_or_llama_cpp_cannot_load_is_refused_at_validate(tmp_path):
    from tests.conftest import tiny_recipe
    from toolchain.pipeline.runner import check_dimensions
    from toolchain.recipe import RecipeError

    for family in ("llama3", "qwen2"):
        folder = tmp_path / family
        _model(family).save_pretrained(folder)
        load_tokenizer(resolve(SMOLLM2)).save_pretrained(folder)
    cut = {"from": "teacher", "keep_layers": 2, "select": "even"}
    check_dimensions(tiny_recipe(tmp_path / "llama3", tmp_path, student={**cut, "hidden_size": 32}))
    with pytest.raises(RecipeError, match="student.hidden_size: 64 is not fewer than the teacher's 64 hidden"):
        check_dimensions(tiny_recipe(tmp_path / "llama3", tmp_path, student={**cut, "hidden_size": 64}))
    # Qwen2: llama.cpp sizes the query projection by the hidden size (the default export has gguf)
    with pytest.raises(RecipeError, match="student.hidden_size: llama.cpp sizes Qwen2ForCausalLM's query"):
        check_dimensions(tiny_recipe(tmp_path / "qwen2", tmp_path, student={**cut, "hidden_size": 32}))
