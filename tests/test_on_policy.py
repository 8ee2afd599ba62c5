"""On-policy distillation: the step schedule, rollouts, the sampled reverse-KL estimator, and whole distill runs on a
tiny random model that uses the embedded teacher's tokenizer."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from toolchain.models.chat import IGNORE
from toolchain.training.losses import log_probs, reverse_kl, sampled_reverse_kl
from toolchain.recipe import RecipeError, parse
from toolchain.stages import distill
from toolchain.training.step import OnlineTeacher, TrainStep
from toolchain.training import batches, on_policy
from toolchain.training.batches import collate
from toolchain.training.on_policy import is_on_policy, rollout

from tests.conftest import tiny_generate_dir as _generate_dir, tiny_recipe, tiny_train

EXAMPLES = [([1, 5, 9, 13, 2, 7, 7, 3], [IGNORE] * 4 + [2, 7, 7, 3]),
            ([1, 5, 9, 16, 32, 1], [IGNORE] * 3 + [16, 32, 1])]


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.3, 1.0])
def test_on_policy_steps_are_the_fraction_spread_evenly(fraction):
    steps = [is_on_policy(s, fraction) for s in range(200)]
    assert sum(steps) == round(200 * fraction)
    on = [i for i, x in enumerate(steps) if x]
    assert max(b - a for a, b in zip(on, on[1:])) <= int(1 / fraction) + 1  # no long off-policy stretches
    assert not any(is_on_policy(s, 0.0) for s in range(200))


def test_sampled_reverse_kl_estimates_the_exact_reverse_kl_and_its_gradient():
    """Monte Carlo over a 6-token vocabulary: the mean of log p_s(x) - log p_t(x), x ~ p_s, is KL(p_s‖p_t), and the
    surrogate's mean gradient is the exact gradient. 200,000 samples: the standard error of the estimate here is
    ~0.002, so the stated tolerance is 0.01 (5 standard errors) on the value and 0.02 on each gradient entry."""
    gen = torch.Generator().manual_seed(0)
    s_logits = torch.randn(1, 6, generator=gen).requires_grad_(True)
    t_logits = torch.randn(1, 6, generator=gen)
    exact = reverse_kl(log_probs(s_logits), log_probs(t_logits))
    (exact_grad,) = torch.autograd.grad(exact, s_logits)

    n = 200_000
    tokens = torch.multinomial(torch.softmax(s_logits.detach(), -1)[0], n, replacement=True, generator=gen)
    surrogate, estimate = sampled_reverse_kl(log_probs(s_logits.expand(n, -1)), log_probs(t_logits.expand(n, -1)),
                                             tokens)
    (grad,) = torch.autograd.grad(surrogate, s_logits)
    assert float(estimate) == pytest.approx(float(exact.detach()), abs=0.01)
    assert torch.allclose(grad, exact_grad, atol=0.02), (grad, exact_grad)
    assert float(exact.detach()) > 0.1  # a real gap, not two equal distributions


def test_rollouts_are_a_function_of_the_seed_and_end_at_eos(tiny_llama):
    prompts = [[1, 5, 9], [1, 5, 9, 13, 2]]
    a = rollout(tiny_llama, prompts, max_new_tokens=12, temperature=1.0, eos_id=3, pad_id=0, seed=7)
    b = rollout(tiny_llama, prompts, max_new_tokens=12, temperature=1.0, eos_id=3, pad_id=0, seed=7)
    c = rollout(tiny_llama, prompts, max_new_tokens=12, temperature=1.0, eos_id=3, pad_id=0, seed=8)
    assert a == b and a != c
    assert all(len(x) <= 12 and (len(x) == 12 or x[-1] == 3) and 3 not in x[:-1] for x in a + c)


def test_greedy_rollout_equals_step_by_step_decoding_of_each_prompt_alone(tiny_llama):
    """Left padding, positions and the KV cache do not change what the model writes."""
    prompts = [[1, 5, 9], [1, 5, 9, 13, 2, 40]]
    batched = rollout(tiny_llama, prompts, max_new_tokens=8, temperature=0.0, eos_id=3, pad_id=0, seed=0)
    for p, got in zip(prompts, batched):
        ids = list(p)
        for _ in range(len(got)):
            with torch.no_grad():
                ids.append(int(tiny_llama(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert ids[len(p):] == got


@pytest.mark.parametrize("kind", ["jsd", "sampled_reverse_kl"])
def test_an_on_policy_step_trains_on_the_sampled_tokens_only(tiny_llama, kind):
    """The divergence is taken at the student's sampled positions against the teacher's logits there; alpha is 1
    (no cross-entropy on the student's own tokens), and the gradient reaches the student."""
    torch.manual_seed(3)
    teacher = tiny_llama
    student = copy.deepcopy(teacher).train()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    op = SimpleNamespace(samples_per_prompt=2, max_new_tokens=6, temperature=1.0)
    examples, lengths = on_policy.on_policy_batch(student, EXAMPLES, [0, 1], op, seq_len=64, eos_id=3, pad_id=0,
                                                seed=11)
    assert [e[0][: len(e[0]) - n] for e, n in zip(examples, lengths)] == [EXAMPLES[0][0][:4]] * 2
    assert all(sum(y != IGNORE for y in labels) == n for (_, labels), n in zip(examples, lengths))
    batch = collate(examples, pad_id=0)
    loss_cfg = SimpleNamespace(loss=kind, temperature=1.0, beta=0.5, alpha=1.0)
    step = TrainStep(student, OnlineTeacher(teacher, []))
    loss, n, parts = step(batch, None, loss_cfg)
    loss.backward()
    assert n == sum(lengths) and float(loss.detach()) == pytest.approx(parts["kd"], rel=1e-6)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def _recipe(folder, tmp, **distill_):
    return tiny_recipe(folder, tmp, soft={"loss": "jsd", "teacher_logits": "online", "alpha": 0.5}, **distill_)


def _train(cfg, tmp, name):
    return tiny_train(cfg, tmp, name)


def test_fraction_zero_trains_exactly_as_offline_soft_label(tiny_dir, tmp_path):
    off = _recipe(tiny_dir, tmp_path)
    zero = _recipe(tiny_dir, tmp_path, on_policy={"fraction": 0.0, "samples_per_prompt": 2})
    from toolchain.pipeline.plans import PLANS

    assert PLANS["distill"].config(off) == PLANS["distill"].config(zero)  # keys unchanged
    _, log_a, w_a = _train(off, tmp_path, "off")
    _, log_b, w_b = _train(zero, tmp_path, "zero")
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b] and all("on_policy" not in r for r in log_b)
    assert w_a.keys() == w_b.keys() and all(torch.allclose(w_a[k], w_b[k], atol=1e-6, rtol=0) for k in w_a)


