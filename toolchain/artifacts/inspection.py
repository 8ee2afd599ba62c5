"""Any model file distillery writes, opened with its own checks and described: what ``distillery inspect FILE``
prints and what ``serve --file`` checks before loading; and what a file carries besides its weights (metadata,
cards, configs), scanned for local paths and endpoint URLs before anything leaves the machine."""

from __future__ import annotations

import ipaddress
import json
import re
import struct
from pathlib import Path
from urllib.parse import urlsplit

from toolchain.artifacts.files import ExportError, check_safetensors
from toolchain.artifacts.gguf_io import describe, open_reader
from toolchain.artifacts.onnx_io import check

TEXT_SUFFIXES = {".json", ".jinja", ".md", ".txt", ".yaml", ".yml", ".Modelfile", ".model"}
# Tokenizer tables are learned subwords, not anything the run wrote: not scanned (and they are most of the bytes).
_GGUF_SKIP = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s)`'\"<>]+", re.IGNORECASE)
_LOCAL_PATH = re.compile(r"(?<![\w.:/])/(?:home|root|tmp|Users|var|work|mnt|opt|srv|data|scratch)/[^\s)`'\"]*")


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


def metadata_strings(path: Path) -> list[str]:
    """The text a file carries besides its weights: every string in a GGUF's metadata (tokenizer tables aside),
    an ONNX model's producer, doc strings and metadata_props (external data left unread), a safetensors header's
    ``__metadata__``, and the whole of a text file (cards, configs, templates, Modelfiles)."""
    path = Path(path)
    if path.suffix == ".gguf":
        reader = open_reader(path)
        out = []
        for key, field in reader.fields.items():
            if key.startswith(_GGUF_SKIP):
                continue
            value = field.contents()
            out += [key, *(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str))]
        return out
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        out = [model.producer_name, model.producer_version, model.doc_string, model.graph.doc_string,
               *(f"{p.key}={p.value}" for p in model.metadata_props)]
        out += [n.doc_string for n in model.graph.node if n.doc_string]
        return [s for s in out if s]
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        return [f"{k}={v}" for k, v in (header.get("__metadata__") or {}).items()]
    if path.name == "tokenizer.json":  # its vocabulary and merges are learned subwords; the rest is scanned
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data.get("model"), dict):
            data["model"] = {k: v for k, v in data["model"].items() if k not in ("vocab", "merges")}
        return [json.dumps(data, ensure_ascii=False)]
    if path.suffix in TEXT_SUFFIXES or path.name in ("Modelfile", "LICENSE", "NOTICE"):
        return [path.read_text(encoding="utf-8", errors="replace")]
    return []


def _private_url(url: str) -> bool:
    """A URL that points into someone's own network or carries credentials: localhost, an IP address in a
    private, loopback or link-local range, a single-label or .local/.internal host, or user:password@."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        return True
    if parts.username or parts.password:
        return True
    if not host:
        return parts.scheme not in ("http", "https")  # file:///…
    try:
        ip = ipaddress.ip_address(host)
        return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_unspecified
    except ValueError:
        return "." not in host or host.endswith((".local", ".internal", ".lan", ".localdomain", ".corp"))


def leaks(text: str, roots: list[Path], named: list[str] = ()) -> list[str]:
    """What in ``text`` should not leave the machine: any of ``roots`` (project, runs, home, temp folders), an
    absolute path under a usual home or work folder, a URL into a private network or with credentials, and any
    of ``named`` (the endpoint URLs a recipe uses)."""
    found = [str(r) for r in roots if str(r) not in ("", "/") and str(r) in text]
    found += _LOCAL_PATH.findall(text)
    found += [u for u in _URL.findall(text) if _private_url(u)]
    found += [n for n in named if n and n in text]
    return sorted(set(found))


def scan_for_leaks(folder: Path, roots: list[Path], named: list[str] = ()) -> list[str]:
    """``file: what`` for every file under ``folder`` whose metadata or text would leak (see :func:`leaks`)."""
    hits = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            for text in metadata_strings(path):
                hits += [f"{path.relative_to(folder)}: {hit}" for hit in leaks(text, roots, named)]
    return hits
