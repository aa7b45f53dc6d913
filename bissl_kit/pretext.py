"""Pretext methods behind one interface: ``method.loss(view1, view2)`` on the backbone and its head.

* :class:`SimCLR`: backbone → projector, NT-Xent (spec §2.3).
* :class:`BYOL`: online backbone → projector → predictor; target = EMA copy of backbone and
  projector, evaluated without gradient; symmetrised 2 − 2cos loss.

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


class SimCLR(nn.Module):
    def __init__(self, backbone: nn.Module, *, proj_hidden: int = 256, proj_dim: int = 256,
                 temperature: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.head = Projector(backbone.feat_dim, proj_hidden, proj_dim)
        self.temperature = temperature

    def loss(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        # one forward of both views, so BatchNorm sees the 2N images together as in the official code
        z = self.head(self.backbone(torch.cat([v1, v2])))
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, self.temperature)

    def update_target(self) -> None:
        """SimCLR has no target network."""


class BYOL(nn.Module):
    def __init__(self, backbone: nn.Module, *, proj_hidden: int = 256, proj_dim: int = 256,
                 ema: float = 0.99):
        super().__init__()
        self.backbone = backbone
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
        p1, p2 = self._online(torch.cat([v1, v2])).chunk(2)
        t1, t2 = self._target(torch.cat([v1, v2])).chunk(2)
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
                  temperature: float = 0.5, byol_ema: float = 0.99) -> SimCLR | BYOL:
    if method == "simclr":
        return SimCLR(backbone, proj_hidden=proj_hidden, proj_dim=proj_dim, temperature=temperature)
    if method == "byol":
        return BYOL(backbone, proj_hidden=proj_hidden, proj_dim=proj_dim, ema=byol_ema)
    raise ValueError(f"method={method!r} is not supported; choose one of {METHODS}")
