"""ONNX files: optimum's exporter (decoder with KV cache), onnxruntime int8 quantization, and the checks that
an ONNX model is whole and safe to load before onnxruntime touches it."""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

from toolchain.artifacts.files import ExportError, run_tool

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "config.json", "generation_config.json")


_OPTIMUM_DRIVER = """
import logging, sys, warnings
from optimum.exporters.onnx import main_export
logging.getLogger("optimum").setLevel(logging.ERROR)
warnings.simplefilter("ignore")
main_export(sys.argv[1], output=sys.argv[2], task="text-generation-with-past", device="cpu",
            do_validation=False, no_post_process=False)
"""


def export(model_dir: Path, out_dir: Path) -> Path:
    """optimum-onnx ``text-generation-with-past``: one decoder taking past_key_values (empty on the first step).
    Tied embeddings are stored once: optimum deduplicates the lm_head copy of the embedding matrix. Run in its own
    process, so it has a time limit like every other tool."""
    cmd = [sys.executable, "-c", _OPTIMUM_DRIVER, str(model_dir), str(out_dir)]
    done = run_tool(cmd, f"optimum's ONNX export of {model_dir}", 3600,
                    env={**os.environ, "PYTHONWARNINGS": "ignore"})
    path = out_dir / "model.onnx"
    if done.returncode != 0 or not path.is_file():
        tail = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()][-1:] or ["no output"]
        raise ExportError(f"{model_dir}: optimum wrote no model.onnx: {tail[0]}")
    return path


ONNX_VARIANTS = ("fp32", "int8", "int8_nbits", "int4", "genai_int4", "genai_fp32")


def genai_build(model_dir: Path, out_dir: Path, variant: str) -> Path:
    """onnxruntime-genai's model builder: its own decoder graph (fused attention with a shared KV buffer;
    genai_int4: MatMulNBits int4 weights, RTN, blocks of 32), a genai_config.json and the tokenizer files. The
    result is a plain ONNX decoder with past_key_values too, so it is checked, scored and served as the others."""
    precision = {"genai_int4": "int4", "genai_fp32": "fp32"}[variant]
    cache = out_dir.with_name(out_dir.name + ".cache")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out_dir),
           "-p", precision, "-e", "cpu", "-c", str(cache)]
    done = run_tool(cmd, f"onnxruntime-genai's model builder on {model_dir}", 3600,
                    env={**os.environ, "PYTHONWARNINGS": "ignore"})
    shutil.rmtree(cache, ignore_errors=True)
    out = out_dir / "model.onnx"
    if done.returncode != 0 or not out.is_file():
        tail = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()][-1:] or ["no output"]
        raise ExportError(f"{model_dir}: onnxruntime-genai's model builder failed ({variant}): {tail[0]}")
    for name in TOKENIZER_FILES:  # config.json and generation_config.json too, for our own engine
        if (model_dir / name).is_file() and not (out_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    return out


def quantize(src: Path, out_dir: Path, variant: str) -> Path:
    """An onnxruntime-quantized copy of ``src`` in ``out_dir`` (with the tokenizer files).

    int8: quantize_dynamic, int8 weights per channel and int8 activations at run time; the MLP down
    projections stay float, as their inputs carry outliers (measured on SmolLM2: with them quantized the KL to
    the float model is 0.72 and top-1 agreement 65%; without, 0.07 and 87%). Weights use 7 of the 8 bits
    (``reduce_range``): on an x86 CPU without VNNI, onnxruntime multiplies uint8 activations by int8 weights
    with an instruction that saturates pairs of products at int16, and full-range weights overflow it (without
    reduce_range the default student scored 16.7% held-out gold against PyTorch's 44.2% on an AVX2-only EPYC;
    docs/export.md). A file is made on one machine and run on another, so it is made safe for both.
    int8_nbits / int4: weight-only MatMulNBits, symmetric blocks of 32 (activations stay float). int8_nbits
    is the closest to float (KL 0.0013) but onnxruntime 1.32's 8-bit kernel decodes ~5x slower than int8 on
    this CPU; int4 is fast and loses the most.
    """
    import logging

    import onnx

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic warns through the root logger
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    if variant in ("int8_nbits", "int4"):
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits

        config = nbits.DefaultWeightOnlyQuantConfig(
            block_size=32, is_symmetric=True, bits=8 if variant == "int8_nbits" else 4
        )
        quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    elif variant == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        graph = onnx.load(str(src), load_external_data=False).graph
        keep_float = [n.name for n in graph.node if n.op_type == "MatMul" and "down_proj" in n.name]
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=keep_float)
    else:
        raise ValueError(f"unknown ONNX variant '{variant}' (one of {', '.join(ONNX_VARIANTS)})")
    for name in TOKENIZER_FILES:
        if (src.parent / name).is_file():
            shutil.copy2(src.parent / name, out_dir / name)
    return out


def external_files(path: Path) -> list[Path]:
    """The external-data files an ONNX model refers to; ExportError when any lies outside its folder."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    folder = path.parent.resolve()
    found = []
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in init.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if Path(location).is_absolute() or folder not in target.parents:
            raise ExportError(f"{path}: external data '{location}' of {init.name} points outside {folder}")
        if not target.is_file():
            raise ExportError(f"{path}: external data file {target} is missing")
        found.append(target)
    return sorted(set(found))


# Operators onnxruntime registers in the default ONNX domain (onnxruntime-genai's graphs use them); the ONNX
# checker does not know them, so a model that uses them is checked as a protobuf and opened by onnxruntime.
ORT_DEFAULT_DOMAIN_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}


def check(path: Path) -> dict:
    """Re-open an ONNX model and run the full checker (shape inference included; for a graph with
    onnxruntime's own default-domain operators, the structural checks and an onnxruntime session instead);
    what is in it."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    try:
        extra = external_files(path)
        model = onnx.load(str(path), load_external_data=False)
        if {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")} & ORT_DEFAULT_DOMAIN_OPS:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            try:
                ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime's own error types
                raise ValueError(f"onnxruntime cannot open it: {e}") from None
        else:
            onnx.checker.check_model(str(path), full_check=True)
    except ExportError:
        raise
    except (DecodeError, onnx.checker.ValidationError, OSError, ValueError) as e:
        raise ExportError(
            f"{path}: corrupt ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    weights: dict[str, int] = {}
    for init in model.graph.initializer:
        kind = onnx.TensorProto.DataType.Name(init.data_type)
        weights[kind] = weights.get(kind, 0) + math.prod(init.dims)
    size = path.stat().st_size + sum(f.stat().st_size for f in extra)
    return {"bytes": size, "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "initializers": len(model.graph.initializer), "weights_by_type": weights,
            "inputs": len(model.graph.input), "external_data": [f.name for f in extra]}
