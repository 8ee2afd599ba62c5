"""GGUF files: llama.cpp's own converter, the teacher's tokenizer written into the student, quantization, checks.

The converter (``convert_hf_to_gguf.py`` + ``conversion/`` + ``gguf-py/``) comes from the source distribution of
exactly the installed llama-cpp-python, fetched once through pip and cached: the converter and the runtime that
loads its output are one llama.cpp version.

A student whose tokenizer came from a GGUF (the embedded teacher) is converted without the converter's vocab
step, and the source GGUF's ``tokenizer.*`` metadata is written in afterwards. The tokenizer transformers builds
from a GGUF looks like SentencePiece to the converter, which then writes a vocab with the wrong eos that crashes
llama.cpp; copying the original metadata keeps the teacher's real BPE vocab, pre-tokenizer and special tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from toolchain.artifacts.files import ExportError, run_tool
from toolchain.models.references import ModelError, cache_root, gguf_header

GGUF_MAGIC = b"GGUF"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")

# Quant presets → llama.cpp file types (names as in llama-quantize).
FTYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q6_k": "MOSTLY_Q6_K",
          "q5_k_m": "MOSTLY_Q5_K_M", "q5_0": "MOSTLY_Q5_0", "q4_k_m": "MOSTLY_Q4_K_M", "q4_1": "MOSTLY_Q4_1",
          "q4_0": "MOSTLY_Q4_0", "iq4_nl": "MOSTLY_IQ4_NL"}
FLOAT_QUANTS = ("f32", "f16", "bf16")
# Types an importance matrix changes (llama.cpp weights each column's rounding error by it); q8_0 and floats
# are stored as they are.
IMATRIX_QUANTS = tuple(q for q in FTYPES if q not in FLOAT_QUANTS + ("q8_0",))
# export.imatrix's two, and the speculative-decoding measurement of `distillery draft` (backends/speculative.py)
TOOLS = ("llama-imatrix", "llama-quantize", "llama-speculative-simple")
# The Makefile's LLAMA_CMAKE_ARGS (it exports its value, which wins): a portable x86-64-v3 build, as the wheel.
PORTABLE_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
                       "-DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX_VNNI=OFF")


def _fetch_sdist(dest: Path) -> Path:
    """The source distribution of exactly the installed llama-cpp-python (llama.cpp under vendor/), via pip."""
    version = importlib.metadata.version("llama_cpp_python")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={version}", "-d", str(dest)]
    done = run_tool(cmd, f"pip download of llama-cpp-python=={version}'s source", 900)
    sdists = list(dest.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not sdists:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no sdist"]
        raise ExportError(f"could not fetch llama.cpp's source (llama-cpp-python=={version} sdist): {last[0]}")
    return sdists[0]


def converter_dir() -> Path:
    """The llama.cpp converter matching the installed llama-cpp-python, fetched from its sdist once."""
    version = importlib.metadata.version("llama_cpp_python")
    target = cache_root() / f"llama.cpp-converter-{version}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staged = Path(tmp) / "converter"
        _extract_converter(_fetch_sdist(Path(tmp)), staged)
        staged.rename(target)
    return target


def convertible() -> set[str]:
    """The Hugging Face architectures (``config.json`` ``architectures``) the pinned llama.cpp's converter converts to
    a text model: its ``TEXT_MODEL_MAP``, read from the source without importing it."""
    import ast

    source = (converter_dir() / "conversion" / "__init__.py").read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and isinstance(node.value, ast.Dict):
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    raise ExportError(f"{converter_dir()}: no TEXT_MODEL_MAP in llama.cpp's converter (a layout this distillery "
                      "does not know)")


def tools_dir(announce=None) -> Path:
    """llama.cpp's ``TOOLS`` (``llama-imatrix``, ``llama-quantize``, ``llama-speculative-simple``), built once (about
    4 minutes on 2 cores) from the same sdist as the runtime and the converter, with the wheel's portable CPU flags,
    and cached per version and flags. ``announce`` (a callable) hears one line before a build starts."""
    version = importlib.metadata.version("llama_cpp_python")
    flags = os.environ.get("LLAMA_CMAKE_ARGS") or PORTABLE_CMAKE_ARGS
    tag = hashlib.sha256(flags.encode()).hexdigest()[:8]
    target = cache_root() / f"llama.cpp-tools-{version}-{tag}"
    if all((target / t).is_file() for t in TOOLS):
        return target
    cmake = shutil.which("cmake")
    if cmake is None or shutil.which("c++") is None:
        raise ExportError("export.imatrix and distillery draft need cmake and a C++ compiler to build llama.cpp's "
                          "tools (apt-get install cmake g++, or pip install cmake)")
    if announce:
        announce(f"building llama.cpp's {', '.join(TOOLS)} {version} (once; cached in {target})")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        src, build = tmp_path / "src", tmp_path / "build"
        _extract_llama_cpp(_fetch_sdist(tmp_path), src)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        configure = [cmake, "-S", str(src), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
                     "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                     "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_SERVER=OFF", *flags.split()]
        compile_ = [cmake, "--build", str(build), "--target", *TOOLS, "-j", str(os.cpu_count() or 1)]
        for cmd, what, limit in ((configure, "cmake configure of llama.cpp's tools", 900),
                                 (compile_, "the build of llama.cpp's tools", 3600)):
            done = run_tool(cmd, what, limit)
            if done.returncode != 0:
                errors = [ln for ln in (done.stdout + done.stderr).splitlines() if "error" in ln.lower()]
                raise ExportError(f"building llama.cpp's tools failed: {(errors or ['(no error line)'])[0].strip()}")
        staged = tmp_path / "tools"
        staged.mkdir()
        for t in TOOLS:
            shutil.copy2(build / "bin" / t, staged / t)
        shutil.rmtree(target, ignore_errors=True)
        staged.rename(target)
    return target


def _extract_llama_cpp(sdist: Path, dest: Path, only: tuple[str, ...] | None = None) -> None:
    """The sdist's vendor/llama.cpp/ (or only its top-level entries named in ``only``) into ``dest``: plain files
    and folders, and only paths that stay inside ``dest``."""
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp") or (only and parts[3] not in only):
                continue
            if not (m.isfile() or m.isdir()) or ".." in parts:
                continue
            m.name = str(Path(*parts[3:]))
            members.append(m)
        tar.extractall(dest, members=members, filter="data")


def _extract_converter(sdist: Path, dest: Path) -> None:
    """Only the converter's files."""
    _extract_llama_cpp(sdist, dest, CONVERTER_PARTS)
    if not (dest / "convert_hf_to_gguf.py").is_file():
        raise ExportError(f"{sdist.name}: no vendor/llama.cpp/convert_hf_to_gguf.py inside")


