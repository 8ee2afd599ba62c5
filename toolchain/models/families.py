"""What differs between the model families users bring where distillery's own code touches it. So far: which
linear layers LoRA adapts — Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``, so the usual
per-projection names would adapt only ``o_proj`` and ``down_proj`` there, silently; they are mapped onto the fused
layers, and a name no layer of the model has is refused in one line naming what it has.

Measured per family (tiny random models from each family's ``transformers`` config, tests/test_families.py): the
layer cut, the vocabulary trim, LoRA on every projection and its merge, and the GGUF file against PyTorch for
Llama-3, Qwen2, Qwen3, Gemma-2, Gemma-3 (text), Phi-3 and Mistral.
"""

from __future__ import annotations

import json

from toolchain.models.references import ModelError, ModelRef, gguf_metadata

# per-projection names → the fused layer that holds them, in families that fuse (Phi-3)
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj"}


# llama.cpp sizes these architectures' query projection by the hidden size rather than heads x head size, so a
# student with fewer attention heads than its hidden size implies makes a GGUF it cannot load (tests/test_width.py)
FIXED_HEAD_LAYOUT = {"Qwen2ForCausalLM", "Phi3ForCausalLM"}


def linear_names(model) -> list[str]:
    """The leaf names of the model's linear layers (``q_proj``, ``qkv_proj``, ``lm_head``, ...)."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def lora_targets(model, requested: list[str]) -> list[str]:
    """``distill.lora.targets`` as this model names its layers (fused where it fuses), in the order given;
    ModelError naming the field for a name none of its layers has."""
    have = set(linear_names(model)) | {"embed_tokens"}
    out, missing = [], []
    for name in requested:
        found = name if name in have else FUSED.get(name) if FUSED.get(name) in have else None
        if found is None:
            missing.append(name)
        elif found not in out:
            out.append(found)
    if missing:
        kind = getattr(getattr(model, "config", None), "model_type", "this")
        raise ModelError(f"distill.lora.targets: {', '.join(missing)} is no layer of the {kind} model; its linear "
                         f"layers are {', '.join(sorted(have - {'embed_tokens'}))}")
    return out


def architecture(ref: ModelRef) -> str | None:
    """The Hugging Face architecture a student made from ``ref`` has: its folder's ``config.json``, or for a GGUF
    the class transformers' GGUF loader builds for its ``general.architecture``; None for an endpoint or what the
    files do not say."""
    if ref.kind == "hf_dir" and ref.path is not None and (ref.path / "config.json").is_file():
        names = json.loads((ref.path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        return names[0] if names else None
    if ref.kind == "gguf" and ref.path is not None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = str(gguf_metadata(ref.path).get("general.architecture") or "")
        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(arch)
    return None
