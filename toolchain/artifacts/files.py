"""Model files on disk, checked before anything loads them: a bad file is one line naming it, never a crash
deep inside a runtime. The bottom floor: the error type every file module raises and the safetensors check
(GGUF and ONNX have theirs in gguf_io and onnx_io; toolchain.artifacts.inspection opens any of the three)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
from pathlib import Path

# Every external tool a stage runs (pip download, cmake, llama.cpp's converter, quantizer and imatrix, optimum,
# onnxruntime-genai's builder) has a time limit; this variable overrides each limit (seconds) when a machine is
# slower than the defaults allow for.
TOOL_TIMEOUT_ENV = "DISTILLERY_TOOL_TIMEOUT_S"


class ExportError(RuntimeError):
    """A model file that is not what it should be (truncated, wrong magic, unsafe); one line naming the file."""


def run_tool(cmd: list[str], what: str, timeout_s: float, *, cwd=None, env=None,
             input: str | None = None) -> subprocess.CompletedProcess:
    """Run an external command to completion, its output captured (never on the user's terminal). Past
    ``timeout_s`` (or ``$DISTILLERY_TOOL_TIMEOUT_S``) the command and everything it started (its process
    group: cmake's compilers, pip's builders) are killed and one line names ``what`` and the limit."""
    limit = float(os.environ.get(TOOL_TIMEOUT_ENV) or timeout_s)
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                                start_new_session=True)
    except OSError as e:
        raise ExportError(f"{what}: could not start {cmd[0]} ({e.strerror or e})") from None
    try:
        out, err = proc.communicate(input, timeout=limit)
    except subprocess.TimeoutExpired:
        with_group = getattr(os, "killpg", None)
        try:
            with_group(proc.pid, signal.SIGKILL) if with_group else proc.kill()
        except ProcessLookupError:
            pass
        proc.communicate()
        raise ExportError(f"{what} did not finish within {limit:g} s and was stopped "
                          f"(set {TOOL_TIMEOUT_ENV} to allow longer)") from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


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