# Runs the converter in a child process. With --no-vocab the model class's vocab step is skipped (the
# tokenizer metadata is copied from the source GGUF afterwards). The converter's own gguf-py goes first on
# the path, as when the script runs by itself.
_DRIVER = """
import runpy, sys
conv, no_vocab, *args = sys.argv[1:]
sys.path[:0] = [conv, conv + "/gguf-py"]
import conversion
if no_vocab == "1":
    find = conversion.get_model_class
    def get_model_class(*a, **k):
        cls = find(*a, **k)
        cls.set_vocab = lambda self: None
        return cls
    conversion.get_model_class = get_model_class
sys.argv = [conv + "/convert_hf_to_gguf.py", *args]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(model_dir: Path, out: Path, outtype: str = "f32", keep_vocab: bool = True) -> None:
    """HF directory → GGUF with llama.cpp's converter (outtype f32/f16/bf16/q8_0)."""
    conv = converter_dir()
    cmd = [sys.executable, "-c", _DRIVER, str(conv), "0" if keep_vocab else "1",
           str(model_dir), "--outtype", outtype, "--outfile", str(out)]
    done = run_tool(cmd, f"llama.cpp's converter on {model_dir}", 3600,
                    env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0 or not out.is_file():
        tail = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()][-1:] or ["no output"]
        raise ExportError(f"{model_dir}: llama.cpp converter failed: {tail[0]}")


