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
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from . import distributed
from .backbones import recipe_of
from .checkpoint import CheckpointError, content_signature
from .config import Config, ConfigError, param
from .implicit import (AveragedOperator, HessianOperator, HypergradientSolver, NonFiniteError, isolated_bn_buffers,
                       rank_mean)
from .optim import LARS, set_lr, warmup_cosine
from .rng import generator, resolve_device
from .rundir import RunDir, progress_bar

CHECKPOINT_KIND = "bissl"

# the official values of every field that changes the algorithm (spec §1.4–§1.7, §2.3, §2.5); what
# differs between versions (γ, the lower warm-up, short downstream loaders) is set by the presets
PAPER_MODE = dict(solver="layerwise", cg_iters=5, cg_rtol=None, warm_start="none", hvp="recompute",
                  hessian_batch="fresh", hessian_batches=1, bn_stats="update", nonfinite="zero",
                  official_first_step=True, pretext_forward="per_view", partial_batch="keep",
                  upper_short_loader="cycle", nonfinite_loss="continue")
# our default: one MINRES iteration per upper step (the implicit engine's RECOMMENDED_SOLVER), the
# graph built once per stage, no BatchNorm drift, errors on NaN.  benchmarks/stage.py, CPU default,
# paper counts, 3 repeats: stage 3.0× and upper phase 4.4× faster than the official scheme, error
# against a MINRES reference 0.98 vs the official 2.2 (A is indefinite at δ = 10, so the official five
# layerwise iterations end farther from the solution than x = 0).  True CG (5 iterations, tolerance,
# recycling) was the default before: 1.07× at error 0.81; MINRES with 2 iterations: 2.4× at 0.89.
# The batches are the official ones: a joint forward of the two views was no faster and no better
# (experiments/pretext_forward), and dropping partial batches has no reason to recommend it.
FAST_MODE = dict(solver="minres", cg_iters=1, cg_rtol=1e-2, warm_start="none", hvp="reuse",
                 hessian_batch="fresh", hessian_batches=1, bn_stats="restore", nonfinite="raise",
                 official_first_step=True, pretext_forward="per_view", partial_batch="keep",
                 upper_short_loader="cycle", nonfinite_loss="raise")
# K when cg_iters is None: the official count for the official-style solvers, one for MINRES (above)
DEFAULT_SOLVER_ITERS = {"layerwise": 5, "cg": 5, "minres": 1}

# V3's upper lr / weight decay per downstream set and pretext method (spec §2.5, from its models/*.json),
# under the kit's dataset names; the other V3 settings are the same for every set
PAPER_NEURIPS_UPPER = {
    "simclr": {"aircraft": (0.03, 5e-3), "caltech101": (0.03, 1e-4), "cars": (0.035, 1e-3),
               "cifar10": (0.015, 1e-3), "cifar100": (0.01, 1e-4), "cub200": (0.03, 1e-3), "dtd": (0.03, 1e-3),
               "flowers102": (0.05, 5e-4), "food101": (0.03, 1e-3), "pets": (0.03, 1e-3),
               "sun397": (0.015, 5e-5), "voc07": (0.015, 5e-3)},
    "byol": {"aircraft": (0.015, 3e-3), "caltech101": (0.015, 2e-4), "cars": (0.04, 2e-3),
             "cifar10": (0.01, 1e-3), "cifar100": (0.01, 1e-3), "cub200": (0.015, 1e-4), "dtd": (0.015, 1e-4),
             "flowers102": (0.035, 2e-3), "food101": (0.035, 2e-3), "pets": (0.02, 2e-3),
             "sun397": (0.01, 5e-5), "voc07": (0.005, 6e-3)},
}


