"""Each distillation loss against values computed by hand on tiny tensors."""

import math

import pytest
import torch

from toolchain.training.losses import (
    fold_topk,
    forward_kl,
    jsd,
    kd_loss,
    log_probs,
    reverse_kl,
    total_variation,
    with_tail,
)

P = torch.tensor([[0.7, 0.2, 0.1]])  # teacher
Q = torch.tensor([[0.5, 0.3, 0.2]])  # student


def _hand_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_forward_and_reverse_kl_by_hand():
    fkl = _hand_kl([0.7, 0.2, 0.1], [0.5, 0.3, 0.2])
    rkl = _hand_kl([0.5, 0.3, 0.2], [0.7, 0.2, 0.1])
    assert float(forward_kl(Q.log(), P.log())) == pytest.approx(fkl, rel=1e-5)
    assert float(reverse_kl(Q.log(), P.log())) == pytest.approx(rkl, rel=1e-5)
    assert fkl != pytest.approx(rkl)


def test_jsd_by_hand_and_its_limits():
    beta = 0.3
    m = [beta * p + (1 - beta) * q for p, q in zip([0.7, 0.2, 0.1], [0.5, 0.3, 0.2])]
    hand = beta * _hand_kl([0.7, 0.2, 0.1], m) + (1 - beta) * _hand_kl([0.5, 0.3, 0.2], m)
    assert float(jsd(Q.log(), P.log(), beta)) == pytest.approx(hand, rel=1e-5)
    assert float(jsd(Q.log(), P.log(), 0.0)) == pytest.approx(float(forward_kl(Q.log(), P.log())))
    assert float(jsd(Q.log(), P.log(), 1.0)) == pytest.approx(float(reverse_kl(Q.log(), P.log())))
    assert float(jsd(P.log(), P.log(), 0.5)) == pytest.approx(0.0, abs=1e-7)
    # symmetric at beta = 0.5
    assert float(jsd(Q.log(), P.log(), 0.5)) == pytest.approx(float(jsd(P.log(), Q.log(), 0.5)), rel=1e-5)


def test_total_variation_is_one_minus_the_speculative_acceptance_rate():
    # by hand: ½(|0.7-0.5| + |0.2-0.3| + |0.1-0.2|) = 0.2
    assert float(total_variation(Q.log(), P.log())) == pytest.approx(0.2, rel=1e-6)
    assert float(total_variation(P.log(), P.log())) == pytest.approx(0.0, abs=1e-7)
    # a draft q proposes x ~ q, the target p keeps it with probability min(1, p/q): E = Σ min(p, q) = 1 - TV
    accept = sum(min(p, q) for p, q in zip([0.7, 0.2, 0.1], [0.5, 0.3, 0.2]))
    assert accept == pytest.approx(1 - float(total_variation(Q.log(), P.log())), rel=1e-6)
    # a gradient step on it raises the acceptance rate
    s = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    before = float(kd_loss("total_variation", s, teacher_logits=P.log()))
    kd_loss("total_variation", s, teacher_logits=P.log()).backward()
    with torch.no_grad():
        after = float(kd_loss("total_variation", s - 0.5 * s.grad, teacher_logits=P.log()))
    assert after < before


def test_temperature_softens_and_scales_by_t_squared():
    s = torch.tensor([[2.0, 1.0, 0.0]])
    t = torch.tensor([[3.0, 0.0, -1.0]])
    T = 2.0
    ps = torch.softmax(s / T, -1)[0].tolist()
    pt = torch.softmax(t / T, -1)[0].tolist()
    hand = _hand_kl(pt, ps) * T * T
    assert float(kd_loss("forward_kl", s, teacher_logits=t, temperature=T)) == pytest.approx(hand, rel=1e-5)
    assert log_probs(t, 4.0).exp().max() < log_probs(t, 1.0).exp().max()  # softer


def test_topk_with_full_vocab_equals_full_loss_and_tail_is_explicit():
    torch.manual_seed(0)
    s, t = torch.randn(5, 50), torch.randn(5, 50) * 2
    for kind in ("forward_kl", "reverse_kl", "jsd", "total_variation"):
        full = kd_loss(kind, s, teacher_logits=t, temperature=1.5, beta=0.4)
        t_log = log_probs(t, 1.5)
        vals, ids = t_log.topk(50, dim=-1)
        cached = kd_loss(kind, s, teacher_topk=(ids, vals), temperature=1.5, beta=0.4)
        assert float(cached) == pytest.approx(float(full), rel=1e-5, abs=1e-6)
    # k < V: the folded distributions still sum to one (the tail bucket holds the rest)
    vals, ids = log_probs(t).topk(8, dim=-1)
    assert torch.allclose(with_tail(vals).exp().sum(-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(fold_topk(log_probs(s), ids).exp().sum(-1), torch.ones(5), atol=1e-5)


def test_gradients_flow_to_the_student_only_where_defined():
    s = torch.randn(3, 20, requires_grad=True)
    t = torch.randn(3, 20)
    vals, ids = log_probs(t).topk(4, dim=-1)
    loss = kd_loss("jsd", s, teacher_topk=(ids, vals.half()), beta=0.5)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
