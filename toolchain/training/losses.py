"""Distillation losses on log-probabilities, full-vocabulary or over a teacher's top-k cache.

All divergences take log-probabilities over the same support (last dimension) and return the mean over
rows (token positions). Temperature is applied by the caller through ``log_probs`` and the loss is scaled by
T² (Hinton et al. 2015) so its gradients keep their size as T changes.

Generalized JSD follows the GKD convention (Agarwal et al. 2024, as in TRL): with the mixture
m = β·p_teacher + (1-β)·p_student, JSD(β) = β·KL(p_teacher‖m) + (1-β)·KL(p_student‖m); β=0 is taken as forward
KL(p_teacher‖p_student) and β=1 as reverse KL(p_student‖p_teacher), the limits the objective interpolates.

Total variation, ½·Σ|p_teacher - p_student|, is the divergence of speculative decoding: a draft q proposing for a
target p has its token accepted with probability 1 - TV(p, q) (Leviathan et al. 2023), so DistillSpec (Zhou et al.
2024) trains drafts on it.

Top-k: the teacher's distribution is known on k token ids; everything else is one "tail" bucket with mass
1 - Σ top-k. The student's distribution is folded the same way (its mass on those ids, and the rest), so
both are proper distributions on k+1 outcomes and the same divergences apply. With k = vocabulary size the
tail is empty and the result equals the full-vocabulary loss exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for 16-bit tensors; float32 and float64 stay as they are (float64 is the tests' reference)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.log_softmax(upcast(logits) / temperature, dim=-1)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Σ p (log p - log q) per row; terms with p = 0 are 0 (also when q = 0 there)."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return terms.sum(-1)


def forward_kl(student_log: torch.Tensor, teacher_log: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student): mode-covering, the classic Hinton distillation loss."""
    return _kl(teacher_log, student_log).mean()


def reverse_kl(student_log: torch.Tensor, teacher_log: torch.Tensor) -> torch.Tensor:
    """KL(student ‖ teacher): mode-seeking; the student may ignore teacher modes it cannot fit."""
    return _kl(student_log, teacher_log).mean()


