"""Which file ``serve`` and ``bench`` load: the student from the recipe's finished export, the teacher from its own
file or, to compare at the same quantization, rebuilt through the same export path and cached.

    student, llama_cpp      runs/<recipe>/export-<key>/gguf/<recipe>-<quant>.gguf
    student, onnxruntime    runs/<recipe>/export-<key>/onnx/<variant>/
    student, onnxruntime_genai  runs/<recipe>/export-<key>/onnx/genai_<precision>/ (onnxruntime-genai's own loop)
    teacher, llama_cpp      the teacher GGUF when it already is <quant>; otherwise converted + quantized once
    teacher, onnxruntime    the teacher exported by optimum (+ quantized) once, or by onnxruntime-genai's builder
Rebuilt teachers live in ~/.cache/distillery/teachers/<sha256 of the teacher>-<quant>.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from toolchain.artifacts import gguf_io, onnx_io
from toolchain.artifacts.inspection import inspect
from toolchain.backends.llama_cpp import LlamaCppEngine
from toolchain.backends.onnx import OnnxEngine
from toolchain.backends.onnx_genai import GenaiEngine
from toolchain.data.formats import load_prompts
from toolchain.models.references import ModelError, cache_root, load_tokenizer, load_torch_model, resolve
from toolchain.pipeline.plans import finished
from toolchain.quality.constraints import task_constraints as build
from toolchain.quality.scores import flagged_files
from toolchain.recipe import Recipe, RecipeError

BACKENDS = ("llama_cpp", "onnxruntime", "onnxruntime_genai")


@dataclass(frozen=True)
class Served:
    path: Path  # a .gguf file or an ONNX folder
    backend: str
    model_id: str
    role: str
    quant: str


def default_quant(cfg: Recipe, backend: str) -> str:
    if backend == "llama_cpp":
        return "q8_0" if "q8_0" in cfg.export.quants else cfg.export.quants[0]
    if backend == "onnxruntime_genai":
        genai = [v for v in cfg.export.onnx if v.startswith("genai_")]
        return "genai_int4" if "genai_int4" in genai or not genai else genai[0]
    return "int8" if "int8" in cfg.export.onnx else cfg.export.onnx[0]


def student(cfg: Recipe, runs_root, backend: str, quant: str | None, include_flagged: bool = False) -> Served:
    """The exported student file for ``backend`` and ``quant`` (the recipe's default type when None). A file export
    flagged below the PyTorch student is refused unless ``include_flagged``."""
    quant = quant or default_quant(cfg, backend)
    export = finished(cfg, runs_root, "export")
    if backend == "llama_cpp":
        path = export / "gguf" / f"{cfg.name}-{quant}.gguf"
        listed = cfg.export.quants
    else:
        path = export / "onnx" / quant
        listed = cfg.export.onnx
    if backend == "onnxruntime_genai" and not quant.startswith("genai_"):
        raise ModelError(f"{quant}: the onnxruntime_genai backend runs genai_int4 / genai_fp32 folders (export.onnx)")
    if not path.exists():
        raise ModelError(f"{path}: not exported; the recipe's export lists {', '.join(listed)} for {backend}")
    name = str((path if path.suffix == ".gguf" else path / "model.onnx").relative_to(export))
    why = flagged_files(json.loads((export / "export.json").read_text(encoding="utf-8"))).get(name)
    if why and not include_flagged:
        raise ModelError(f"{name} is flagged {why}; serve another file (--quant) or pass --include-flagged")
    return Served(path, backend, f"{cfg.name}-student-{quant}", "student", quant)


def teacher(cfg: Recipe, backend: str, quant: str | None) -> Served:
    ref = resolve(cfg.teacher)
    if not ref.local:
        raise ModelError(f"{cfg.teacher}: an endpoint teacher is already served; point clients at it")
    if backend == "llama_cpp":
        own = gguf_io.file_type(ref.path) if ref.kind == "gguf" else None
        if quant is None or quant == own:
            if ref.kind != "gguf":
                quant = quant or "q8_0"
            else:
                return Served(ref.path, backend, f"{cfg.name}-teacher-{own}", "teacher", own or "gguf")
        if quant not in gguf_io.FTYPES:
            raise ModelError(f"unknown GGUF type '{quant}' (one of {', '.join(gguf_io.FTYPES)})")
        return Served(_teacher_gguf(ref, quant), backend, f"{cfg.name}-teacher-{quant}", "teacher", quant)
    quant = quant or ("genai_int4" if backend == "onnxruntime_genai" else "int8")
    if backend == "onnxruntime_genai" and not quant.startswith("genai_"):
        raise ModelError(f"{quant}: the onnxruntime_genai backend runs genai_int4 / genai_fp32 builds")
    if quant not in onnx_io.ONNX_VARIANTS:
        raise ModelError(f"unknown ONNX variant '{quant}' (one of {', '.join(onnx_io.ONNX_VARIANTS)})")
    return Served(_teacher_onnx(ref, quant), backend, f"{cfg.name}-teacher-{quant}", "teacher", quant)


def _cache(ref, suffix: str) -> Path:
    folder = cache_root() / "teachers"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{ref.sha256()[:16]}-{suffix}"


def _save_hf(ref, folder: Path) -> Path:
    """The teacher as an HF directory (a GGUF teacher dequantized by transformers, as distill sees it)."""
    model, tok = load_torch_model(ref), load_tokenizer(ref)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def _teacher_gguf(ref, quant: str) -> Path:
    out = _cache(ref, f"{quant}.gguf")
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        hf = _save_hf(ref, Path(tmp) / "hf")
        f32 = gguf_io.build_float(hf, Path(tmp) / "f32.gguf", ref.path if ref.kind == "gguf" else None,
                                  {"general.name": "teacher", "general.organization": "distillery"})
        staged = Path(tmp) / "out.gguf"
        gguf_io.quantize(f32, staged, quant)
        os.replace(staged, out)
    return out


def _teacher_onnx(ref, variant: str) -> Path:
    out = _cache(ref, f"onnx-{variant}")
    if (out / "model.onnx").is_file():
        return out
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        hf = _save_hf(ref, Path(tmp) / "hf")
        staged = Path(tmp) / "out"
        if variant.startswith("genai_"):
            onnx_io.genai_build(hf, staged, variant)
        else:
            fp32 = onnx_io.export(hf, Path(tmp) / "fp32")
            if variant == "fp32":
                shutil.copytree(fp32.parent, staged)
            else:
                onnx_io.quantize(fp32, staged, variant)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staged, out)
    return out


def task_specs(cfg: Recipe) -> dict[str, dict]:
    """Each task's scoring spec, labels inferred from the data's gold values where `tasks:` gives none (as eval)."""
    train, heldout = load_prompts(cfg)
    return cfg.task_specs([{"task": p.task, "gold": p.gold} for p in [*train, *heldout]])


def task_constraints(cfg: Recipe) -> tuple[dict, tuple[str, ...]]:
    """serve.constrain: task — each task's decoding constraint from the recipe (labels inferred from the data's
    gold values where `tasks:` gives none, as eval does), and the tasks that have none."""

    if cfg.serve.constrain == "none":
        return {}, ()
    specs = task_specs(cfg)
    constraints = build(specs)
    if cfg.serve.task is not None and cfg.serve.task not in specs:
        raise RecipeError(f"serve.task: '{cfg.serve.task}' is not a task of the recipe's data "
                          f"({', '.join(sorted(specs))})")
    return constraints, tuple(sorted(set(specs) - set(constraints)))


def check_accelerators(n_gpu_layers: int, providers: list[str]) -> None:
    """serve.n_gpu_layers and serve.onnx_providers against what this machine's builds can do: ModelError in one
    line naming the field (a CPU-only llama.cpp would silently run everything on the CPU)."""
    if n_gpu_layers:
        import llama_cpp

        if not llama_cpp.llama_supports_gpu_offload():
            raise ModelError(f"serve.n_gpu_layers: {n_gpu_layers} layers to offload, but this llama-cpp-python was "
                             "built without a GPU backend (make LLAMA_ISA=cuda LLAMA_CMAKE_ARGS=-DGGML_CUDA=ON)")
    wanted = [p for p in providers if p != "CPUExecutionProvider"]
    if wanted:
        import onnxruntime as ort

        missing = [p for p in wanted if p not in ort.get_available_providers()]
        if missing:
            raise ModelError(f"serve.onnx_providers: {', '.join(missing)} not in this onnxruntime "
                             f"({', '.join(ort.get_available_providers())}; pip install onnxruntime-gpu for CUDA)")


def open_engine(served: Served, threads: int | None = None, n_ctx: int = 4096, n_gpu_layers: int = 0,
                providers: list[str] | None = None):
    if served.backend == "llama_cpp":
        return LlamaCppEngine(served.path, n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers)
    if served.backend == "onnxruntime_genai":
        return GenaiEngine(served.path, threads=threads)

    return OnnxEngine(served.path, threads=threads, providers=providers)


def from_file(path: Path, backend: str | None) -> Served:
    """Any .gguf file or ONNX folder, checked first."""

    path = Path(path)
    kind = inspect(path)["format"]
    if kind == "safetensors":
        raise ModelError(f"{path}: serve a .gguf file or an ONNX folder (export the model first)")
    folder = path.parent if path.suffix == ".onnx" else path
    want = "llama_cpp" if kind == "gguf" else "onnxruntime"
    if kind == "onnx" and backend == "onnxruntime_genai":
        if not (folder / "genai_config.json").is_file():
            raise ModelError(f"{folder}: no genai_config.json; the onnxruntime_genai backend runs folders made by "
                             "onnxruntime-genai's builder (export.onnx genai_int4 / genai_fp32)")
        want = backend
    if backend and backend != want:
        raise ModelError(f"{path}: a {kind} file runs on the {want} backend, not {backend}")
    return Served(folder if kind == "onnx" else path, want, path.stem if kind == "gguf" else folder.name, "file", kind)


def start_child_server(argv, probe: str, what: str, timeout_s: float = 120.0):
    """(process, port): an HTTP server started as a child on a free loopback port (``argv(port)`` is its command
    line), once ``probe`` (a path such as /health) answers. RuntimeError naming ``what`` when it exits first or
    does not answer within ``timeout_s``."""
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(argv(port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe}", timeout=2):
                return proc, port
        except OSError:
            exited = proc.poll() is not None
            if exited or time.time() > deadline:
                stop_child_server(proc)
                why = "did not start" if exited else f"did not answer in {timeout_s:.0f} s"
                raise RuntimeError(f"{what} {why}: {(proc.stderr.read() or '').strip()[-300:]}") from None
            time.sleep(0.3)


def stop_child_server(proc, timeout_s: float = 30.0) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

