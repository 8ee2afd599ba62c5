"""Any model file distillery writes, opened with its own checks and described: what ``distillery inspect FILE``
prints and what ``serve --file`` checks before loading."""

from __future__ import annotations

from pathlib import Path

from toolchain.artifacts.files import ExportError, check_safetensors
from toolchain.artifacts.gguf_io import describe
from toolchain.artifacts.onnx_io import check


def inspect(path: Path) -> dict:
    """Open any model file distillery writes (.gguf, .onnx, .safetensors) with its checks; what is in it."""
    path = Path(path)
    if path.is_dir() and (path / "model.onnx").is_file():
        path = path / "model.onnx"
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return {"format": "gguf", **describe(path)}
    if suffix == ".onnx":
        return {"format": "onnx", **check(path)}
    if suffix == ".safetensors":
        return {"format": "safetensors", **check_safetensors(path)}
    raise ExportError(f"{path}: unknown model file type (expected .gguf, .onnx or .safetensors)")
