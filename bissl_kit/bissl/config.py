"""The BiSSL stage's config: every field, the official values (paper mode) and the presets of each version.

:data:`PAPER_MODE` holds the official value of every field that changes the algorithm (spec §1.4–§1.7,
§2.3, §2.5); the field defaults are our default mode (:data:`FAST_MODE` lists them), and every
departure is documented in docs/paper_mode.md. :meth:`BisslConfig.paper_iclr` and
:meth:`BisslConfig.paper_neurips` are the V1 and V3 settings, derived from the sizes they are given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .. import data as data_mod
from .. import speed
from ..config import Config, ConfigError, device_param, param
from ..implicit import DEFAULT_ITERS, PAPER_SOLVER, RECOMMENDED_SOLVER, SOLVERS
from ..losses import MULTILABEL_LOSSES

CHECKPOINT_KIND = "bissl"

# the official values of every field that changes the algorithm (spec §1.4–§1.7, §2.3, §2.5); what
# differs between versions (γ, the lower warm-up, short downstream loaders) is set by the presets
PAPER_MODE = dict(solver=PAPER_SOLVER["solver"], solver_iters=PAPER_SOLVER["max_iter"], solver_rtol=PAPER_SOLVER["rtol"],
                  warm_start=PAPER_SOLVER["warm_start"], nonfinite=PAPER_SOLVER["nonfinite"], hvp="recompute",
                  hessian_batch="fresh", hessian_batches=1, bn_stats="update", official_first_step=True,
                  pretext_forward="per_view", partial_batch="keep", upper_short_loader="cycle",
                  nonfinite_loss="continue", multilabel_loss="softmax_ce")
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
    pretrain_checkpoint: str = param("runs/pretrain/checkpoint.pt",
                                     "pre-training checkpoint (θ_P, φ_P); θ_D starts as a copy of θ_P", resumable=True)
    downstream: str = param("digits", "downstream dataset: a name of bissl_kit.data.DATASETS (built-in or registered) "
                            "or a task folder path (docs/data.md)", check=data_mod.check_dataset_name)
    labels_per_class: int | None = param(None, "few-label train split: labelled images per class; None = all", low=1)
    data_root: str | None = param(None, "dataset root; None searches $BISSL_DATA, data/, the Debian package", resumable=True)
    loader_workers: int | None = param(None, "threads decoding a streamed pretext set's lower batches; None = the "
                                       "CPUs, up to 8", low=0, resumable=True)
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
    # the defaults are the implicit engine's RECOMMENDED_SOLVER (one MINRES iteration; docs/benchmarks.md)
    solver: str = param(RECOMMENDED_SOLVER["solver"], "'layerwise' (official per-tensor recursion), 'cg' (true "
                        "conjugate gradient), 'minres' (valid when A = I + H/(λ+δ) is indefinite) or 'none' (no solve: x = v, "
                        "the first-order approximation)",
                        choices=tuple(SOLVERS))
    solver_iters: int | None = param(None, "K: solver iterations; None = the solver's default (5 for 'layerwise' and "
                                     "'cg', the official count; 1 for 'minres')", low=1)
    solver_rtol: float | None = param(RECOMMENDED_SOLVER["rtol"], "stop CG or MINRES at this relative residual; "
                                      "None = run all K iterations", low=0, low_inclusive=False)
    warm_start: str = param(RECOMMENDED_SOLVER["warm_start"], "solver start: 'none' (x=0), 'previous' (last x), "
                            "'recycle' (Krylov subspace of the stage)", choices=("none", "previous", "recycle"))
    hvp: str = param("reuse", "'recompute' (official: rebuild the gradient graph per product) or 'reuse' (once per stage)",
                     choices=("recompute", "reuse"))
    hessian_batch: str = param("fresh", "'fresh': first batch(es) of a fresh lower iterator (official); "
                               "'lower': the stage's first lower batches; 'random': random batches",
                               choices=("fresh", "lower", "random"))
    hessian_batches: int = param(1, "batches the Hessian is averaged over (V1's dead code intended 5)", low=1)
    bn_stats: str = param("restore", "BatchNorm buffers of θ_P during the upper phase: 'update' (official drift) or 'restore'",
                          choices=("update", "restore"))
    nonfinite: str = param(RECOMMENDED_SOLVER["nonfinite"],
                     "non-finite hypergradient: 'raise' (stop, naming where) or 'zero' (official nan_to_num)",
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
    multilabel_loss: str = param("softmax_ce", "upper-level (and head warm-up) loss of a multi-label task (VOC07): "
                                 "softmax CE on the multi-hot vector (official, C15) or per-class sigmoid BCE; "
                                 "fine-tuning has the same field", choices=MULTILABEL_LOSSES)
    upper_clip: float | None = param(10.0, "clip norm of the upper gradients (θ_D, φ_D); None = off", low=0, low_inclusive=False)
    official_first_step: bool = param(True, "schedules run their first step at the full base lr (official, C13)")
    # Running
    seed: int = param(0, "seed of head init, batch order and augmentations", low=0)
    device: str = device_param()
    sync_bn: bool = param(False, "under torchrun: BatchNorm over the global batch (bissl_kit.distributed.SyncBatchNorm, "
                          "exact against one process) instead of per-rank shards (official); no effect in one process")
    # bissl_kit.speed: channels_last is valid here; bf16 and compile are not (double backward), and are errors
    channels_last: bool = speed.channels_last_param()
    bf16: bool = param(False, "not valid in the BiSSL stage (an error naming why; bissl_kit.speed)")
    compile: bool = param(False, "not valid in the BiSSL stage (an error naming why; bissl_kit.speed)")
    out_dir: str = param("runs/bissl", "run directory: checkpoint, metrics, config", resumable=True)
    progress: bool = param(True, "show a tqdm progress bar", resumable=True)

    @property
    def resolved_solver_iters(self) -> int:
        """K as run: ``solver_iters``, or the solver's default when it is None."""
        if self.solver == "none":  # no solve, so no iterations, whatever a template left in solver_iters
            return 0
        return self.solver_iters if self.solver_iters is not None else DEFAULT_ITERS[self.solver]

    def identity(self) -> dict:
        """As :meth:`Config.identity`, with K as run: a run of the solver's default K and one that names it agree."""
        return {**super().identity(), "solver_iters": self.resolved_solver_iters}

    def check(self):
        if self.solver == "none" and self.warm_start != "none":
            raise ConfigError(f"warm_start={self.warm_start!r} needs a solver; solver='none' (x = v) has no start")
        speed.check_bissl(self)
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

    # fields renamed since runs were saved; what a saved config without newer fields ran with
    RENAMED: ClassVar[dict] = {"cg_iters": "solver_iters", "cg_rtol": "solver_rtol"}
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
        """The CPU default on the offline data (digits downstream): the field defaults; ``paper_mode=True``
        switches the algorithm to the official one (:data:`PAPER_MODE`), everything else unchanged. Notebook
        02 and the command line build their configs here."""
        return cls.from_dict(_one_warmup({**(PAPER_MODE if paper_mode else {}), **overrides}, overrides))


def _one_warmup(values: dict, overrides: dict) -> dict:
    """The lower warm-up the caller set (in steps or in passes) replaces the other one."""
    if "lower_warmup" in overrides and "lower_warmup_passes" not in overrides:
        return {**values, "lower_warmup_passes": None}
    if "lower_warmup_passes" in overrides and "lower_warmup" not in overrides:
        return {**values, "lower_warmup": None}
    return values




# our default mode: the field defaults of the fields paper mode sets (single source: the fields above,
# whose solver defaults are the implicit engine's RECOMMENDED_SOLVER); docs/paper_mode.md says why each differs
FAST_MODE = {f.name: f.default for f in dataclasses.fields(BisslConfig) if f.name in PAPER_MODE}