@dataclass(frozen=True)
class BisslConfig(Config):
    # Inputs
    pretrain_checkpoint: str = param("runs/pretrain/checkpoint.pt", "pre-training checkpoint (θ_P, φ_P); θ_D starts as a copy of θ_P", resumable=True)
    downstream: str = param("digits", "downstream dataset (bissl_kit.data.DATASETS)", choices=tuple(data_mod.DATASETS))
    labels_per_class: int | None = param(None, "few-label train split: labelled images per class; None = all", low=1)
    data_root: str | None = param(None, "dataset root; None searches $BISSL_DATA, data/, the Debian package", resumable=True)
    # Stage counts
    stages: int = param(20, "T: bilevel stages (paper 500)", low=1, resumable=True)
    lower_steps: int = param(20, "N_L: lower (pretext) steps per stage", low=0)
    upper_steps: int = param(8, "N_U: upper (downstream) steps per stage", low=0)
    head_warmup_epochs: int = param(20, "epochs of linear-head warm-up on the frozen θ_D before stage 1", low=0)
    # The bilevel problem
    lam: float = param(1e-3, "λ: weight of the proximal term (λ/2)‖θ_P − θ_D‖²", low=0, low_inclusive=False)
    damping: float = param(10.0, "δ: added to λ inside the hypergradient solve only", low=0)
    gamma: float = param(0.01, "γ: weight of the classic downstream term (V1 0.01, V2/V3 1)", low=0)
    # Hypergradient solver
    solver: str = param("minres", "'layerwise' (official per-tensor recursion), 'cg' (true conjugate gradient) or "
                        "'minres' (valid when A = I + H/(λ+δ) is indefinite)", choices=("layerwise", "cg", "minres"))
    cg_iters: int | None = param(None, "K: solver iterations; None = the solver's default (5 for 'layerwise' and "
                                 "'cg', the official count; 1 for 'minres', measured in benchmarks/stage.py)", low=1)
    cg_rtol: float | None = param(1e-2, "stop CG at this relative residual; None = run all K iterations",
                                  low=0, low_inclusive=False)
    warm_start: str = param("none", "solver start: 'none' (x=0), 'previous' (last x), 'recycle' (Krylov subspace of the stage)",
                            choices=("none", "previous", "recycle"))
    hvp: str = param("reuse", "'recompute' (official: rebuild the gradient graph per product) or 'reuse' (once per stage)",
                     choices=("recompute", "reuse"))
    hessian_batch: str = param("fresh", "'fresh': first batch(es) of a fresh lower iterator (official); "
                               "'lower': the stage's first lower batches; 'random': random batches",
                               choices=("fresh", "lower", "random"))
    hessian_batches: int = param(1, "batches the Hessian is averaged over (V1's dead code intended 5)", low=1)
    bn_stats: str = param("restore", "BatchNorm buffers of θ_P during the upper phase: 'update' (official drift) or 'restore'",
                          choices=("update", "restore"))
    nonfinite: str = param("raise", "non-finite hypergradient: 'raise' (stop, naming where) or 'zero' (official nan_to_num)",
                           choices=("raise", "zero"))
    nonfinite_loss: str = param("raise", "non-finite loss at either level: 'raise' (stop at once, naming stage and step) "
                                "or 'continue' (official: train on; a non-finite state is still never written over "
                                "the last good checkpoint, so the run stops at the end of that stage)",
                                choices=("raise", "continue"))
    # Batches
    pretext_forward: str = param("per_view", "pretext views through θ_P and φ_P: 'per_view' (official: one forward per view, "
                                 "BatchNorm statistics per view) or 'joint' (one forward of both views)",
                                 choices=("per_view", "joint"))
    partial_batch: str = param("keep", "a level's last batch when B does not divide its data: 'keep' (official "
                               "DataLoader, ⌈n/B⌉ batches per pass) or 'drop' (⌊n/B⌋ equal batches)",
                               choices=("keep", "drop"))
    upper_short_loader: str = param("cycle", "a downstream loader of L < N_U batches: 'cycle' (V3: N_U steps, "
                                    "cycling), 'truncate' (V1, spec C9: N_U // L steps) or 'whole_passes' "
                                    "(V2: ⌊N_U/L⌋·L steps); the upper schedule spans stages·N_U steps in all",
                                    choices=("cycle", "truncate", "whole_passes"))
    # Lower optimiser: LARS
    lower_batch_size: int = param(256, "B_P: pretext image pairs per lower step (paper 1024)", low=2)
    lower_lr: float = param(1.0, "lower LARS base lr", low=0, low_inclusive=False)
    lower_weight_decay: float = param(1e-6, "lower LARS weight decay", low=0)
    lower_momentum: float = param(0.9, "lower LARS momentum", low=0, high=1, high_inclusive=False)
    lower_warmup: int | None = param(40, "lower linear warm-up steps (V3: 10·N_L); None = lower_warmup_passes", low=0)
    lower_warmup_passes: int | None = param(None, "lower warm-up as passes over the pretext batches (V1: 10, i.e. "
                                            "10·len(loader) steps); needs lower_warmup=None", low=0)
    lower_clip: float | None = param(10.0, "clip norm of the lower gradients (θ_P, φ_P); None = off", low=0, low_inclusive=False)
    # Upper optimiser: SGD
    upper_batch_size: int = param(256, "B_D: downstream images per upper step", low=1)
    upper_lr: float = param(0.015, "upper SGD base lr (also the head warm-up lr)", low=0, low_inclusive=False)
    upper_weight_decay: float = param(0.01, "upper SGD weight decay (coupled, as torch.optim.SGD)", low=0)
    upper_momentum: float = param(0.9, "upper SGD momentum", low=0, high=1, high_inclusive=False)
    upper_clip: float | None = param(10.0, "clip norm of the upper gradients (θ_D, φ_D); None = off", low=0, low_inclusive=False)
    official_first_step: bool = param(True, "schedules run their first step at the full base lr (official, C13)")
    # Running
    seed: int = param(0, "seed of head init, batch order and augmentations", low=0)
    device: str = param("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'", resumable=True)
    sync_bn: bool = param(False, "under torchrun: BatchNorm over the global batch (bissl_kit.distributed.SyncBatchNorm, "
                          "exact against one process) instead of per-rank shards (official); no effect in one process")
    out_dir: str = param("runs/bissl", "run directory: checkpoint, metrics, config", resumable=True)
    progress: bool = param(True, "show a tqdm progress bar", resumable=True)

    @property
    def solver_iters(self) -> int:
        """K as run: ``cg_iters``, or the solver's default when it is None."""
        return self.cg_iters if self.cg_iters is not None else DEFAULT_SOLVER_ITERS[self.solver]

    def check(self):
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"device={self.device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.solver == "layerwise" and self.warm_start != "none":
            raise ConfigError(f"warm_start={self.warm_start!r} needs solver='cg'; the layerwise recursion "
                              "always starts at x = 0")
        if self.solver == "minres" and self.warm_start == "recycle":
            raise ConfigError("warm_start='recycle' (deflated CG) needs solver='cg'; with solver='minres' "
                              "choose 'none' or 'previous'")
        if (self.lower_warmup is None) == (self.lower_warmup_passes is None):
            raise ConfigError(f"lower_warmup={self.lower_warmup!r} and lower_warmup_passes={self.lower_warmup_passes!r}: "
                              "exactly one of the two must be set (the other None)")
        if self.hessian_batch == "lower" and self.hessian_batches > max(self.lower_steps, 1):
            raise ConfigError(f"hessian_batches={self.hessian_batches} exceeds lower_steps={self.lower_steps} "
                              "with hessian_batch='lower'")

    # what a saved config without these fields (written before they existed) ran with
    SAVED_DEFAULTS: ClassVar[dict] = {"pretext_forward": "joint", "partial_batch": "drop", "upper_short_loader": "cycle",
                                      "nonfinite_loss": "raise", "lower_warmup_passes": None}

    # ---- presets ---------------------------------------------------------------------------------
    # Each preset is the official algorithm *for the sizes it is given*: what the official code derives
    # from other settings (the lower warm-up, V3's per-dataset upper lr) is derived from the values
    # after the overrides, unless an override sets it itself.
    _PAPER_COUNTS: ClassVar[dict] = dict(stages=500, lower_steps=20, upper_steps=8, head_warmup_epochs=20, lam=1e-3, damping=10.0,
                         lower_batch_size=1024, lower_lr=1.0, lower_weight_decay=1e-6, upper_batch_size=256)

    @classmethod
    def paper_iclr(cls, **overrides) -> "BisslConfig":
        """V1 (ICLR): ResNet-18 at 96 px (set in the pre-training config), γ = 0.01, upper SGD 0.015 /
        0.01 for every set, a lower warm-up of 10 passes over the pretext loader (10·len(loader) steps:
        980 for STL10's 100k unlabeled images in batches of 1024), and a downstream loader shorter than
        N_U batches run for N_U // len(loader) steps (C9)."""
        values = {**PAPER_MODE, **cls._PAPER_COUNTS, "gamma": 0.01, "upper_lr": 0.015, "upper_weight_decay": 0.01,
                  "downstream": "stl10", "upper_short_loader": "truncate",
                  "lower_warmup": None, "lower_warmup_passes": 10, **overrides}
        return cls.from_dict(_one_warmup(values, overrides))

    @classmethod
    def paper_neurips(cls, *, method: str = "simclr", **overrides) -> "BisslConfig":
        """V3 (NeurIPS): ResNet-50 (set in the pre-training config), γ = 1 (hard-coded there), a lower
        warm-up of 10·N_L steps, and the upper lr / weight decay of ``downstream`` and the pretext
        ``method`` from V3's per-dataset files (:data:`PAPER_NEURIPS_UPPER`, spec §2.5)."""
        if method not in PAPER_NEURIPS_UPPER:
            raise ConfigError(f"method={method!r} is not allowed; method must be one of "
                              f"{', '.join(map(repr, PAPER_NEURIPS_UPPER))}")
        values = {**PAPER_MODE, **cls._PAPER_COUNTS, "gamma": 1.0, "downstream": "cifar10",
                  "upper_short_loader": "cycle", **overrides}
        if "lower_warmup" not in overrides and "lower_warmup_passes" not in overrides:
            values["lower_warmup"] = 10 * values["lower_steps"]
        values = _one_warmup(values, overrides)
        if "upper_lr" not in overrides or "upper_weight_decay" not in overrides:
            table = PAPER_NEURIPS_UPPER[method]
            if values["downstream"] not in table:
                raise ConfigError(f"paper_neurips has V3's upper lr / weight decay for {', '.join(table)}; for "
                                  f"downstream={values['downstream']!r} pass upper_lr and upper_weight_decay")
            lr, wd = table[values["downstream"]]
            values.setdefault("upper_lr", lr)
            values.setdefault("upper_weight_decay", wd)
        return cls.from_dict(values)

    @classmethod
    def embedded(cls, *, paper_mode: bool = False, **overrides) -> "BisslConfig":
        """The CPU default on the offline data (digits downstream); ``paper_mode=True`` switches the
        algorithm to the official one, everything else unchanged."""
        return cls.from_dict(_one_warmup({**(PAPER_MODE if paper_mode else FAST_MODE), **overrides}, overrides))


