"""Pretext methods behind one interface: ``method.loss(view1, view2)`` on the backbone and its head.

* :class:`SimCLR`: backbone → projector, NT-Xent (spec §2.3).
* :class:`BYOL`: online backbone → projector → predictor; target = EMA copy of backbone and
  projector, evaluated without gradient; symmetrised 2 − 2cos loss.

``pretext_forward`` says how the two views go through the networks: ``"per_view"`` runs one forward
per view, as the official SimCLR and BYOL do (spec §2.3), so each view is normalised by BatchNorm
with its own batch statistics and every loss evaluation updates the running buffers twice;
``"joint"`` runs one forward of the 2N images ``cat(view1, view2)``, whose BatchNorm statistics mix
the two views. Without BatchNorm the two are the same function. The attribute may be changed on a
built module (the BiSSL stage sets its own).

``backbone`` is θ_P of the bilevel problem and ``head`` is φ_P (the projector, and for BYOL the
predictor too); the BiSSL stage regularises and differentiates through ``backbone`` only.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .losses import byol_loss, nt_xent
from .models import Projector

METHODS = ("simclr", "byol")
PRETEXT_FORWARDS = ("per_view", "joint")


def check_forward(pretext_forward: str) -> str:
    if pretext_forward not in PRETEXT_FORWARDS:
        raise ValueError(f"pretext_forward={pretext_forward!r} is not supported; choose one of {PRETEXT_FORWARDS}")
    return pretext_forward


def both_views(net, v1: torch.Tensor, v2: torch.Tensor, pretext_forward: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``net`` applied to each view: one forward per view, or one forward of both (see module docstring)."""
    if pretext_forward == "per_view":
        return net(v1), net(v2)
    return net(torch.cat([v1, v2])).chunk(2)


class SimCLR(nn.Module):
    def __init__(self, backbone: nn.Module, *, proj_hidden: int = 256, proj_dim: int = 256,
                 temperature: float = 0.5, pretext_forward: str = "joint"):
        super().__init__()
        self.backbone = backbone
        self.head = Projector(backbone.feat_dim, proj_hidden, proj_dim)
        self.temperature = temperature
        self.pretext_forward = check_forward(pretext_forward)

    def _embed(self, x):
        return self.head(self.backbone(x))

    def loss(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        z1, z2 = both_views(self._embed, v1, v2, self.pretext_forward)
        return nt_xent(z1, z2, self.temperature)

    def update_target(self) -> None:
        """SimCLR has no target network."""


class BYOL(nn.Module):
    def __init__(self, backbone: nn.Module, *, proj_hidden: int = 256, proj_dim: int = 256,
                 ema: float = 0.99, pretext_forward: str = "joint"):
        super().__init__()
        self.backbone = backbone
        self.pretext_forward = check_forward(pretext_forward)
        self.head = nn.ModuleDict({"projector": Projector(backbone.feat_dim, proj_hidden, proj_dim),
                                   "predictor": Projector(proj_dim, proj_hidden, proj_dim)})
        self.ema = ema
        self.reset_target()

    def reset_target(self) -> None:
        """Target ← online weights (what BiSSL does after loading a checkpoint, spec §2.3)."""
        self.target = nn.ModuleDict({"backbone": copy.deepcopy(self.backbone),
                                     "projector": copy.deepcopy(self.head["projector"])})
        self.target.requires_grad_(False)

    def _online(self, x):
        return self.head["predictor"](self.head["projector"](self.backbone(x)))

    @torch.no_grad()
    def _target(self, x):
        return self.target["projector"](self.target["backbone"](x))

    def loss(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        p1, p2 = both_views(self._online, v1, v2, self.pretext_forward)
        t1, t2 = both_views(self._target, v1, v2, self.pretext_forward)
        return byol_loss(p1, p2, t1, t2)

    @torch.no_grad()
    def update_target(self) -> None:
        """ξ ← m·ξ + (1 − m)·θ for the backbone and projector; buffers (BN statistics) are copied."""
        pairs = [(self.target["backbone"], self.backbone), (self.target["projector"], self.head["projector"])]
        for tgt, src in pairs:
            for pt, ps in zip(tgt.parameters(), src.parameters()):
                pt.lerp_(ps, 1 - self.ema)
            for bt, bs in zip(tgt.buffers(), src.buffers()):
                bt.copy_(bs)


def build_pretext(method: str, backbone: nn.Module, *, proj_hidden: int = 256, proj_dim: int = 256,
                  temperature: float = 0.5, byol_ema: float = 0.99, pretext_forward: str = "joint") -> SimCLR | BYOL:
    if method == "simclr":
        return SimCLR(backbone, proj_hidden=proj_hidden, proj_dim=proj_dim, temperature=temperature,
                      pretext_forward=pretext_forward)
    if method == "byol":
        return BYOL(backbone, proj_hidden=proj_hidden, proj_dim=proj_dim, ema=byol_ema,
                    pretext_forward=pretext_forward)
    raise ValueError(f"method={method!r} is not supported; choose one of {METHODS}")
