"""The merge check: a correct LoRA merge passes it, a merge that drops the adapter is refused."""

import json

import pytest
import torch

from toolchain.models.references import DEFAULT_TEACHER, load_tokenizer, resolve
from toolchain.recipe import parse


@pytest.fixture(scope="module")
def lora_distill_dir(tmp_path_factory):
    """A distill output (base/ + adapter/) for a tiny random Llama with the real SmolLM2 tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(resolve(DEFAULT_TEACHER))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    src = tmp_path_factory.mktemp("distill")
    model.save_pretrained(src / "base")
    tok.save_pretrained(src / "base")
    adapted = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapted.save_pretrained(src / "adapter")
    (src / "student.json").write_text(json.dumps({"kept_layers": [0, 1], "student_params": 1}))
    return src


def _cfg():
    return parse({"name": "t", "teacher": "x.gguf", "data": {"train": ["t.jsonl"]}}, "test")


def test_correct_merge_passes_the_check(lora_distill_dir, tmp_path):
    from toolchain.stages import merge

    m = merge.run(_cfg(), {"distill": lora_distill_dir}, tmp_path)
    assert m.metrics["max_abs_logit_diff"] <= 1e-4 and m.metrics["tied_embeddings"]


def test_a_merge_that_loses_the_adapter_is_refused(lora_distill_dir, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    from toolchain.stages import merge

    # a merge that unloads the adapters without adding BA to W
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    with pytest.raises(RuntimeError, match="merged logits differ from the adapter model"):
        merge.run(_cfg(), {"distill": lora_distill_dir}, tmp_path)
    assert not (tmp_path / "model").exists()
