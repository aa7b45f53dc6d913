"""LARS and the warm-up + cosine learning-rate schedule of the paper (spec §1.7).

Schedules are plain functions of the step index, so a run can be plotted before it starts and
resumed at any step without scheduler state.
"""

from __future__ import annotations

import math

import torch

# spec §1.7 / §6.3: LARS trust coefficient and the final lr as a fraction of the base lr
LARS_ETA = 1e-3
END_LR_FACTOR = 1e-3


class LARS(torch.optim.Optimizer):
    """LARS as the official code uses it (VICReg style, spec §1.7).

    For each parameter p with gradient g: g' = g + wd·p; q = η‖p‖/‖g'‖ (1 when either norm is 0);
    mu ← momentum·mu + q·g'; p ← p − lr·mu. The official code excludes nothing, so biases and
    BatchNorm parameters also get weight decay and the trust ratio; ``exclude_1d=True`` is the common
    fix (no wd, no scaling for 1-d tensors) offered as an option.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = LARS_ETA, exclude_1d: bool = False):
        for name, v, ok in (("lr", lr, lr >= 0), ("weight_decay", weight_decay, weight_decay >= 0),
                            ("momentum", momentum, 0 <= momentum < 1), ("eta", eta, eta > 0)):
            if not ok:
                raise ValueError(f"LARS {name}={v!r} is out of range")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                                      exclude_1d=exclude_1d))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                plain = group["exclude_1d"] and p.ndim <= 1
                if not plain:
                    g = g.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    one = torch.ones_like(p_norm)
                    q = torch.where(p_norm > 0, torch.where(g_norm > 0, group["eta"] * p_norm / g_norm, one), one)
                    g = g.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(g)
                p.add_(mu, alpha=-group["lr"])
        return loss


def warmup_cosine(step: int, *, base_lr: float, warmup: int, total: int,
                  end_factor: float = END_LR_FACTOR, official_first_step: bool = False) -> float:
    """Learning rate of optimiser step ``step`` (0-based).

    With the schedule counter t: lr = base·t/W while t < W, then
    base·q + end_factor·base·(1 − q) with q = ½(1 + cos(π(t − W)/(T − W))).

    ``official_first_step=False`` (ours): step i uses t = i + 1, so the first step is the first warm-up
    step and step T − 1 is the last cosine step.
    ``official_first_step=True`` (paper mode, spec §1.7, C13): the official scheduler's counter starts at
    t = 1 and is advanced *after* each optimiser step, so step 0 runs at the full base lr (the
    optimiser's initial lr) and step i ≥ 1 runs at t = i.
    """
    if official_first_step:
        if step == 0:
            return base_lr
        t = step
    else:
        t = step + 1
    if warmup > 0 and t < warmup:
        return base_lr * t / warmup
    if total <= warmup:
        return base_lr
    q = 0.5 * (1 + math.cos(math.pi * min(t - warmup, total - warmup) / (total - warmup)))
    return base_lr * q + end_factor * base_lr * (1 - q)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