def _one_warmup(values: dict, overrides: dict) -> dict:
    """The lower warm-up the caller set (in steps or in passes) replaces the other one."""
    if "lower_warmup" in overrides and "lower_warmup_passes" not in overrides:
        return {**values, "lower_warmup_passes": None}
    if "lower_warmup_passes" in overrides and "lower_warmup" not in overrides:
        return {**values, "lower_warmup": None}
    return values


# ---- small helpers -----------------------------------------------------------------------------------

def _flat_norm(ts) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts))


def cosine(a, b) -> float:
    """Cosine similarity of two tuples of tensors as concatenated vectors (nan if either is 0)."""
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    na, nb = _flat_norm(a), _flat_norm(b)
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")


def layer_groups(names: list[str]) -> list[tuple[str, list[int]]]:
    """Parameter indices grouped by layer: 'conv1'/'bn1' → 'stem', 'layer2.1.conv1.weight' → 'layer2.1'."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        parts = n.split(".")
        key = ".".join(parts[:2]) if parts[0].startswith("layer") else ("stem" if parts[0] in ("conv1", "bn1") else parts[0])
        groups.setdefault(key, []).append(i)
    return list(groups.items())


def accuracy_topk(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Fraction of samples whose label is among the k highest logits (k capped at the class count)."""
    out = {}
    for k in ks:
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices
        out[k] = (top == labels[:, None]).any(1).float().mean().item()
    return out


# ---- the data a stage consumes -------------------------------------------------------------------------

