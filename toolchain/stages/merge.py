"""merge: one standalone student directory, whatever the training method.

Inputs: distill's output (base/ + adapter/ for LoRA, model/ for a full fine-tune).
Outputs: model/ with safetensors weights, tokenizer + chat template, generation_config.json and README.md
(model card with the teacher's licence terms), and merge_check.json.

Checks, each fatal: the merged model's logits equal the adapter model's on fixed inputs (max |diff| within
``merge.tolerance``), and tied embeddings are still one tensor after merge and reload.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from toolchain.models import student as students
from toolchain.models.licenses import LicenceDecision, model_card_section
from toolchain.models.references import public_name
from toolchain.pipeline.runs import Manifest
from toolchain.recipe import Recipe
from toolchain.ui import console

CHECK_TEXTS = [
    "<|im_start|>user\nWhat is the capital of Peru?<|im_end|>\n<|im_start|>assistant\n",
    "Distillation keeps the teacher's behaviour in a smaller model. 1, 2, 3 — ünïcödé ✓",
]


def _check_inputs(tok) -> dict[str, torch.Tensor]:
    enc = tok(CHECK_TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.inference_mode()
def _logits(model, batch) -> torch.Tensor:
    return model(**batch).logits.double()


def _model_card(cfg: Recipe, info: dict, decision: dict | None, metrics: dict) -> str:
    layers = info.get("kept_layers", [])
    lines = [
        "---",
        f"license: {decision['teacher_licence'] if decision else 'unknown'}",
        "library_name: transformers",
        "tags: [distillery, distillation]",
        "---",
        "",
        f"# {cfg.name} student",
        "",
        f"Distilled by distillery from `{public_name(cfg.teacher)}` ({cfg.distill.flavour}-label, "
        f"{cfg.distill.method}).",
        "",
        f"- layers: {len(layers)}"
        + (f" of the teacher's {info['teacher_layers']} (kept: {layers})" if "teacher_layers" in info else ""),
        f"- parameters: {info.get('student_params', 0) / 1e6:.1f}M",
        f"- merge check: max |logit diff| {metrics['max_abs_logit_diff']:.2e}, tied embeddings: "
        f"{metrics['tied_embeddings']}",
        "",
    ]
    if decision:
        lines.append(model_card_section(LicenceDecision(**decision), public_name(cfg.teacher)))
    return "\n".join(lines)


def run(cfg: Recipe, inputs: dict[str, Path], out_dir: Path) -> Manifest:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src = inputs["distill"]
    info = json.loads((src / "student.json").read_text(encoding="utf-8"))
    dtype = getattr(torch, cfg.merge.dtype)
    target = out_dir / "model"

    # The merge and both sides of the check run in float64: W + BA is then rounded once, on save, and the
    # check measures the merge itself rather than float32 summation order (which alone differs by ~2e-4).
    if (src / "adapter").is_dir():
        from peft import PeftModel

        tok = AutoTokenizer.from_pretrained(src / "base")
        base = AutoModelForCausalLM.from_pretrained(src / "base", dtype=torch.float64)
        adapted = PeftModel.from_pretrained(base, src / "adapter")
        adapted.eval()
        batch = _check_inputs(tok)
        reference = _logits(adapted, batch)
        merged = adapted.merge_and_unload()
    else:
        tok = AutoTokenizer.from_pretrained(src / "model")
        merged = AutoModelForCausalLM.from_pretrained(src / "model", dtype=torch.float64)
        batch = _check_inputs(tok)
        reference = _logits(merged, batch)

    merged.eval()
    merged = merged.to(dtype)
    merged.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        do_sample=False, max_new_tokens=cfg.eval.max_new_tokens,
    )
    merged.save_pretrained(target, safe_serialization=True)
    tok.save_pretrained(target)

    # Reload from disk: what we check is what a user loads.
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float64)
    diff = float((_logits(reloaded, batch) - reference).abs().max())
    tol = cfg.merge.tolerance if cfg.merge.dtype == "float32" else max(cfg.merge.tolerance, 5e-2)
    tied_expected = bool(getattr(reloaded.config, "tie_word_embeddings", False))
    tied = students.embeddings_tied(reloaded)
    metrics = {"max_abs_logit_diff": diff, "tolerance": tol, "tied_embeddings": tied,
               "student_params": students.parameter_count(reloaded),
               "student_layers": reloaded.config.num_hidden_layers,
               "bytes": sum(p.stat().st_size for p in target.glob("*.safetensors"))}
    console.print(f"  merge check: max |logit diff| {diff:.1e} (tolerance {tol:g}), tied: {tied}")
    if diff > tol:
        shutil.rmtree(target)
        raise RuntimeError(f"merged logits differ from the adapter model by {diff:.2e} > {tol:g}")
    if tied_expected and not tied:
        shutil.rmtree(target)
        raise RuntimeError("tie_word_embeddings is set but embed_tokens and lm_head are separate after merge")

    licence = json.loads((src / "manifest.json").read_text())["licence"] if (src / "manifest.json").exists() else None
    (target / "README.md").write_text(_model_card(cfg, info, licence, metrics), encoding="utf-8")
    (out_dir / "merge_check.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    # How to talk to this student: read by serving and scoring, so they prompt it the way it was trained.
    settings = {"flavour": cfg.distill.flavour, "system_prompt": cfg.student_system_prompt(),
                "reasoning": cfg.section("reasoning") if cfg.distill.flavour == "reasoning" else None}
    (target / "distillery.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return Manifest(metrics=metrics)