def test_on_policy_run_logs_its_time_and_resumes_with_the_same_rollouts(tiny_dir, tmp_path, monkeypatch):
    cfg = _recipe(tiny_dir, tmp_path, on_policy={"fraction": 0.5, "samples_per_prompt": 2, "max_new_tokens": 8},
                  max_steps=6)
    manifest, full, _ = _train(cfg, tmp_path, "full")
    on = [r for r in full if r["on_policy"]]
    assert [r["step"] for r in on] == [2, 4, 6] and manifest.metrics["on_policy_steps"] == 3
    assert all(r["rollout"] and 1 <= r["sampled_len"] <= 8 and r["rollout_s"] > 0 and r["teacher_s"] > 0 for r in on)
    assert all(r["loss"] == pytest.approx(r["kd"], rel=1e-4) for r in on)  # the divergence alone (alpha = 1)
    assert all(r["loss"] == pytest.approx(0.5 * r["kd"] + 0.5 * r["ce"], rel=1e-3) for r in full if not r["on_policy"])

    # killed after the checkpoint at step 4, then run again: it resumes and replays the same rollouts
    out = tmp_path / "killed"
    out.mkdir()
    real_collate, calls = batches.collate, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_collate(*a, **k)

    monkeypatch.setattr(batches, "collate", dying)
    with pytest.raises(KeyboardInterrupt):
        distill.run(cfg, {"generate": _generate_dir(tmp_path)}, out)
    monkeypatch.setattr(batches, "collate", real_collate)
    distill.run(cfg, {"generate": _generate_dir(tmp_path)}, out)
    resumed = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    same = ("step", "on_policy", "rollout", "sampled_len", "tokens")
    assert [{k: r.get(k) for k in same} for r in resumed] == [{k: r.get(k) for k in same} for r in full]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], rel=1e-4)


def test_warm_start_epochs_train_cross_entropy_first(tiny_dir, tmp_path):
    cfg = _recipe(tiny_dir, tmp_path, epochs=2, warmup_epochs=1, on_policy={"fraction": 1.0, "max_new_tokens": 4})
    _, log, _ = _train(cfg, tmp_path, "warm")
    assert [bool(r.get("warmup")) for r in log] == [True, True, False, False]
    assert all("kd" not in r and not r["on_policy"] for r in log[:2]) and all(r["on_policy"] for r in log[2:])


@pytest.mark.parametrize("change, message", [
    ({"flavour": "hard", "on_policy": {"fraction": 0.5}}, "on-policy distillation is a soft-label method"),
    ({"epochs": 1, "warmup_epochs": 1}, "warmup_epochs: must be less than distill.epochs"),
])
def test_on_policy_settings_are_checked(tiny_dir, tmp_path, change, message):
    with pytest.raises(RecipeError, match=message):
        _recipe(tiny_dir, tmp_path, **change)


def test_an_endpoint_teacher_is_refused_for_on_policy(tmp_path):
    with pytest.raises(RecipeError, match="only a local teacher"):
        parse({"name": "x", "teacher": "openai:http://localhost:8000/v1#m", "data": {"train": ["a"], "heldout": ["b"]},
               "distill": {"flavour": "soft", "on_policy": {"fraction": 0.5}}}, "r.yaml")
