"""A model's shape from its metadata alone (a GGUF header, config.json, a Hub snapshot's cached config): layers,
widths, heads, vocabulary, whether the output layer is the embedding, and how many weights it has — what
``distillery plan`` needs to say how much memory a recipe takes before any weight is loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from toolchain.models.references import ModelRef, gguf_header, hub_repo

# Projections of a decoder layer: (name, input width, output width) as functions of the shape.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    params: int  # every weight (exact where the file lists its tensors, else from the shape)
    exact: bool = False

    def projection(self, name: str) -> tuple[int, int]:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}[name]

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden

    @property
    def output_layer(self) -> int:
        """Weights of the output layer that are not the embedding's (0 when tied)."""
        return 0 if self.tied else self.embedding

    def lora(self, r: int, targets: list[str], layers: int | None = None) -> int:
        """LoRA weights: r × (in + out) per targeted projection per layer."""
        return (layers or self.layers) * sum(r * sum(self.projection(t)) for t in targets if t in PROJECTIONS)

    def with_layers(self, layers: int) -> Shape:
        """The shape cut to ``layers`` decoder layers (the pruned student)."""
        per_layer = (self.params - self.embedding - self.output_layer) / max(1, self.layers)
        return Shape(layers, self.hidden, self.intermediate, self.heads, self.kv_heads, self.head_dim, self.vocab,
                     self.tied, round(self.embedding + self.output_layer + per_layer * layers), self.exact)

    def with_width(self, intermediate: int | None, kv_heads: int | None, hidden: int | None = None) -> Shape:
        """The shape width-pruned (student.intermediate_size, student.kv_heads, student.hidden_size): each layer
        loses the MLP channels' three rows or columns and whole key/value groups with their query heads; a narrower
        hidden size takes a column or row of every projection, norm and the embedding (biases are not counted)."""
        inter = intermediate or self.intermediate
        kv = kv_heads or self.kv_heads
        heads = kv * (self.heads // self.kv_heads)
        cut = 3 * self.hidden * (self.intermediate - inter) + 2 * self.hidden * self.head_dim * (
            (self.heads - heads) + (self.kv_heads - kv))
        out = replace(self, intermediate=inter, heads=heads, kv_heads=kv, params=self.params - self.layers * cut)
        if hidden is None or hidden >= self.hidden:
            return out
        q, k = heads * self.head_dim, kv * self.head_dim
        per_channel = self.layers * (2 * q + 2 * k + 3 * inter + 2) + self.vocab * (1 if self.tied else 2) + 1
        return replace(out, hidden=hidden, params=out.params - (self.hidden - hidden) * per_channel)

    def with_vocab(self, vocab: int) -> Shape:
        """The shape with a trimmed vocabulary (student.vocab): embedding and output layer lose the other rows."""
        cut = (self.vocab - vocab) * self.hidden * (1 if self.tied else 2)
        return replace(self, vocab=vocab, params=self.params - cut)


def from_config(cfg: dict) -> Shape:
    """A transformers config (the text part of a multimodal one)."""
    cfg = cfg.get("text_config", cfg)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    layers, inter, vocab = cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    tied = bool(cfg.get("tie_word_embeddings", True))
    per_layer = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter + 2 * hidden
    if cfg.get("attention_bias") or cfg.get("model_type") in ("qwen2",):
        per_layer += heads * head_dim + 2 * kv * head_dim
    params = vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden
    return Shape(layers, hidden, inter, heads, kv, head_dim, vocab, tied, params)


def from_gguf(path: Path) -> Shape:
    """The GGUF header's shape; the weight count summed from its tensor list (no tensor data read)."""
    header = gguf_header(path)
    key = header.arch
    vocab = header.vocab_size or 0
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    kv = int(key("attention.head_count_kv", heads))
    head_dim = int(key("attention.key_length", hidden // heads))
    names = {name for name, _ in header.tensors}
    params = sum(n for _, n in header.tensors)
    return Shape(int(key("block_count")), hidden, int(key("feed_forward_length")), heads, kv, head_dim, int(vocab),
                 "output.weight" not in names, params, exact=True)


def _safetensors_params(folder: Path) -> int | None:
    """Weights counted from the safetensors headers (the first 8 bytes give the header's length)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                total += count
    return total


def _cached_hub_config(ref: str) -> Path | None:
    """config.json of an ``hf:`` reference if the Hugging Face cache holds it (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    repo = hub_repo(ref)
    revision = ref.split("@", 1)[1] if "@" in ref else None
    found = try_to_load_from_cache(repo, "config.json", revision=revision) if repo else None
    return Path(found) if isinstance(found, str) else None


def shape_of(ref: ModelRef | str) -> Shape | None:
    """The shape of a model reference (resolved local model, or an ``hf:`` string whose config is cached); None
    when nothing local says it (an endpoint, an uncached Hub model)."""
    if isinstance(ref, str):
        found = _cached_hub_config(ref) if ref.startswith("hf:") else None
        return from_config(json.loads(found.read_text(encoding="utf-8"))) if found else None
    if ref.kind == "gguf":
        return from_gguf(ref.path)
    if ref.kind == "hf_dir":
        shape = from_config(json.loads((ref.path / "config.json").read_text(encoding="utf-8")))
        counted = _safetensors_params(ref.path)
        if counted:
            shape = replace(shape, params=counted, exact=True)
        return shape
    return None
