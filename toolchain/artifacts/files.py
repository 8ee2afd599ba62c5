"""Model files on disk, checked before anything loads them: a bad file is one line naming it, never a crash
deep inside a runtime. The bottom floor: the error type every file module raises and the safetensors check
(GGUF and ONNX have theirs in gguf_io and onnx_io; toolchain.artifacts.inspection opens any of the three)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


class ExportError(RuntimeError):
    """A model file that is not what it should be (truncated, wrong magic, unsafe); one line naming the file."""


def check_safetensors(path: Path) -> dict:
    """Header parses and every tensor's bytes lie inside the file."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ExportError(f"{path}: truncated safetensors (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ExportError(f"{path}: truncated safetensors (header of {n} bytes, file of {size})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ExportError(f"{path}: corrupt safetensors header") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + n + end > size:
        raise ExportError(f"{path}: truncated safetensors (tensor data ends at byte {8 + n + end}, file has {size})")
    params = 0
    for v in tensors.values():
        count = 1
        for d in v["shape"]:
            count *= d
        params += count
    return {"bytes": size, "tensors": len(tensors), "parameters": params}
