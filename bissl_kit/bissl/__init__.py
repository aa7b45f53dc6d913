"""Stage 2: the BiSSL bilevel stage (spec §1.6, §2.1–§2.2), exact in paper mode.

The lower level trains the pretext model (θ_P, φ_P) on L_P + (λ/2)‖θ_P − sg(θ_D)‖²; the upper level
trains the downstream model (θ_D, φ_D) on L_D(θ_P*(θ_D), φ_D) + γ·L_D(θ_D, φ_D), whose first term
reaches θ_D through the implicit function theorem:

    g_θD = x + γ·∇_θD L_D(θ_D, φ_D),   (I + H/(λ+δ)) x = v = ∇_θP L_D(θ_P, φ_D),
    g_φD = ∇_φD L_D(θ_P, φ_D) + γ·∇_φD L_D(θ_D, φ_D),

with H the Hessian of L_P w.r.t. θ_P on one fixed "Hessian batch" per stage (bissl_kit.implicit).

One stage = N_L lower steps (LARS, clip, schedule), then the Hessian batch, then N_U upper steps
(SGD, clip, schedule), then an evaluation of (θ_D, φ_D) on the val split and a checkpoint. Before
the first stage a linear head φ_D is warmed up on the frozen θ_D. The lower backbone θ_P is the
result, fine-tuned in stage 3.

**Paper mode** (:data:`PAPER_MODE`, the ``paper_*`` presets) is the official algorithm: layerwise
"CG" with K = 5 from x = 0, every product recomputed, one pretext forward per view, BatchNorm
statistics updated by every forward, non-finite values zeroed and non-finite losses run through,
one Hessian batch = the first batch of a fresh lower iterator, partial last batches kept, the
official schedule whose first step runs at the base lr. Every other value of those fields is a named
option, measured in ``benchmarks/stage.py``.

Batches follow the official DataLoader semantics with our own seeded permutations: each level walks
a permutation of its data in batches of B (``partial_batch="keep"``: ⌈n/B⌉ batches, the last one
smaller, as a DataLoader without ``drop_last``; ``"drop"``: ⌊n/B⌋ equal batches); when fewer than
the stage's N batches remain it starts a new permutation seeded by the stage index (the official
``set_epoch(stage)``); the "fresh iterator" Hessian batch is the first batch of the current lower
permutation with new augmentations. A downstream loader shorter than N_U batches is handled as the
version chosen by ``upper_short_loader`` handles it (spec §2.5, C9).
"""


from __future__ import annotations

import copy
from pathlib import Path

import torch

from .. import distributed, speed
from ..checkpoint import CheckpointError, content_signature
from ..rng import resolve_device
from .batches import BilevelData, LevelIterator, build_data, upper_steps_per_stage
from .config import CHECKPOINT_KIND, FAST_MODE, PAPER_MODE, PAPER_NEURIPS_UPPER, BisslConfig
from .diagnostics import cosine, layer_groups
from .trainer import BisslTrainer

__all__ = ["BisslConfig", "PAPER_MODE", "FAST_MODE", "PAPER_NEURIPS_UPPER", "CHECKPOINT_KIND", "BilevelData",
           "LevelIterator", "BisslTrainer", "build_data", "build_trainer", "load_lower_backbone",
           "upper_steps_per_stage", "cosine", "layer_groups"]


def build_trainer(cfg: BisslConfig, *, resume: bool = True) -> BisslTrainer:
    """θ_P, φ_P from the pre-training checkpoint; θ_D a copy of θ_P; a fresh linear head φ_D;
    the data; and, when the run directory holds a checkpoint of this config, its state."""
    from ..models import linear_head
    from ..pretrain import load_pretrained

    distributed.init(device=cfg.device)  # under torchrun: join the process group, pick this rank's GPU
    device = resolve_device(cfg.device)
    try:
        lower, pre_cfg = load_pretrained(cfg.pretrain_checkpoint)
    except CheckpointError as e:
        raise CheckpointError(f"pretrain_checkpoint={cfg.pretrain_checkpoint!r} cannot be used: {e}; "
                              "it must be a pre-training run's checkpoint.pt") from e
    if hasattr(lower, "reset_target"):
        lower.reset_target()  # BYOL: the target restarts from the online weights (spec §2.3)
    data = build_data(cfg, pre_cfg, device)
    upper = copy.deepcopy(lower.backbone)
    torch.manual_seed(cfg.seed)
    head = linear_head(upper.feat_dim, data.num_classes)
    # the run depends on the content of the pre-training checkpoint, not on where it lies
    signature = content_signature(cfg.pretrain_checkpoint)
    lower, upper = (speed.memory_format(m.to(device), cfg.channels_last) for m in (lower, upper))
    trainer = BisslTrainer(cfg, lower, upper, head.to(device), data, device=device,
                           out_dir=cfg.out_dir, identity={"pretrain_checkpoint": signature, **data.identity},
                           lineage={"pretrain_config": pre_cfg.to_dict(),
                                    "init": {"checkpoint": str(cfg.pretrain_checkpoint), "signature": signature}})
    if resume:
        trainer.resume()
    return trainer


def load_lower_backbone(path: str | Path):
    """θ_P of a BiSSL checkpoint (the stage's result, to be fine-tuned) and the pre-training config
    that describes its architecture."""
    from ..backbones import load_backbone
    loaded = load_backbone(path, "lower")
    if loaded.kind != CHECKPOINT_KIND:
        raise CheckpointError(f"{str(path)!r} holds a {loaded.kind!r} checkpoint, expected 'bissl'")
    return loaded.backbone, loaded.pretrain_config