class LevelIterator:
    """Batches of one level: walks a permutation of ``n`` items in batches of ``batch_size`` (with
    ``keep_partial`` the last one holds the n mod B left over, as a DataLoader without ``drop_last``);
    a new permutation (seeded by the stage, like the official ``set_epoch(stage)``) starts when fewer
    than ``need`` batches remain."""

    def __init__(self, n: int, batch_size: int, seed: int, tag: str, *, field: str = "batch size",
                 keep_partial: bool = False):
        if batch_size > n:
            raise ConfigError(f"{field}={batch_size} is larger than the {tag} data ({n} items); "
                              f"{field} must be <= {n}")
        self.n, self.batch_size, self.seed, self.tag = n, batch_size, seed, tag
        self.partial = n % batch_size if keep_partial else 0  # size of the short last batch, 0 if none
        self.per_epoch = n // batch_size + (1 if self.partial else 0)
        self.epoch, self.pos = 0, 0

    def order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=generator(self.seed, self.tag, epoch))

    def begin_stage(self, stage: int, need: int) -> None:
        if self.per_epoch - self.pos < need:
            self.epoch, self.pos = stage, 0

    def _wrap(self) -> None:
        if self.pos >= self.per_epoch:  # need > per_epoch: wrap within the stage
            self.epoch, self.pos = self.epoch + 1, 0

    def next(self) -> torch.Tensor:
        self._wrap()
        idx = self.order(self.epoch)[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
        self.pos += 1
        return idx

    def draws_partial(self, first_stage: int, stages: int, need: int) -> bool:
        """Whether stages ``first_stage`` to ``stages − 1``, each taking ``need`` batches from here on,
        draw the short last batch (positions only: no permutation is computed, the state is kept)."""
        if not self.partial:
            return False
        sim = copy.copy(self)
        for stage in range(first_stage, stages):
            sim.begin_stage(stage, need)
            for _ in range(need):
                sim._wrap()
                if sim.pos == sim.per_epoch - 1:
                    return True
                sim.pos += 1
        return False

    def first(self, k: int = 1) -> list[torch.Tensor]:
        """The first ``k`` batches of a fresh iterator over the current permutation."""
        order = self.order(self.epoch)
        return [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(k)]

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


@dataclass
class BilevelData:
    """How a stage turns indices into tensors. ``pretext_views(idx, tag)`` returns the two augmented
    views of pretext items ``idx`` (``tag`` seeds the augmentation); ``downstream_batch(idx, tag)``
    returns (inputs, labels) of downstream train items; ``val`` is (inputs, labels) of the val split,
    already normalised."""

    n_pretext: int
    n_downstream: int
    pretext_views: Callable[[torch.Tensor, tuple], tuple[torch.Tensor, torch.Tensor]]
    downstream_batch: Callable[[torch.Tensor, tuple], tuple[torch.Tensor, torch.Tensor]]
    val: tuple[torch.Tensor, torch.Tensor] | None = None
    num_classes: int | None = None


# ---- the trainer -----------------------------------------------------------------------------------

class BisslTrainer:
    """The bilevel stage on given models and data (see :func:`build_trainer` for the usual set-up).

    ``lower`` is a pretext module with ``.backbone`` (θ_P), ``.head`` (φ_P), ``.loss(v1, v2)`` and
    ``.update_target()``; ``upper_backbone`` (θ_D) has θ_P's architecture; ``head`` is φ_D.
    :meth:`run` is a generator of records, one per lower step, upper step and stage end.
    """

    def __init__(self, cfg: BisslConfig, lower: nn.Module, upper_backbone: nn.Module, head: nn.Module,
                 data: BilevelData, *, device: torch.device | str = "cpu", out_dir: str | Path | None = None,
                 identity: dict | None = None, lineage: dict | None = None):
        self.cfg, self.lower, self.upper, self.head, self.data = cfg, lower, upper_backbone, head, data
        self.device = torch.device(device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        # the run folder (None: an in-memory run); under torchrun rank 0 alone locks, logs and writes
        self.run_dir = (RunDir(self.out_dir, CHECKPOINT_KIND, cfg, identity=identity, lineage=lineage)
                        if self.out_dir is not None else None)
        self.log = self.run_dir.log if self.run_dir is not None and distributed.is_main() else None
        self._distributed_setup()
        self.names = [n for n, _ in lower.backbone.named_parameters()]
        if self.names != [n for n, _ in upper_backbone.named_parameters()]:
            raise ValueError("upper_backbone must have the same architecture (parameter names) as lower.backbone")
        self.groups = layer_groups(self.names)
        if not hasattr(lower, "pretext_forward"):
            raise ValueError("lower must have a 'pretext_forward' attribute ('per_view' or 'joint') that its loss "
                             "follows, so that the stage can set cfg.pretext_forward")
        lower.pretext_forward = cfg.pretext_forward
        self.lower_opt = LARS(lower.parameters(), lr=cfg.lower_lr, weight_decay=cfg.lower_weight_decay,
                              momentum=cfg.lower_momentum)
        self.upper_params = list(upper_backbone.parameters()) + list(head.parameters())
        self.upper_opt = torch.optim.SGD(self.upper_params, lr=cfg.upper_lr, momentum=cfg.upper_momentum,
                                         weight_decay=cfg.upper_weight_decay)
        keep = cfg.partial_batch == "keep"
        self.lower_it = LevelIterator(data.n_pretext, cfg.lower_batch_size, cfg.seed, "bissl-lower",
                                      field="lower_batch_size", keep_partial=keep)
        self.upper_it = LevelIterator(data.n_downstream, cfg.upper_batch_size, cfg.seed, "bissl-upper",
                                      field="upper_batch_size", keep_partial=keep)
        self._check_partial_batches()
        self.stage = 0                 # finished stages
        self.lower_step = 0            # finished lower optimiser steps (schedule counter)
        self.upper_step = 0
        self.head_warm = cfg.head_warmup_epochs == 0
        self.history: list[dict] = []  # stage records
        self.last_pretext_grad = None  # ∇_θP L_P of the last lower step (alignment diagnostics)
        self._stage_lower_idx: list[torch.Tensor] = []
        # called as solve_observer(operator, v, solution) after every hypergradient solve; lets a benchmark
        # or a notebook inspect the linear systems without changing the run
        self.solve_observer: Callable | None = None
        if self.run_dir is not None:
            self.run_dir.open()  # every check passed: now the folder is ours (a second process is refused)

    def _check_partial_batches(self) -> None:
        """Refuse, before any step, a kept last batch that the run cannot use: one of a single sample
        where BatchNorm must normalise it, or, under torchrun, a pretext batch that does not split into
        equal shards (the gathered NT-Xent needs them) and that the run will draw. Downstream batches
        may split unevenly: each rank's loss is then weighted by its part (``distributed.split``)."""
        c = self.cfg
        levels = (("lower_batch_size", self.lower_it, "pretext", (self.lower,)),
                  ("upper_batch_size", self.upper_it, "downstream", (self.lower.backbone, self.upper, self.head)))
        for field, it, what, modules in levels:
            if it.partial == 1 and any(_has_batchnorm(m) for m in modules):
                raise ConfigError(f"{field}={it.batch_size} with partial_batch='keep' leaves a last batch of 1 "
                                  f"{what} item ({it.n} = {it.n // it.batch_size}·{it.batch_size} + 1), which "
                                  f"BatchNorm cannot normalise; choose another {field} or partial_batch='drop'")
        w = distributed.world_size()
        if self.lower_it.partial % w and self.lower_it.draws_partial(self.stage, c.stages, c.lower_steps):
            raise ConfigError(f"lower_batch_size={c.lower_batch_size} with partial_batch='keep' draws a last batch of "
                              f"{self.lower_it.partial} pretext pairs, which does not split into {w} equal shards; "
                              f"choose a lower_batch_size that leaves a multiple of {w} (or none), or "
                              "partial_batch='drop'")

    def _distributed_setup(self) -> None:
        """Under torchrun: equal shards of every global batch, SyncBatchNorm if asked, identical
        replicas. The gradients are averaged by hand (distributed.all_reduce_mean_ / reduce_mean)
        rather than by DistributedDataParallel, because DDP's hooks fire only in ``backward()`` of
        its own forward: they miss ``torch.autograd.grad`` (v, the upper gradients) and the double
        backward of every Hessian-vector product, which is how the official V1/V2 code ended up with
        unsynchronised upper gradients (spec C6)."""
        c = self.cfg
        if not distributed.is_distributed():
            return
        for size, what in ((c.lower_batch_size, "lower_batch_size"), (c.upper_batch_size, "upper_batch_size")):
            try:
                distributed.check_divisible(size, what)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if c.sync_bn:
            for m in (self.lower, self.upper, self.head):
                distributed.convert_sync_batchnorm(m)
        distributed.broadcast_module(self.lower, self.upper, self.head)

    def _views(self, idx: torch.Tensor, tag: tuple):
        """This rank's shard of the two views of the global pretext batch ``idx`` (the whole batch
        in one process)."""
        v1, v2 = self.data.pretext_views(idx, tag)
        return distributed.shard(v1), distributed.shard(v2)

    def _downstream(self, idx: torch.Tensor, tag: tuple):
        """This rank's part of a downstream batch and the weight of its mean loss (1 in one process and
        for equal shards; a kept partial batch may split unevenly, see :func:`distributed.split`)."""
        x, y = self.data.downstream_batch(idx, tag)
        if len(x) % distributed.world_size() == 0:
            return distributed.shard(x), distributed.shard(y), 1.0
        (x, y), weight = distributed.split(x, y)
        return x, y, weight

    def _sync_buffers(self) -> None:
        """Per-shard BatchNorm running statistics averaged across ranks (replicas stay identical)."""
        if not self.cfg.sync_bn:
            distributed.average_buffers(self.lower, self.upper, self.head)

    @property
    def lower_warmup(self) -> int:
        """The lower warm-up in steps: ``lower_warmup``, or V1's passes over the pretext loader (10·len(loader))."""
        c = self.cfg
        return c.lower_warmup if c.lower_warmup is not None else c.lower_warmup_passes * self.lower_it.per_epoch

    @property
    def upper_steps(self) -> int:
        """Upper steps per stage as run: N_U, or fewer for a short downstream loader (``upper_short_loader``)."""
        c = self.cfg
        return upper_steps_per_stage(c.upper_steps, self.upper_it.per_epoch, c.upper_short_loader)

    # ---- schedules (spec §1.7): lower warm-up + cosine over T·N_L, upper cosine over T·N_U --------------
    def lower_lr(self, step: int) -> float:
        c = self.cfg
        return warmup_cosine(step, base_lr=c.lower_lr, warmup=self.lower_warmup, total=c.stages * c.lower_steps,
                             official_first_step=c.official_first_step)

    def upper_lr(self, step: int) -> float:
        c = self.cfg
        return warmup_cosine(step, base_lr=c.upper_lr, warmup=0, total=c.stages * c.upper_steps,
                             official_first_step=c.official_first_step)

    # ---- the pieces of a stage ----------------------------------------------------------------------
    def warm_up_head(self) -> Iterator[dict]:
        """Linear head φ_D on the frozen θ_D, SGD without schedule; θ_D in train mode, so its BN running
        statistics adapt to the downstream data as in the official code (spec §2.1)."""
        c = self.cfg
        opt = torch.optim.SGD(self.head.parameters(), lr=c.upper_lr, momentum=c.upper_momentum,
                              weight_decay=c.upper_weight_decay)
        it = LevelIterator(self.data.n_downstream, c.upper_batch_size, c.seed, "bissl-head-warmup",
                           keep_partial=c.partial_batch == "keep")
        self.upper.train()
        for epoch in range(c.head_warmup_epochs):
            it.epoch, it.pos = epoch, 0
            losses = []
            for b in range(it.per_epoch):
                x, y, weight = self._downstream(it.next(), ("head", epoch, b))
                with torch.no_grad():
                    feats = self.upper(x)
                loss = _weighted(F.cross_entropy(self.head(feats), y), weight)
                value = distributed.mean_value(loss.detach())
                if not torch.isfinite(value) and c.nonfinite_loss == "raise":
                    raise FloatingPointError(f"head warm-up loss is {value.item()} at epoch {epoch + 1}, step {b + 1} "
                                             f"(upper_lr {c.upper_lr:g}); no checkpoint of this run was written")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                distributed.all_reduce_mean_(list(self.head.parameters()))
                opt.step()
                losses.append(value.item())
            self._sync_buffers()
            rec = {"kind": "head_warmup", "epoch": epoch + 1, "loss": sum(losses) / len(losses)}
            if (epoch + 1) % max(c.head_warmup_epochs // 5, 1) == 0 or epoch + 1 == c.head_warmup_epochs:
                rec.update(self.evaluate())
            yield rec
        self.head_warm = True

    def lower_phase(self) -> Iterator[dict]:
        c = self.cfg
        self.lower.train()
        theta_d = [p.detach() for p in self.upper.parameters()]
        for k in range(c.lower_steps):
            lr = self.lower_lr(self.lower_step)
            set_lr(self.lower_opt, lr)
            idx = self.lower_it.next()
            self._stage_lower_idx.append(idx)
            v1, v2 = self._views(idx, ("lower", self.lower_step))
            self.lower.update_target()  # BYOL: EMA at the start of each forward (spec §1.6); SimCLR: no-op
            pretext = self.lower.loss(v1, v2)
            reg = 0.5 * c.lam * sum(((p - d) ** 2).sum() for p, d in zip(self.lower.backbone.parameters(), theta_d))
            pretext_value = distributed.mean_value(pretext.detach())  # the global batch's loss
            self._check_finite(pretext_value, "lower pretext loss", k)
            self.lower_opt.zero_grad(set_to_none=True)
            (pretext + reg).backward()
            distributed.all_reduce_mean_(list(self.lower.parameters()))  # reg is the same on every rank
            # the pretext part of the gradient, for the alignment diagnostics: ∇L_P = ∇(L_P + reg) − λ(θ_P − θ_D)
            self.last_pretext_grad = [p.grad.detach() - c.lam * (p.detach() - d)
                                      for p, d in zip(self.lower.backbone.parameters(), theta_d)]
            if c.lower_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.lower.parameters(), c.lower_clip)
            self.lower_opt.step()
            self.lower_step += 1
            yield {"kind": "lower", "stage": self.stage + 1, "step": k + 1, "lower_step": self.lower_step,
                   "pretext_loss": pretext_value.item(), "reg_loss": reg.item(), "lr": lr}

    def hessian_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The stage's Hessian batch(es), as pretext view pairs (spec §1.6, C1)."""
        c = self.cfg
        if c.hessian_batch == "fresh":
            idx = self.lower_it.first(c.hessian_batches)
        elif c.hessian_batch == "lower":
            idx = self._stage_lower_idx[:c.hessian_batches]
        else:
            g = generator(c.seed, "hessian-random", self.stage)
            idx = [torch.randperm(self.data.n_pretext, generator=g)[:c.lower_batch_size]
                   for _ in range(c.hessian_batches)]
        return [self._views(i, ("hessian", self.stage, j)) for j, i in enumerate(idx)]

    def hessian_operator(self) -> Callable:
        """A(d) = d + H̄d/(λ+δ), H̄ averaged over the Hessian batches."""
        c = self.cfg
        params = dict(self.lower.backbone.named_parameters())
        # under torchrun each product is the mean over ranks of the per-rank products: the global H d
        ops = [rank_mean(HessianOperator(lambda b: self.lower.loss(*b), params, batch, mode=c.hvp,
                                         lam=c.lam, damping=c.damping, bn_stats=c.bn_stats, module=self.lower))
               for batch in self.hessian_batches()]
        return ops[0] if len(ops) == 1 else AveragedOperator(ops)

    def upper_phase(self) -> Iterator[dict]:
        c = self.cfg
        self.lower.train()
        self.upper.train()
        self.head.train()
        op = self.hessian_operator()
        opts = dict(solver=c.solver, max_iter=c.solver_iters, rtol=c.cg_rtol, warm_start=c.warm_start,
                    nonfinite=c.nonfinite)
        solver = HypergradientSolver(op, **opts)
        theta_p = list(self.lower.backbone.parameters())
        theta_d = list(self.upper.parameters())
        phi_d = list(self.head.parameters())
        try:
            for k in range(self.upper_steps):
                lr = self.upper_lr(self.upper_step)
                for group in self.upper_opt.param_groups:
                    group["lr"] = lr
                x_in, y, weight = self._downstream(self.upper_it.next(), ("upper", self.upper_step))
                # implicit term: the upper head on the lower backbone
                with isolated_bn_buffers(self.lower.backbone, keep_updates=c.bn_stats == "update"):
                    implicit_loss = _weighted(F.cross_entropy(self.head(self.lower.backbone(x_in)), y), weight)
                implicit_value = distributed.mean_value(implicit_loss.detach())
                self._check_finite(implicit_value, "upper implicit loss", k)
                grads = distributed.reduce_mean(torch.autograd.grad(implicit_loss, theta_p + phi_d))
                v, g_head_implicit = grads[:len(theta_p)], grads[len(theta_p):]
                try:
                    sol = solver.solve(v)
                except NonFiniteError as e:
                    raise FloatingPointError(f"hypergradient solve is non-finite at stage {self.stage + 1}, upper step "
                                             f"{k + 1} ({e}); nonfinite='zero' would replace it by 0 (the official "
                                             f"behaviour); the last good checkpoint is kept in {str(self.out_dir)!r}") from e
                if self.solve_observer is not None:
                    self.solve_observer(op, v, sol)
                # classic term: the upper model itself
                classic_loss = _weighted(F.cross_entropy(self.head(self.upper(x_in)), y), weight)
                classic_value = distributed.mean_value(classic_loss.detach())
                self._check_finite(classic_value, "upper classic loss", k)
                g_classic = distributed.reduce_mean(torch.autograd.grad(classic_loss, theta_d + phi_d))
                g_theta = [xi + c.gamma * gi for xi, gi in zip(sol.x, g_classic[:len(theta_d)])]
                g_phi = [hi + c.gamma * gi for hi, gi in zip(g_head_implicit, g_classic[len(theta_d):])]
                for p, g in zip(theta_d + phi_d, g_theta + g_phi):
                    p.grad = g.detach().clone()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.upper_params, c.upper_clip) \
                    if c.upper_clip is not None else torch.tensor(_flat_norm(g_theta + g_phi))
                self.upper_opt.step()
                self.upper_step += 1
                yield {"kind": "upper", "stage": self.stage + 1, "step": k + 1, "upper_step": self.upper_step,
                       "implicit_loss": implicit_value.item(), "classic_loss": classic_value.item(), "lr": lr,
                       "cg_residuals": [float(sol.initial_residual_norm)] + [float(r) for r in sol.residual_norms],
                       "v_norm": _flat_norm(v), "cg_iterations": sol.iterations,
                       "cg_converged": bool(sol.converged), "cg_seconds": sol.seconds,
                       "cg_nonfinite": sol.n_nonfinite, "cg_negative_curvature": bool(sol.negative_curvature),
                       "grad_norm": float(grad_norm),
                       "distance": self.distance(), **self.alignment(sol.x, g_classic[:len(theta_d)])}
        finally:
            solver.release()

    def alignment(self, x, g_classic) -> dict:
        """Cosines, total and per layer: implicit hypergradient x vs classic ∇_θD L_D, and x vs the
        lower pretext gradient ∇_θP L_P of the last lower step."""
        out = {"cos_implicit_classic": cosine(x, g_classic),
               "cos_implicit_classic_layers": [cosine([x[i] for i in idx], [g_classic[i] for i in idx])
                                               for _, idx in self.groups]}
        if self.last_pretext_grad is not None:
            g = self.last_pretext_grad
            out["cos_implicit_pretext"] = cosine(x, g)
            out["cos_implicit_pretext_layers"] = [cosine([x[i] for i in idx], [g[i] for i in idx])
                                                  for _, idx in self.groups]
        return out

    def distance(self) -> float:
        """‖θ_P − θ_D‖ over the backbone parameters."""
        return _flat_norm([p.detach() - d.detach() for p, d in zip(self.lower.backbone.parameters(),
                                                                   self.upper.parameters())])

    @torch.no_grad()
    def evaluate(self, batch_size: int = 512) -> dict:
        """Top-1/top-5 of the upper model (θ_D, φ_D) on the val split, eval mode."""
        if self.data.val is None:
            return {}
        x, y = self.data.val
        n = len(x)
        if distributed.is_distributed():  # each rank its disjoint part (≥ 1 sample); counts summed (spec C12)
            if n < distributed.world_size():
                raise ValueError(f"the val split has {n} samples, fewer than the {distributed.world_size()} ranks")
            part = distributed.eval_slice(n)
            x, y = x[part], y[part]
        self.upper.eval()
        self.head.eval()
        try:
            logits = torch.cat([self.head(self.upper(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])
        finally:
            self.upper.train()
            self.head.train()
        if not distributed.is_distributed():
            acc = accuracy_topk(logits, y)
            return {"val_top1": acc[1], "val_top5": acc[5], "val_loss": F.cross_entropy(logits, y).item()}
        m = distributed.union_metrics(logits, y, n)
        return {"val_top1": m["top1"], "val_top5": m["top5"], "val_loss": m["loss"]}

    def _check_finite(self, value: torch.Tensor, what: str, step: int) -> None:
        if not torch.isfinite(value) and self.cfg.nonfinite_loss == "raise":
            raise FloatingPointError(f"{what} is {value.item()} at stage {self.stage + 1}, step {step + 1}; "
                                     f"the last good checkpoint is kept in {str(self.out_dir)!r}")

    # ---- the loop --------------------------------------------------------------------------------------
    def run(self, stages: int | None = None, *, replay: bool = False) -> Iterator[dict]:
        """Run ``stages`` more stages (default: up to ``cfg.stages``), yielding every record.

        ``replay=True`` first yields the records a resumed run logged before (so a re-executed
        notebook redraws the whole history). Stages past ``cfg.stages`` keep the schedules at their
        final values."""
        if self.run_dir is not None:
            self.run_dir.open()
        try:
            yield from self._run(stages, replay)
        finally:  # the folder is free for others once the run ends or stops
            if self.run_dir is not None:
                self.run_dir.close()

    def _run(self, stages: int | None, replay: bool) -> Iterator[dict]:
        c = self.cfg
        if replay and self.log is not None:
            yield from self.log.records()
        target = c.stages if stages is None else self.stage + stages
        if not self.head_warm:
            for rec in self.warm_up_head():
                self._log(rec)
                yield rec
            rec = {"kind": "stage", "stage": 0, **self.evaluate(), "distance": self.distance()}
            self.history.append(rec)
            self._log(rec)
            self.save()
            yield rec
        bar = progress_bar(c.progress and distributed.is_main(), total=target, initial=self.stage,
                           desc="BiSSL stages", unit="stage")
        while self.stage < target:
            t0 = time.perf_counter()
            self.lower_it.begin_stage(self.stage, c.lower_steps)
            self.upper_it.begin_stage(self.stage, self.upper_steps)
            self._stage_lower_idx = []
            lower_recs = []
            for rec in self.lower_phase():
                lower_recs.append(rec)
                yield rec
            upper_recs = []
            for rec in self.upper_phase():
                upper_recs.append(rec)
                yield rec
            self.stage += 1
            self._sync_buffers()
            rec = {"kind": "stage", "stage": self.stage, "seconds": time.perf_counter() - t0,
                   **self.evaluate(), "distance": self.distance(),
                   "pretext_loss": _mean(r["pretext_loss"] for r in lower_recs),
                   "implicit_loss": _mean(r["implicit_loss"] for r in upper_recs),
                   "classic_loss": _mean(r["classic_loss"] for r in upper_recs),
                   # entries of the hypergradient replaced by nan_to_num (nonfinite='zero'); 0 means none
                   "cg_nonfinite": sum(r["cg_nonfinite"] for r in upper_recs)}
            self.history.append(rec)
            for r in lower_recs + upper_recs:
                self._log(r)
            self._log(rec)
            self.save()
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{rec[k]:.3g}" for k in ("val_top1", "implicit_loss") if k in rec})
            yield rec
        if bar is not None:
            bar.close()

    # ---- persistence -----------------------------------------------------------------------------------
    def state(self) -> dict:
        """What resuming needs besides the two backbones (saved by role, see :meth:`save`)."""
        rest = {k: v for k, v in self.lower.state_dict().items() if not k.startswith("backbone.")}
        return {"lower_rest": rest, "head": self.head.state_dict(), "num_classes": self.data.num_classes,
                "lower_opt": self.lower_opt.state_dict(), "upper_opt": self.upper_opt.state_dict(),
                "lower_it": self.lower_it.state(), "upper_it": self.upper_it.state(), "stage": self.stage,
                "lower_step": self.lower_step, "upper_step": self.upper_step, "head_warm": self.head_warm,
                "last_pretext_grad": self.last_pretext_grad, "history": self.history}

    def load_state(self, backbones: dict, s: dict) -> None:
        self.lower.load_state_dict({**{"backbone." + k: v for k, v in backbones["lower"].items()}, **s["lower_rest"]})
        self.upper.load_state_dict(backbones["upper"])
        self.head.load_state_dict(s["head"])
        self.lower_opt.load_state_dict(s["lower_opt"])
        self.upper_opt.load_state_dict(s["upper_opt"])
        self.lower_it.load(s["lower_it"])
        self.upper_it.load(s["upper_it"])
        self.stage, self.lower_step, self.upper_step = s["stage"], s["lower_step"], s["upper_step"]
        self.head_warm, self.last_pretext_grad, self.history = s["head_warm"], s["last_pretext_grad"], s["history"]

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir.checkpoint_path

    def save(self) -> None:
        if self.run_dir is None:
            return
        sig = getattr(self.lower.backbone, "signature", None)  # the kit's ResNets; a toy backbone has no recipe
        self.run_dir.save(step=self.stage, backbone=recipe_of(self.lower.backbone) if sig else {"builder": None},
                          backbones={"lower": self.lower.backbone.state_dict(), "upper": self.upper.state_dict()},
                          state=self.state())

    def resume(self) -> bool:
        """Load the run folder's checkpoint if it holds one of this run (True); otherwise start a fresh log."""
        if self.run_dir is None:
            return False
        recipe = recipe_of(self.lower.backbone) if hasattr(self.lower.backbone, "signature") else {"builder": None}
        try:  # a killed stage's records go
            ckpt = self.run_dir.resume(lambda ck: lambda r: r.get("stage", 0) <= ck["step"], recipe=recipe)
        except BaseException:
            self.run_dir.close()
            raise
        if ckpt is None:
            return False
        self.load_state(ckpt["backbones"], ckpt["state"])
        return True

    # fields a fork cannot change: they fix the data, the batches or the models the state belongs to
    FIXED_IN_FORK = ("pretrain_checkpoint", "downstream", "labels_per_class", "seed", "lower_batch_size",
                     "upper_batch_size", "partial_batch", "head_warmup_epochs", "sync_bn")

    def fork(self, cfg: BisslConfig) -> Path | None:
        """Go on under ``cfg`` in a new run folder that records this run's folder and the stage it branched
        at (:meth:`bissl_kit.rundir.RunDir.fork`); this folder keeps the stages run so far and their config.
        Returns the new folder (None for an in-memory run, whose config is simply replaced)."""
        fixed = [f"{k}: {getattr(self.cfg, k)!r} → {getattr(cfg, k)!r}" for k in self.FIXED_IN_FORK
                 if getattr(cfg, k) != getattr(self.cfg, k)]
        if fixed:
            raise ConfigError(f"a running BiSSL stage cannot change {'; '.join(fixed)}; start a new run instead")
        for group in self.upper_opt.param_groups:
            group.update(momentum=cfg.upper_momentum, weight_decay=cfg.upper_weight_decay)
        for group in self.lower_opt.param_groups:
            group.update(momentum=cfg.lower_momentum, weight_decay=cfg.lower_weight_decay)
        self.lower.pretext_forward = cfg.pretext_forward
        if self.run_dir is None:
            self.cfg = cfg
            return None
        new = self.run_dir.fork(cfg, step=self.stage)
        self.run_dir.close()
        self.run_dir = new.open()
        self.cfg, self.out_dir, self.log = new.cfg, new.path, new.log if distributed.is_main() else None
        self.save()  # the fork's folder starts at the branch point
        return new.path

    def _log(self, rec: dict) -> None:
        if self.log is not None:
            self.log.append(rec)


def upper_steps_per_stage(upper_steps: int, batches: int, rule: str) -> int:
    """Upper steps a stage takes when the downstream loader has ``batches`` < N_U batches (spec §2.5):
    'cycle' N_U (V3), 'truncate' N_U // L (V1, C9: Flowers gets 2, DTD 1), 'whole_passes' ⌊N_U/L⌋·L (V2)."""
    if batches >= upper_steps or rule == "cycle":
        return upper_steps
    if rule == "truncate":
        return upper_steps // batches
    return upper_steps // batches * batches


def _weighted(loss: torch.Tensor, weight: float) -> torch.Tensor:
    """A rank's mean loss on the scale of the global batch's (``weight`` 1: unchanged, bit for bit)."""
    return loss if weight == 1.0 else loss * weight


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._NormBase) for m in module.modules())


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")



# ---- set-up from a config: the pre-training checkpoint and the embedded or paper data --------------------

def build_data(cfg: BisslConfig, pre_cfg, device: torch.device) -> BilevelData:
    """Pretext views as in pre-training (same augmentation), downstream train crops + flips, and the
    normalised val split, all on ``device``."""
    from . import data as data_mod
    from .augment import augment, downstream_train_spec, normalize, two_views
    from .pretrain import pretext_view_specs

    images = data_mod.load_pretext(pre_cfg.pretext_dataset, root=cfg.data_root, image_size=pre_cfg.image_size)
    channels = images.shape[1]
    views = pretext_view_specs(pre_cfg, channels)
    train = data_mod.load_downstream(cfg.downstream, "train", root=cfg.data_root, image_size=pre_cfg.image_size,
                                     labels_per_class=cfg.labels_per_class).materialize()
    val = data_mod.load_downstream(cfg.downstream, "val", root=cfg.data_root,
                                   image_size=pre_cfg.image_size).materialize()
    if train.images.shape[1] != channels:
        raise ConfigError(f"downstream={cfg.downstream!r} has {train.images.shape[1]} channels but the "
                          f"pre-trained backbone takes {channels}")
    down_spec = downstream_train_spec(pre_cfg.image_size, channels, paper=pre_cfg.paper_augment)
    mean, std = views[0].mean, views[0].std

    def pretext_views(idx, tag):
        return two_views(images[idx].to(device), *views, generator(cfg.seed, "bissl-views", *tag))

    def downstream_batch(idx, tag):
        x = augment(train.images[idx].to(device), down_spec, generator(cfg.seed, "bissl-down", *tag))
        return x, train.labels[idx].to(device)

    return BilevelData(len(images), len(train.labels), pretext_views, downstream_batch,
                       val=(normalize(val.images.to(device), mean, std), val.labels.to(device)),
                       num_classes=train.num_classes)


def build_trainer(cfg: BisslConfig, *, resume: bool = True) -> BisslTrainer:
    """θ_P, φ_P from the pre-training checkpoint; θ_D a copy of θ_P; a fresh linear head φ_D;
    the data; and, when the run directory holds a checkpoint of this config, its state."""
    from .models import linear_head
    from .pretrain import load_pretrained

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
    trainer = BisslTrainer(cfg, lower.to(device), upper.to(device), head.to(device), data, device=device,
                           out_dir=cfg.out_dir, identity={"pretrain_checkpoint": signature},
                           lineage={"pretrain_config": pre_cfg.to_dict(),
                                    "init": {"checkpoint": str(cfg.pretrain_checkpoint), "signature": signature}})
    if resume:
        trainer.resume()
    return trainer


def load_lower_backbone(path: str | Path):
    """θ_P of a BiSSL checkpoint (the stage's result, to be fine-tuned) and the pre-training config
    that describes its architecture."""
    from .backbones import load_backbone
    loaded = load_backbone(path, "lower")
    if loaded.kind != CHECKPOINT_KIND:
        raise CheckpointError(f"{str(path)!r} holds a {loaded.kind!r} checkpoint, expected 'bissl'")
    return loaded.backbone, loaded.pretrain_config
