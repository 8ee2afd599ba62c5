"""Width pruning: fewer MLP channels and fewer attention head groups in every layer, the ones the task's own
sequences use least removed (Minitron: Muralidharan et al. 2024, "Compact Language Models via Pruning and
Knowledge Distillation").

Importance is read from activations, no gradients: an MLP channel's is its activation entering the down
projection (``act(gate(x)) * up(x)``), a head's the norm of its output entering the output projection; each is the
mean magnitude over a sequence's tokens, then the L2 norm over sequences (Minitron's best aggregation for width).
Grouped-query attention shares one key/value head among several query heads, so heads go in whole groups: a
group's importance is the sum of its query heads', and keeping it keeps its key/value head and all its query heads
(the ratio of query to key/value heads, which the attention code assumes, does not change).

The hidden size (the residual stream's channels, shared by every layer, the embedding and the output layer) is cut
last and alike everywhere: a channel's importance is the magnitude of its normalised activation at every norm of
every layer and the final norm (Minitron's embedding-channel importance, over the norms' outputs), summed. Every
projection loses the columns it reads from those channels and the rows it writes to them; ``head_dim`` stays, so
the attention's own widths do not change (llama.cpp reads them from ``attention.key_length``).

Every layer keeps the same width (a model config holds one ``intermediate_size`` and one head count), the channels
and groups each layer keeps are its own. ``plan`` ranks them, ``apply`` slices the weights (biases included; Phi-3's
fused ``gate_up_proj`` and ``qkv_proj`` in their parts) and writes the new sizes into the config, with ``head_dim``
set explicitly so that fewer heads do not change it.
"""

from __future__ import annotations

import torch

from toolchain.models.student import decoder_layers


def _mlp(layer):
    return layer.mlp


def _attn(layer):
    return layer.self_attn


def _norms(model) -> list[torch.nn.Module]:
    """Every norm over the hidden size: each layer's (``input_layernorm``, ``post_attention_layernorm``, Gemma's
    pre/post feed-forward norms) and the final one."""
    found = [m for layer in decoder_layers(model) for name, m in layer.named_children() if name.endswith("layernorm")]
    return found + [model.get_decoder().norm]


def head_dim(model) -> int:
    c = model.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


@torch.inference_mode()
def importance(model, sequences: list[list[int]]) -> dict[str, list[torch.Tensor]]:
    """Per layer: each MLP channel's and each query head's importance over ``sequences``."""
    layers = decoder_layers(model)
    hd = head_dim(model)
    per_seq: dict[str, list[list[torch.Tensor]]] = {"mlp": [[] for _ in layers], "heads": [[] for _ in layers]}
    norms = _norms(model)
    per_seq["hidden"] = [[] for _ in norms]

    def norm_hook(i):
        def fn(module, args, out):
            per_seq["hidden"][i].append(out.float()[0].abs().mean(dim=0))
        return fn

    def hook(kind, i):
        def fn(module, args):
            x = args[0].float()[0]  # (tokens, features)
            if kind == "heads":
                x = x.reshape(x.shape[0], -1, hd).norm(dim=-1)  # (tokens, heads)
            per_seq[kind][i].append(x.abs().mean(dim=0))
        return fn

    handles = []
    for i, layer in enumerate(layers):
        handles.append(_mlp(layer).down_proj.register_forward_pre_hook(hook("mlp", i)))
        handles.append(_attn(layer).o_proj.register_forward_pre_hook(hook("heads", i)))
    for i, norm in enumerate(norms):
        handles.append(norm.register_forward_hook(norm_hook(i)))
    try:
        for seq in sequences:
            model(input_ids=torch.tensor([seq], dtype=torch.long), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {k: [torch.stack(v).norm(dim=0) for v in layers_] for k, layers_ in per_seq.items()}
    out["hidden"] = torch.stack(out["hidden"]).sum(dim=0)  # one ranking for the stream every layer shares
    return out


def plan(model, sequences: list[list[int]], intermediate_size: int | None, kv_heads: int | None,
         hidden_size: int | None = None) -> dict:
    """Per layer, ascending: the MLP channels and the key/value head groups to keep, and the hidden channels every
    layer keeps (None: that dimension is kept whole)."""
    c = model.config
    scores = importance(model, sequences)
    out: dict = {"mlp": None, "kv_heads": None}
    if hidden_size is not None and hidden_size < c.hidden_size:
        out["hidden"] = sorted(torch.topk(scores["hidden"], hidden_size).indices.tolist())
    if intermediate_size is not None and intermediate_size < c.intermediate_size:
        out["mlp"] = [sorted(torch.topk(s, intermediate_size).indices.tolist()) for s in scores["mlp"]]
    if kv_heads is not None and kv_heads < c.num_key_value_heads:
        group = c.num_attention_heads // c.num_key_value_heads
        out["kv_heads"] = [sorted(torch.topk(s.reshape(-1, group).sum(dim=1), kv_heads).indices.tolist())
                           for s in scores["heads"]]
    return out


def _rows(linear: torch.nn.Linear, idx: torch.Tensor) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data[idx].clone())
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[idx].clone())
    linear.out_features = len(idx)


