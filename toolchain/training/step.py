"""One training step's loss: the decoder run once over a batch's shared prefix, the vocabulary projection only at
labelled positions (a chunk at a time), cross-entropy and the soft-label divergences against an online teacher
(its own shared-prefix KV cache) or the cached top-k; the step as one module for DDP/FSDP, and float32 master
weights for a low-precision student."""

from __future__ import annotations

import time

import torch

from toolchain.models.chat import IGNORE
from toolchain.training.losses import aligned_loss, head_loss, kd_loss, log_probs, sampled_reverse_kl, upcast


def decoder_hidden(decoder, batch: dict[str, torch.Tensor], shared: int = 0) -> torch.Tensor:
    """The decoder's last hidden states for a right-padded batch whose rows all start with the same ``shared``
    tokens (a chat template's system prompt and user header: 24 of SmolLM2's ~78 tokens per example).

    Those tokens are run once, for one row, and their keys and values broadcast to every row; the rest of each
    row attends to them as a KV cache. Causal attention makes the prefix's states independent of what follows,
    so this is the plain forward pass, and autograd sums the prefix's gradient over the rows as the batched
    pass would (tested equal). It saves the prefix's share of the decoder's work, forward and backward.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b = len(ids)
    if (
        shared <= 0
        or b == 1
        or ids.shape[1] <= shared
        or not torch.equal(ids[:, :shared], ids[:1, :shared].expand(b, -1))
    ):
        return decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    from transformers import DynamicCache

    # a cache given, not asked for: some families (Gemma-2) make none of their own in training mode, and a plain one
    # keeps the whole prefix (a sliding-window layer's own cache keeps its last window only)
    head = decoder(input_ids=ids[:1, :shared], use_cache=True, past_key_values=DynamicCache())
    past = head.past_key_values
    for layer in past.layers:
        layer.keys, layer.values = layer.keys.expand(b, -1, -1, -1), layer.values.expand(b, -1, -1, -1)
    rest = decoder(input_ids=ids[:, shared:], attention_mask=mask, past_key_values=past, use_cache=True)
    return torch.cat([head.last_hidden_state.expand(b, -1, -1), rest.last_hidden_state], dim=1)


def step_loss(model, batch: dict[str, torch.Tensor], soft=None, teacher=None, topk=None, shared: int = 0,
              chunk: int | None = None) -> tuple[torch.Tensor, int, dict[str, float]]:
    """Loss on response tokens only; the vocabulary projection runs only where there is a label.

    hard: cross-entropy. soft: alpha·KD + (1 - alpha)·CE, with the teacher's distribution from the top-k cache
    (``topk`` = (ids, log-probs), rows in batch order) when given, else from an online forward pass (``teacher``).
    ``soft.loss`` may also be ``sampled_reverse_kl`` (on-policy batches: the labels are the student's own samples).
    ``shared``: how many leading tokens every row has in common (``decoder_hidden``). ``chunk``: positions
    projected to the vocabulary at a time, student and online teacher alike (``losses.head_loss``; None: all).
    A teacher whose output layer has padding rows the student's lacks (or the reverse) is compared on the rows
    both have: padding rows carry no token of the shared tokenizer.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = decoder_hidden(causal_lm.get_decoder(), batch, shared)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    h, y = hidden[:, :-1][keep], targets[keep]
    n = len(y)
    t_hidden = teacher.hidden_at(batch, keep) if soft is not None and topk is None else None

    def rows(logits: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """[loss, ce, kd] summed over rows a..b (only the first carries gradients)."""
        logits = upcast(logits)
        ce = torch.nn.functional.cross_entropy(logits, y[a:b], reduction="sum")
        if soft is None:
            return torch.stack([ce, ce.detach()])
        if getattr(teacher, "aligned", False):  # across tokenizers (training/cross_vocab.py)
            kd = aligned_loss(soft, logits, teacher.project(t_hidden[a:b]), teacher.kinds[a:b], teacher.t_shared,
                              teacher.s_shared)
        elif topk is not None:
            kd = kd_loss(soft.loss, logits, temperature=soft.temperature, beta=soft.beta,
                         teacher_topk=tuple(t[a:b] for t in topk)) * (b - a)
        else:
            t_logits = teacher.project(t_hidden[a:b])
            v = min(logits.shape[-1], t_logits.shape[-1])
            s_logits, t_logits = logits[:, :v], t_logits[:, :v]
            if soft.loss == "sampled_reverse_kl":
                surrogate, estimate = sampled_reverse_kl(log_probs(s_logits), log_probs(t_logits), y[a:b])
                kd = (surrogate - surrogate.detach() + estimate) * (b - a)  # the estimate's value, the surrogate's grad
            else:
                kd = kd_loss(soft.loss, s_logits, temperature=soft.temperature, beta=soft.beta,
                             teacher_logits=t_logits) * (b - a)
        loss = soft.alpha * kd + (1 - soft.alpha) * ce
        return torch.stack([loss, ce.detach(), kd.detach()])

    head = causal_lm.get_output_embeddings()
    sums = head_loss(h, head.weight, head.bias, rows, chunk) / max(n, 1)
    logged = sums.detach()
    parts = {"ce": float(logged[1])} if soft is None else {"ce": float(logged[1]), "kd": float(logged[2])}
    return sums[0], n, parts


class FrozenTeacher:
    """A frozen teacher's output layer and the time spent in it; ``project`` turns its hidden states at scored
    positions into float32 logits on the student's device."""

    def __init__(self, model, out_device=None):
        self.model = model
        device = next(model.parameters()).device
        self.device = torch.device(out_device) if out_device is not None else device
        head = model.get_output_embeddings()
        self.head_weight, self.head_bias = head.weight, getattr(head, "bias", None)
        self.seconds = 0.0  # time spent in the teacher (the train log's teacher_s)

    @torch.no_grad()
    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (float32, on the student's device) from hidden states at scored positions."""
        started = time.perf_counter()
        out = upcast(torch.nn.functional.linear(hidden, self.head_weight, self.head_bias))
        self.seconds += time.perf_counter() - started
        return out.to(self.device)


class OnlineTeacher(FrozenTeacher):
    """The frozen teacher of online soft-label KD.

    Every training sequence starts with the same tokens (the chat template's system prompt and user header: 24
    of SmolLM2's ~75 tokens per example). The teacher runs that prefix once; each step reuses its KV cache and
    runs only the rest, then projects to the vocabulary only where there is a label.
    """

    def __init__(self, model, prefix: list[int], to_teacher: list[int] | None = None, out_device=None):
        """``to_teacher``: a trimmed student's kept token ids (student id -> teacher id). Batches then come in
        student ids, and the logits are the teacher's at the kept ids only (the projection onto those rows).
        ``out_device``: where the student trains (logits are returned there); the teacher stays on its own."""
        super().__init__(model, out_device)
        device = next(model.parameters()).device
        head = model.get_output_embeddings()
        self.to_teacher = None
        if to_teacher is not None:
            self.to_teacher = torch.tensor(to_teacher, dtype=torch.long, device=device)
            prefix = [to_teacher[i] for i in prefix]
            self.head_weight = head.weight.detach()[self.to_teacher].clone()
            self.head_bias = None if self.head_bias is None else self.head_bias.detach()[self.to_teacher].clone()
        self.prefix = torch.tensor(prefix[:-1] if prefix else [], dtype=torch.long, device=device)  # >= 1 token left
        self.cache = None
        if len(self.prefix):
            from transformers import DynamicCache

            with torch.inference_mode():  # a plain cache: the whole prefix in every layer (as decoder_hidden)
                out = model.get_decoder()(input_ids=self.prefix[None], use_cache=True, past_key_values=DynamicCache())
            self.cache = [(k.clone(), v.clone()) for k, v in out.past_key_values.to_legacy_cache()]

    def logits_at(self, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """Teacher logits (float32) at the positions ``keep`` marks, as ``step_loss`` orders them."""
        return self.project(self.hidden_at(batch, keep))

    def hidden_at(self, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """The teacher's last hidden states at the positions ``keep`` marks (``project`` turns them into logits,
        a chunk at a time in a chunked loss)."""
        started = time.perf_counter()
        try:
            return self._hidden_at(batch, keep)
        finally:
            self.seconds += time.perf_counter() - started

    @torch.no_grad()
    def _hidden_at(self, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        device = self.head_weight.device
        ids, mask, keep = batch["input_ids"].to(device), batch["attention_mask"].to(device), keep.to(device)
        if self.to_teacher is not None:
            ids = self.to_teacher[ids]
        p = len(self.prefix)
        decoder = self.model.get_decoder()
        if (
            self.cache is None
            or ids.shape[1] <= p
            or keep[:, :p].any()
            or not torch.equal(ids[:, :p], self.prefix.expand(len(ids), -1))
        ):
            return decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1][keep]
        b = len(ids)
        past = DynamicCache.from_legacy_cache(
            tuple((k.expand(b, -1, -1, -1).contiguous(), v.expand(b, -1, -1, -1).contiguous()) for k, v in self.cache)
        )
        positions = torch.arange(p, ids.shape[1], device=device).expand(b, -1)
        hidden = decoder(input_ids=ids[:, p:], attention_mask=mask, past_key_values=past, position_ids=positions,
                         use_cache=True).last_hidden_state[:, :-1]
        return hidden[keep[:, p:]]


class TrainStep(torch.nn.Module):
    """The student's loss as one module. DDP and FSDP synchronise gradients through the forward of the module
    they wrap, so the whole of ``step_loss`` (decoder, then the vocabulary projection at labelled positions
    only) runs inside it. The frozen teacher is not a submodule: it is never wrapped or synchronised."""

    def __init__(self, model, teacher=None, shared: int = 0, chunk: int | None = None):
        super().__init__()
        self.model = model
        self.shared = shared
        self.chunk = chunk
        self._teacher = [teacher]

    def forward(self, batch: dict[str, torch.Tensor], topk=None, loss=None):
        """``loss``: the soft-label settings of this step (None: plain cross-entropy, a warm-start step)."""
        return step_loss(self.model, batch, loss, self._teacher[0], topk, self.shared, self.chunk)


def response_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Hard-label loss (mean cross-entropy over response tokens)."""
    loss, n, _ = step_loss(model, batch)
    return loss, n


class MasterWeights:
    """float32 copies of low-precision trainable weights for the optimizer: AdamW steps on the copies (an update
    of lr·1e-4 survives), the model's weights are rounded from them after each step. float32 weights are their
    own masters (no copy)."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        low = (torch.float16, torch.bfloat16)
        self.masters = [p.detach().float().clone().requires_grad_(True) if p.dtype in low else p for p in params]
        self.copies = any(m is not p for m, p in zip(self.masters, params))

    def grads_in(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def weights_out(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)


def fused_adamw(params: list[torch.Tensor]) -> bool | None:
    """The fused AdamW where torch has it for these parameters (float32/16 on CPU or CUDA), else the default."""
    ok = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
             for p in params)
    return True if ok else None


def total(accelerator, values: list[float]) -> list[float]:
    """Sums over every process (the values themselves with one process)."""
    if accelerator.num_processes == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()