def build_float(model_dir: Path, out: Path, tokenizer_gguf: Path | None, metadata: dict) -> Path:
    """HF directory → float32 GGUF at ``out`` (written whole, then renamed) carrying ``metadata``. With
    ``tokenizer_gguf``, the converter skips its vocab step and that GGUF's tokenizer metadata is written in
    instead."""
    raw = out.with_name(out.name + ".converted")
    convert(model_dir, raw, "f32", keep_vocab=tokenizer_gguf is None)
    metadata = {**head_size(model_dir, raw), **metadata}
    tmp = out.with_name(out.name + ".tmp")
    if tokenizer_gguf is not None:
        transplant_tokenizer(tokenizer_gguf, raw, tmp, metadata, vocab_of=model_dir)
    else:
        transplant_tokenizer(raw, raw, tmp, metadata)  # its own tokenizer; the metadata written in
    raw.unlink()
    os.replace(tmp, out)
    return out


def head_size(model_dir: Path, converted: Path) -> dict:
    """The attention head size for a GGUF whose converter did not write it: llama.cpp takes embedding / heads
    unless the file says otherwise, and some converters (Qwen2's) never write it, so a width-pruned student (fewer
    heads of the same size) would not load. Empty when the file has it or the config's head size is the default."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    size, heads, hidden = config.get("head_dim"), config.get("num_attention_heads"), config.get("hidden_size")
    if not size or not heads or not hidden or size * heads == hidden:
        return {}
    fields = open_reader(converted).fields
    arch = fields[gguf.Keys.General.ARCHITECTURE].contents()
    keys = (f"{arch}.attention.key_length", f"{arch}.attention.value_length")
    return {k: int(size) for k in keys if k not in fields}


def file_type(path: Path) -> str | None:
    """The preset name (f16, q8_0, q4_1, ...) a GGUF says it was written as, if it is one we know."""
    if not Path(path).is_file():
        raise ExportError(f"{path}: no such GGUF file")
    try:
        number = gguf_header(path).meta.get("general.file_type")
    except ModelError as err:
        raise ExportError(str(err)) from None
    if number is None:
        return None
    import llama_cpp

    return next((q for q, name in FTYPES.items() if getattr(llama_cpp, f"LLAMA_FTYPE_{name}") == number), None)


def open_reader(path: Path):
    """GGUFReader on a file that has been checked to be a whole GGUF; ExportError naming the file otherwise."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such GGUF file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ExportError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on short or garbled files
        raise ExportError(
            f"{path}: corrupt or truncated GGUF (its header does not parse: {type(e).__name__})"
        ) from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ExportError(f"{path}: truncated GGUF (tensor {t.name} ends past the end of the file)")
    return reader