def jsd(student_log: torch.Tensor, teacher_log: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    if beta <= 0.0:
        return forward_kl(student_log, teacher_log)
    if beta >= 1.0:
        return reverse_kl(student_log, teacher_log)
    mix = torch.logsumexp(
        torch.stack([teacher_log + math.log(beta), student_log + math.log(1 - beta)]), dim=0
    )
    return (beta * _kl(teacher_log, mix) + (1 - beta) * _kl(student_log, mix)).mean()


def total_variation(student_log: torch.Tensor, teacher_log: torch.Tensor) -> torch.Tensor:
    """½·Σ|p_teacher - p_student|: one minus the chance a speculative step accepts the draft's token."""
    return 0.5 * (teacher_log.exp() - student_log.exp()).abs().sum(-1).mean()


def divergence(kind: str, student_log: torch.Tensor, teacher_log: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    if kind == "forward_kl":
        return forward_kl(student_log, teacher_log)
    if kind == "reverse_kl":
        return reverse_kl(student_log, teacher_log)
    if kind == "jsd":
        return jsd(student_log, teacher_log, beta)
    if kind == "total_variation":
        return total_variation(student_log, teacher_log)
    raise ValueError(f"unknown divergence '{kind}'")


def sampled_reverse_kl(student_log: torch.Tensor, teacher_log: torch.Tensor, tokens: torch.Tensor,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse KL from the tokens the student sampled (on-policy distillation as in tinker-cookbook / Qwen3).

    For x ~ p_student, log p_s(x) - log p_t(x) is an unbiased estimate of KL(p_s‖p_t) at that position, and
    E[(log p_s(x) - log p_t(x))·∇log p_s(x)] is its exact gradient (E[∇log p_s] = 0). So the per-token advantage
    is log p_t(x) - log p_s(x) (detached) and the surrogate to minimise is -advantage·log p_s(x). Only the sampled
    token's two log-probs are needed. Returns (surrogate, estimate), both means over positions.
    """
    s = student_log.gather(-1, tokens[:, None])[:, 0]
    t = teacher_log.gather(-1, tokens[:, None])[:, 0]
    gap = (s - t).detach()
    return (gap * s).mean(), gap.mean()


TAIL_FLOOR = math.log(1e-12)


def _log1mexp(lse: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(lse)) for lse <= 0, stable near 0, floored at log(1e-12).

    The floor matters when k covers (nearly) the whole vocabulary: rounding leaves "tail" masses of ±1e-7 that
    are zero for one side and not the other, and reverse KL would then be infinite over nothing.
    """
    lse = lse.clamp(max=-1e-12)
    out = torch.where(lse > -0.693, torch.log(-torch.expm1(lse)), torch.log1p(-torch.exp(lse)))
    return out.clamp(min=TAIL_FLOOR)


MASKED = -1e4  # the log-prob of a top-k slot the student's vocabulary lacks: exp() is exactly 0 in float32


def fold_topk(full_log: torch.Tensor, ids: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """A full distribution (log-probs [N, V]) folded onto k ids + one tail bucket: [N, k+1]. Slots where
    ``kept`` is False carry no mass (a teacher token missing from a trimmed student vocabulary)."""
    picked = full_log.gather(-1, ids)
    if kept is not None:
        picked = picked.masked_fill(~kept, MASKED)
    tail = _log1mexp(torch.logsumexp(picked, dim=-1, keepdim=True))
    return torch.cat([picked, tail], dim=-1)


def with_tail(topk_log: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher top-k log-probs [N, k] plus the tail bucket holding the rest of the mass: [N, k+1].

    With ``kept`` (a trimmed student vocabulary) the slots of tokens the student lacks are dropped and the rest
    renormalised: the teacher conditioned on what the student can write (the tail is taken as writable)."""
    topk_log = upcast(topk_log)
    tail = _log1mexp(torch.logsumexp(topk_log, dim=-1, keepdim=True))
    if kept is not None:
        topk_log = topk_log.masked_fill(~kept, MASKED)
    out = torch.cat([topk_log, tail], dim=-1)
    # Cached log-probs are float16: renormalise so rounding cannot leave a total above one.
    return out - torch.logsumexp(out, dim=-1, keepdim=True)


def kd_loss(kind: str, student_logits: torch.Tensor, *, temperature: float = 1.0, beta: float = 0.5,
            teacher_logits: torch.Tensor | None = None, teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
            ) -> torch.Tensor:
    """T²-scaled divergence between student and teacher at the same positions.

    Give the teacher either as full logits [N, V] (online) or as (ids [N, k], log-probs at temperature T [N, k])
    from the top-k cache, optionally with a third [N, k] mask of the slots the student's vocabulary has.
    """
    s_log = log_probs(student_logits, temperature)
    if teacher_logits is not None:
        loss = divergence(kind, s_log, log_probs(teacher_logits, temperature), beta)
    elif teacher_topk is not None:
        ids, t_topk, *kept = teacher_topk
        kept = kept[0] if kept else None
        loss = divergence(kind, fold_topk(s_log, ids.long(), kept), with_tail(t_topk, kept), beta)
    else:
        raise ValueError("kd_loss needs teacher_logits or teacher_topk")
    return loss * temperature**2


class _ChunkedHeadLoss(torch.autograd.Function):
    """Sums of a loss over rows of hidden states, projected to the vocabulary one chunk of rows at a time.

    Forward runs, per chunk, the projection and ``fn`` under autograd and takes the gradients of the chunk's loss
    with respect to its hidden states and the output matrix right away; only those gradients (the size of the
    inputs) are kept, never a [rows, vocabulary] tensor beyond one chunk. Backward scales them by the incoming
    gradient. The result equals the unchunked loss and its gradients up to summation order (Liger-Kernel's fused
    linear losses do the same with hand-written gradients; here any ``fn`` works)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, fn, chunk):
        n = hidden.shape[0]
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        total = None
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            with torch.enable_grad():
                h = hidden[a:b].detach().requires_grad_(need_h)
                w = weight.detach().requires_grad_(need_w)
                bb = None if bias is None else bias.detach().requires_grad_(need_b)
                out = fn(torch.nn.functional.linear(h, w, bb), a, b)
                wanted = [x for x, need in ((h, need_h), (w, need_w), (bb, need_b)) if need]
                grads = list(torch.autograd.grad(out[0], wanted)) if wanted and out.requires_grad else []
            if grads and need_h:
                grad_h[a:b] = grads.pop(0)
            if grads and need_w:
                grad_w += grads.pop(0)
            if grads and need_b:
                grad_b += grads.pop(0)
            total = out.detach() if total is None else total + out.detach()
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b)))
        ctx.needs = (need_h, need_w, need_b)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        scale = grad_out[0]
        grads = [g * scale.to(g.dtype) if need else None for g, need in zip(ctx.saved_tensors, ctx.needs)]
        return grads[0], grads[1], grads[2], None, None


def auto_chunk(vocab: int, budget_elements: int = 1 << 25) -> int:
    """Positions per chunk so one chunk's float32 logits stay near 128 MB (2^25 values): 682 positions at a
    49,152-token vocabulary, 220 at Qwen2.5's 151,936."""
    return max(16, budget_elements // max(1, vocab))


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fn, chunk: int | None,
              ) -> torch.Tensor:
    """``fn(logits, a, b)`` -> a 1-d tensor of sums over rows a..b (its first entry the loss to differentiate) for
    the projection of ``hidden`` [N, H] by the output layer, summed over the rows. With ``chunk`` (positions) below N
    the projection runs a chunk at a time (``_ChunkedHeadLoss``); otherwise in one piece, as a plain graph."""
    n = hidden.shape[0]
    if not chunk or chunk >= n:
        return fn(torch.nn.functional.linear(hidden, weight, bias), 0, n)
    return _ChunkedHeadLoss.apply(hidden, weight, bias, fn, int(chunk))


# How a labelled student position is compared with a teacher of another tokenizer (training/cross_vocab.py).
NONE, MAPPED, SORTED = 0, 1, 2


def aligned_loss(soft, s_logits: torch.Tensor, t_logits: torch.Tensor, kinds: torch.Tensor,
                 t_shared: torch.Tensor, s_shared: torch.Tensor) -> torch.Tensor:
    """Summed over rows: the recipe's divergence (T²-scaled) on the shared tokens at MAPPED rows, plus
    ``soft.uld_weight`` × the sorted-probability distance at SORTED rows."""
    total = s_logits.new_zeros((), dtype=torch.float32)
    mapped, ranked = kinds == MAPPED, kinds == SORTED
    if mapped.any():
        s_log = log_probs(s_logits[mapped], soft.temperature)
        t_log = log_probs(t_logits[mapped], soft.temperature)
        s_fold = fold_topk(s_log, s_shared.expand(len(s_log), -1))
        t_fold = fold_topk(t_log, t_shared.expand(len(t_log), -1))
        total = total + divergence(soft.loss, s_fold, t_fold, soft.beta) * soft.temperature ** 2 * int(mapped.sum())
    weight = 1.0 if soft.uld_weight is None else soft.uld_weight
    if ranked.any() and weight > 0:
        k = min(soft.top_k, s_logits.shape[-1], t_logits.shape[-1])
        s_top = log_probs(s_logits[ranked], soft.temperature).exp().topk(k, dim=-1).values
        t_top = log_probs(t_logits[ranked], soft.temperature).exp().topk(k, dim=-1).values
        total = total + weight * (s_top - t_top).abs().sum()
    return total
