"""Quantization-aware training: the last ``distill.quantization_aware.steps`` optimizer steps see every weight as
the shipped GGUF will hold it.

``plan`` converts the student as it is at that point with llama.cpp's converter (float32, no vocabulary) and asks
llama.cpp's quantizer, in a dry run, which type each tensor gets for the recipe's preset (iq4_nl puts a few
``ffn_down`` in q5_k and a tied embedding whose rows k-quants cannot divide in q8_0: llama.cpp's rules, read from it,
not restated here). ``attach`` puts a ``FakeQuant`` on each such weight: the forward pass reads
``dequantize(quantize(w))`` computed by libggml itself (toolchain.artifacts.ggml_quant: bit for bit what the
quantized file holds, tested), the backward pass the straight-through estimator (the gradient of ``w``). The float
weights stay the trained ones; ``detach`` takes the fake quantization off before saving, and export's quantizer
then stores exactly what the last steps trained against (without an importance matrix, which would round
otherwise).

Every optimizer step changes the weights, so each trained one is quantized again before the next forward pass, all
tensors at once on a thread pool (libggml releases the GIL).
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from toolchain.artifacts import ggml_quant, gguf_io
from toolchain.models.references import gguf_metadata


class _Straight(torch.autograd.Function):
    """Forward: the quantized values exactly (``w + (q - w).detach()`` is not always ``q`` in floating point, and
    loses the sign of a zero); backward: the gradient goes to ``w`` unchanged (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, w, q):
        return q.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class FakeQuant(torch.nn.Module):
    """``w`` as ``kind`` stores it in the forward pass, the identity in the backward pass. The quantized copy is
    made on first use and again by ``refresh`` (the trainer calls it after every optimizer step: an optimizer
    writing through ``.data`` or a fused kernel leaves no trace a module could check)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self._q: torch.Tensor | None = None

    def refresh(self, w: torch.Tensor) -> None:
        x = w.detach().float().cpu().numpy().reshape(w.shape[0], -1)
        q = ggml_quant.roundtrip(x, self.kind)
        self._q = torch.from_numpy(q).reshape(w.shape).to(device=w.device, dtype=w.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self._q is None:
            self.refresh(w)
        return _Straight.apply(w, self._q)


def _tensor_names(model, gguf_path: Path) -> dict[str, str]:
    """The model's parameter names -> the tensor names llama.cpp's converter gave them."""
    import gguf

    meta = gguf_metadata(gguf_path)
    arch_name = str(meta["general.architecture"])
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, int(meta[f"{arch_name}.block_count"]))
    out = {}
    for name, _ in model.named_parameters():
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            out[name] = mapped
    return out


def plan(model, quant: str, work: Path | None = None) -> dict[str, object]:
    """Parameter name -> the ggml type llama.cpp's quantizer stores it in for the preset ``quant`` (only the ones
    it quantizes: norms and other float tensors are left out). The student is written out and converted in a
    temporary folder under ``work`` (the stage's resume folder: on the same disk as its outputs)."""
    with tempfile.TemporaryDirectory(dir=work, prefix="qat-") as tmp:
        hf, f32 = Path(tmp) / "hf", Path(tmp) / "student-f32.gguf"
        model.save_pretrained(hf, safe_serialization=True)
        gguf_io.convert(hf, f32, "f32", keep_vocab=False)
        types = ggml_quant.tensor_types(f32, quant)
        names = _tensor_names(model, f32)
    float_types = {ggml_quant.ggml_type(t) for t in ("f32", "f16", "bf16")}
    return {p: types[t] for p, t in names.items() if t in types and types[t] not in float_types}


def _modules(model, types: dict[str, object]):
    """(module, ggml type) for each planned weight; a weight tied to another (the output layer) once per module
    that uses it."""
    owners: dict[int, list] = {}
    for module in model.modules():
        w = module._parameters.get("weight")
        if w is not None:
            owners.setdefault(id(w), []).append(module)
    named = dict(model.named_parameters())
    for name, kind in types.items():
        for module in owners.get(id(named[name]), []):
            yield module, kind


def attach(model, types: dict[str, object]) -> list[tuple[torch.nn.Module, FakeQuant]]:
    """A ``FakeQuant`` on every planned weight (both modules of a tied weight: the file holds it once, the forward
    pass reads it twice, the same quantized values each time)."""
    shared: dict[int, FakeQuant] = {}
    done = []
    for module, kind in list(_modules(model, types)):
        fq = shared.setdefault(id(module.weight), FakeQuant(kind))
        parametrize.register_parametrization(module, "weight", fq, unsafe=True)
        done.append((module, fq))
    return done


def refresh(attached: list[tuple[torch.nn.Module, FakeQuant]], threads: int | None = None) -> None:
    """Quantize again every weight that is being trained (a frozen one keeps its first quantization), all at once
    on a thread pool."""
    todo = {}
    for module, fq in attached:
        w = module.parametrizations.weight.original
        if fq._q is None or w.requires_grad:
            todo[id(fq)] = (fq, w)
    if todo:
        with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            list(pool.map(lambda item: item[0].refresh(item[1]), todo.values()))


def detach(attached: list[tuple[torch.nn.Module, FakeQuant]]) -> None:
    """Take the fake quantization off: the modules hold their trained float weights again."""
    for module, _ in attached:
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def plain_name(name: str) -> str:
    """A parameter's name as it is without the fake quantization on it (checkpoints are written in these)."""
    return name.replace(".parametrizations.weight.original", ".weight")