def _columns(linear: torch.nn.Linear, idx: torch.Tensor) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data[:, idx].clone())
    linear.in_features = len(idx)


def _prune_mlp(mlp, keep: list[int], full: int) -> None:
    idx = torch.tensor(keep, dtype=torch.long)
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: [gate; up] in one matrix
        _rows(mlp.gate_up_proj, torch.cat([idx, idx + full]))
    else:
        _rows(mlp.gate_proj, idx)
        _rows(mlp.up_proj, idx)
    _columns(mlp.down_proj, idx)


def _prune_heads(attn, groups: list[int], n_heads: int, n_kv: int, hd: int) -> None:
    per = n_heads // n_kv
    q_heads = [g * per + j for g in groups for j in range(per)]
    q_idx = torch.tensor([h * hd + d for h in q_heads for d in range(hd)], dtype=torch.long)
    kv_idx = torch.tensor([g * hd + d for g in groups for d in range(hd)], dtype=torch.long)
    if hasattr(attn, "qkv_proj"):  # Phi-3: [q; k; v] in one matrix
        q_rows, kv_rows = n_heads * hd, n_kv * hd
        _rows(attn.qkv_proj, torch.cat([q_idx, q_rows + kv_idx, q_rows + kv_rows + kv_idx]))
    else:
        _rows(attn.q_proj, q_idx)
        _rows(attn.k_proj, kv_idx)
        _rows(attn.v_proj, kv_idx)
    _columns(attn.o_proj, q_idx)
    for name, value in (("num_heads", len(q_heads)), ("num_key_value_heads", len(groups))):
        if hasattr(attn, name):
            setattr(attn, name, value)


def _prune_hidden(model, keep: list[int]) -> None:
    idx = torch.tensor(keep, dtype=torch.long)
    for norm in _norms(model):
        norm.weight = torch.nn.Parameter(norm.weight.data[idx].clone())
        if getattr(norm, "bias", None) is not None:
            norm.bias = torch.nn.Parameter(norm.bias.data[idx].clone())
    for layer in decoder_layers(model):
        attn, mlp = _attn(layer), _mlp(layer)
        for module in (attn, mlp):  # what reads the stream (Phi-3's fused projections too)
            for name in ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj"):
                if isinstance(getattr(module, name, None), torch.nn.Linear):
                    _columns(getattr(module, name), idx)
        _rows(attn.o_proj, idx)  # what writes to it
        _rows(mlp.down_proj, idx)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    emb.weight = torch.nn.Parameter(emb.weight.data[:, idx].clone())
    emb.embedding_dim = len(keep)
    if tied:
        head.weight = emb.weight
    elif head is not None:
        _columns(head, idx)
    if hasattr(emb, "embed_scale"):  # Gemma scales its embedding by √hidden_size, from the config when it loads
        emb.embed_scale.fill_(len(keep) ** 0.5)


def apply(model, kept: dict):
    """``model`` (changed in place and returned) with only ``kept``'s channels and head groups per layer."""
    c = model.config
    hd = head_dim(model)
    n_heads, n_kv, full = c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    for i, layer in enumerate(decoder_layers(model)):
        if kept.get("mlp"):
            _prune_mlp(_mlp(layer), kept["mlp"][i], full)
        if kept.get("kv_heads"):
            _prune_heads(_attn(layer), kept["kv_heads"][i], n_heads, n_kv, hd)
    if kept.get("hidden"):
        _prune_hidden(model, kept["hidden"])
        c.hidden_size = len(kept["hidden"])
        c.head_dim = hd
    if kept.get("mlp"):
        c.intermediate_size = len(kept["mlp"][0])
    if kept.get("kv_heads"):
        c.head_dim = hd
        c.num_key_value_heads = len(kept["kv_heads"][0])
        c.num_attention_heads = c.num_key_value_heads * (n_heads // n_kv)
    return model
