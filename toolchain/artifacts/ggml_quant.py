"""What a quantized GGUF will hold for a weight, computed by llama.cpp's own code: libggml's ``ggml_quantize_chunk``
(the function llama-quantize calls for every tensor, row by row) and the type's ``to_float`` (what the runtime
reads back). Quantization-aware training trains against exactly these numbers, and ``tensor_types`` asks
llama.cpp's quantizer (a dry run) which type each tensor of a file will get: its per-tensor rules (a few
``ffn_down`` one type up, the tied embedding, rows a k-quant cannot divide) are llama.cpp's, not copied here.

The library is the one llama-cpp-python loads (its ``lib/`` folder), so the training and the runtime that runs the
file are one llama.cpp version.
"""

from __future__ import annotations

import ctypes
import functools
import re
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from toolchain.artifacts.files import ExportError
from toolchain.artifacts.gguf_io import FTYPES, captured_stderr


class _Traits(ctypes.Structure):  # ggml.h: struct ggml_type_traits
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


@functools.cache
def _lib() -> ctypes.CDLL:
    import llama_cpp  # loads libggml and libllama from its own lib/ folder

    found = sorted((Path(llama_cpp.__file__).parent / "lib").glob("*ggml-base*"))
    if not found:
        raise ExportError("llama-cpp-python ships no libggml-base library: quantization-aware training needs it")
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_type(name: str) -> GGMLQuantizationType:
    """A type by its llama.cpp name (q8_0, IQ4_NL, ...)."""
    try:
        return GGMLQuantizationType[name.upper()]
    except KeyError:
        raise ValueError(f"{name!r} is not a ggml type") from None


def block_size(kind: GGMLQuantizationType) -> int:
    return int(_lib().ggml_get_type_traits(int(kind)).contents.blck_size)


def quantize(x: np.ndarray, kind: GGMLQuantizationType) -> bytes:
    """A 2-D float32 array's rows as ``kind`` stores them (what llama-quantize writes without an importance
    matrix)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    if n % block_size(kind):
        raise ValueError(f"a row of {n} values does not divide into {kind.name}'s blocks of {block_size(kind)}")
    lib = _lib()
    out = ctypes.create_string_buffer(lib.ggml_row_size(int(kind), n) * rows)
    lib.ggml_quantize_chunk(int(kind), x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out, 0, rows, n, None)
    return out.raw


def dequantize(data: bytes | np.ndarray, kind: GGMLQuantizationType, shape: tuple[int, int]) -> np.ndarray:
    """``kind``'s bytes of a (rows, n) tensor read back as float32, by the type's own ``to_float``."""
    traits = _lib().ggml_get_type_traits(int(kind)).contents
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    out = np.empty(shape, dtype=np.float32)
    _TO_FLOAT(traits.to_float)(buf.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size)
    return out


def roundtrip(x: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray:
    """``x`` as the runtime will see it once stored as ``kind``: the fake-quantized weight."""
    if kind == GGMLQuantizationType.F32:
        return np.asarray(x, dtype=np.float32)
    return dequantize(quantize(x, kind), kind, x.shape)


# "[  70/  74] blk.7.attn_v.weight - [ 576, 192, 1, 1], type = f32, size = 0.42 MiB -> 0.06 MiB (iq4_nl)"; a
# tensor kept as it is ends at its size
_TENSOR_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type\s*=\s*(\w+),.*?(?:\((\w+)\))?\s*$")


def tensor_types(gguf_path: Path, quant: str) -> dict[str, GGMLQuantizationType]:
    """GGUF tensor name -> the type llama.cpp's quantizer gives it for the preset ``quant`` (llama_model_quantize
    with dry_run: nothing written). A tensor it keeps as it is keeps its type."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{FTYPES[quant]}")
    params.dry_run = True
    params.nthread = 1
    with captured_stderr() as log:
        rc = llama_cpp.llama_model_quantize(str(gguf_path).encode(), b"/dev/null", params)
    out = {}
    for line in log:
        m = _TENSOR_LINE.search(line)
        if m:
            out[m.group(1)] = ggml_type(m.group(3) or m.group(2))
    if rc != 0 or not out:
        raise ExportError(f"{gguf_path}: llama.cpp's quantizer did not say which type each tensor gets for {quant} "
                          f"(return code {rc})")
    return out