def _kept_ids(source_tokens: list[str], model_dir: Path | None) -> list[int] | None:
    """For a student with a trimmed vocabulary (toolchain.models.vocab): the source GGUF's id of each of its tokens, in
    the student's order. None when the student has the source's whole vocabulary."""
    if model_dir is None or not (Path(model_dir) / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    n = tk.get_vocab_size(with_added_tokens=True)
    if n == len(source_tokens):
        return None
    index = {t: i for i, t in enumerate(source_tokens)}
    missing = [tk.id_to_token(i) for i in range(n) if tk.id_to_token(i) not in index]
    if missing:
        raise ExportError(f"{model_dir}: token {missing[0]!r} is not in the source GGUF's vocabulary")
    return [index[tk.id_to_token(i)] for i in range(n)]


def _subset_tokenizer_field(name: str, value, kept: list[int], kept_tokens: set[str]):
    """One tokenizer.* value restricted to the kept token ids (renumbered in kept order); merges whose parts
    and result are all kept. None: a special token id the trimmed vocabulary does not have."""
    if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        return [value[i] for i in kept]
    if name == "tokenizer.ggml.merges":
        pairs = [(m, *m.split(" ", 1)) for m in value]
        return [m for m, a, b in pairs if a in kept_tokens and b in kept_tokens and a + b in kept_tokens]
    if name.endswith("_token_id"):
        return kept.index(int(value)) if int(value) in kept else None
    return value


def transplant_tokenizer(source_gguf: Path, converted: Path, out: Path, metadata: dict,
                         vocab_of: Path | None = None) -> None:
    """Copy ``converted`` to ``out`` with every ``tokenizer.*`` key taken from ``source_gguf`` instead, plus
    ``metadata`` (general.name, general.license, the chat template, ...: strings, ints, string lists), which
    replaces the keys of those names (and, when it names base models, every general.base_model.* key).
    Tensors are copied byte for byte. When the model directory ``vocab_of`` holds a trimmed vocabulary, the
    source's token tables are cut to its tokens and its merges to those whose parts and result are kept."""
    import gguf

    src, tgt = open_reader(source_gguf), open_reader(converted)
    tokens = src.fields["tokenizer.ggml.tokens"].contents() if "tokenizer.ggml.tokens" in src.fields else []
    kept = _kept_ids(tokens, vocab_of) if tokens else None
    kept_set = {tokens[i] for i in kept} if kept else None
    arch = tgt.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(out, arch=arch, endianess=tgt.endianess)

    def copy(field):
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if kept is not None and field.name.startswith("tokenizer.ggml."):
            value = _subset_tokenizer_field(field.name, value, kept, kept_set)
            if value is None:
                return
        writer.add_key_value(field.name, value, vtype, sub_type=sub)

    for field in tgt.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith(("GGUF.", "tokenizer.")):
            continue
        if field.name in metadata or (field.name.startswith("general.base_model.")
                                      and "general.base_model.count" in metadata):
            continue
        copy(field)
    for key, value in metadata.items():
        add_value(writer, key, value)
    for field in src.fields.values():
        if field.name.startswith("tokenizer.") and field.name not in metadata:
            copy(field)
    for t in tgt.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tgt.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=tgt.endianess)
    writer.close()


def add_value(writer, key: str, value) -> None:
    """One metadata value by its Python type: str, int (uint32), bool, or a list of str."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        writer.add_string(key, str(value))


def quantize(src: Path, out: Path, quant: str, threads: int | None = None, imatrix: Path | None = None) -> None:
    """llama.cpp's quantizer (the runtime's own code) from a float GGUF to ``quant`` (f32: the file as it is);
    with ``imatrix``, its ``llama-quantize`` tool weighted by that importance matrix (paths relative to the
    matrix's folder, so no local path lands in the file's metadata)."""
    import llama_cpp

    if quant == "f32":
        shutil.copyfile(src, out)
        return
    threads = threads or os.cpu_count() or 1
    if imatrix is not None and quant in IMATRIX_QUANTS:
        work = imatrix.parent
        cmd = [str(tools_dir() / "llama-quantize"), "--imatrix", imatrix.name, os.path.relpath(src, work),
               os.path.relpath(out, work), quant.upper(), str(threads)]
        done = run_tool(cmd, f"llama-quantize of {src.name} to {quant}", 3600, cwd=work)
        rc, log = done.returncode, (done.stdout + done.stderr).splitlines()
    else:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{FTYPES[quant]}")
        params.nthread = threads
        with captured_stderr() as log:  # llama.cpp prints a line per tensor (and every k-quant fallback)
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0 or not out.is_file():
        tail = [ln for ln in log if ln.strip()][-1:] or [""]
        raise ExportError(f"{src}: llama.cpp could not quantize to {quant} (return code {rc}) {tail[0]}".rstrip())


def compute_imatrix(model: Path, text: Path, out: Path, chunks: int, n_ctx: int = 512,
                    threads: int | None = None) -> dict:
    """llama.cpp's importance matrix of ``model`` over ``text`` (special tokens parsed, as the chat template
    writes them), at most ``chunks`` windows of ``n_ctx`` tokens; written whole to ``out``. Paths are passed
    relative to ``out``'s folder (llama.cpp records them in the matrix and the quantized file)."""
    work = out.parent
    tmp = out.with_name(out.stem + ".tmp.gguf")
    cmd = [str(tools_dir() / "llama-imatrix"), "-m", os.path.relpath(model, work), "-f", os.path.relpath(text, work),
           "-o", tmp.name, "--no-ppl", "--parse-special", "-c", str(n_ctx), "--chunks", str(chunks),
           "-t", str(threads or os.cpu_count() or 1), "--output-frequency", "1000000"]
    done = run_tool(cmd, f"llama-imatrix on {model.name}", 7200, cwd=work)
    if done.returncode != 0 or not tmp.is_file():
        lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
        hint = next(
            (ln for ln in reversed(lines) if "error" in ln.lower() or "need" in ln.lower()), lines[-1] if lines else ""
        )
        raise ExportError(f"{model}: llama-imatrix failed (return code {done.returncode}): {hint.strip()}")
    os.replace(tmp, out)
    r = open_reader(out)

    def value(key):
        f = r.fields.get(key)
        return f.contents() if f is not None else None

    return {"file": out.name, "chunks": value("imatrix.chunk_count"), "chunk_tokens": value("imatrix.chunk_size"),
            "entries": sum(1 for t in r.tensors if t.name.endswith(".in_sum2"))}


