"""LARS update and the warm-up + cosine schedule against hand computation (spec §1.7)."""
import math

import pytest
import torch

from bissl_kit.optim import LARS, warmup_cosine


def test_lars_step_matches_the_spec_formula():
    torch.manual_seed(0)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    lr, wd, mom, eta = 0.5, 1e-2, 0.9, 1e-3
    opt = LARS([w, b], lr=lr, weight_decay=wd, momentum=mom, eta=eta)
    mus = [torch.zeros_like(w), torch.zeros_like(b)]
    ref = [w.detach().clone(), b.detach().clone()]
    for _ in range(3):
        grads = [torch.randn_like(w), torch.randn_like(b)]
        w.grad, b.grad = grads[0].clone(), grads[1].clone()
        opt.step()
        for i, (p, g) in enumerate(zip(ref, grads)):
            gp = g + wd * p
            q = eta * p.norm() / gp.norm()
            mus[i] = mom * mus[i] + q * gp
            ref[i] = p - lr * mus[i]
    assert torch.allclose(w, ref[0], atol=1e-14) and torch.allclose(b, ref[1], atol=1e-14)


def test_lars_exclude_1d_leaves_biases_plain_and_zero_norm_guard():
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # ‖p‖ = 0: trust ratio must be 1
    b.grad = torch.ones(3, dtype=torch.float64)
    LARS([b], lr=0.1, momentum=0.0, weight_decay=0.5).step()
    assert torch.allclose(b, torch.full((3,), -0.1, dtype=torch.float64))
    c = torch.ones(3, dtype=torch.float64, requires_grad=True)
    c.grad = torch.ones(3, dtype=torch.float64)
    LARS([c], lr=0.1, momentum=0.0, weight_decay=0.5, exclude_1d=True).step()
    assert torch.allclose(c, torch.full((3,), 0.9, dtype=torch.float64))


def test_lars_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="momentum"):
        LARS([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=1.0)


def test_schedule_warmup_then_cosine_to_end_factor():
    kw = dict(base_lr=2.0, warmup=10, total=110, end_factor=1e-3)
    assert warmup_cosine(0, **kw) == pytest.approx(0.2)        # t = 1
    assert warmup_cosine(4, **kw) == pytest.approx(1.0)        # t = 5 = W/2
    assert warmup_cosine(9, **kw) == pytest.approx(2.0)        # t = W: cosine starts at q = 1
    mid = warmup_cosine(59, **kw)                               # t = 60: halfway through the cosine
    assert mid == pytest.approx(2.0 * 0.5 + 2e-3 * 0.5)
    assert warmup_cosine(109, **kw) == pytest.approx(2e-3)      # t = T: the end lr
    assert warmup_cosine(500, **kw) == pytest.approx(2e-3)      # stays there


def test_schedule_official_first_step_runs_at_base_lr():
    kw = dict(base_lr=1.0, warmup=4, total=20)
    assert warmup_cosine(0, official_first_step=True, **kw) == 1.0   # C13
    assert warmup_cosine(1, official_first_step=True, **kw) == pytest.approx(0.25)
    assert warmup_cosine(2, official_first_step=True, **kw) == pytest.approx(0.5)
    # without warm-up the official schedule is cosine from t = 1
    q = 0.5 * (1 + math.cos(math.pi * 3 / 8))
    assert warmup_cosine(3, base_lr=1.0, warmup=0, total=8, official_first_step=True) == pytest.approx(q + 1e-3 * (1 - q))