@contextlib.contextmanager
def captured_stderr():
    """File descriptor 2 (where C code writes) and ``sys.stderr`` (where llama-cpp-python's log callback writes,
    which is not fd 2 under a test runner or a notebook) go to a temporary file; its lines are in the yielded list
    after. The callback prints only while its logger is verbose, which any ``Llama(verbose=False)`` turns off for
    the whole process, so it is made verbose meanwhile."""
    lines: list[str] = []
    llama_log = logging.getLogger("llama-cpp-python")
    level = llama_log.level
    llama_log.setLevel(logging.DEBUG)
    with tempfile.TemporaryFile() as fh:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(fh.fileno(), 2)
        text = open(fh.fileno(), "w", encoding="utf-8", closefd=False)
        try:
            with contextlib.redirect_stderr(text):
                yield lines
        finally:
            text.flush()
            llama_log.setLevel(level)
            os.dup2(saved, 2)
            os.close(saved)
            fh.seek(0)
            lines.extend(fh.read().decode("utf-8", errors="replace").splitlines())


def describe(path: Path) -> dict:
    """What is really in a GGUF: size, parameters, bits per weight, tensor types, tokenizer identity."""
    from collections import Counter

    r = open_reader(path)
    params = sum(int(t.n_elements) for t in r.tensors)
    data_bytes = sum(int(t.n_bytes) for t in r.tensors)
    types = Counter(t.tensor_type.name for t in r.tensors)

    def value(key):
        f = r.fields.get(key)
        return f.contents() if f is not None else None

    return {
        "bytes": path.stat().st_size,
        "parameters": params,
        "bits_per_weight": round(8 * data_bytes / params, 3),
        "tensor_types": dict(sorted(types.items(), key=lambda kv: -kv[1])),
        "tensors": len(r.tensors),
        "tokenizer_model": value("tokenizer.ggml.model"),
        "tokenizer_pre": value("tokenizer.ggml.pre"),
        "eos_token_id": value("tokenizer.ggml.eos_token_id"),
        "output_tensor": any(t.name == "output.weight" for t in r.tensors),
    }


def tokenizer_fields(path: Path) -> dict:
    """Every tokenizer.* key of a GGUF, values as Python objects (for comparing two files)."""
    r = open_reader(path)
    return {f.name: f.contents() for f in r.fields.values() if f.name.startswith("tokenizer.")}
