"""The pre-training stage's config (:class:`PretrainConfig`): every field with its default, range and help,
the paper presets, and how a config saved by an earlier version reads (``SAVED_DEFAULTS``, ``SAVED_NONE``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

from . import speed
from .backbones import ARCH_RULE, KIT_ARCHS, check_arch
from .config import Config, ConfigError, device_param, param
from .data.pretext import check_pretext_name
from .data.registry import check_dataset_name
from .pretext import METHODS, PRETEXT_FORWARDS


@dataclass(frozen=True)
class PretrainConfig(Config):
    # Data
    pretext_dataset: str = param("fashion_mnist", "pretext images (labels unused): 'fashion_mnist' (in memory), 'stl10', "
                                 "'stl10+train', 'cifar10', 'cifar100', 'imagenet' or a folder of images given as a "
                                 "path (streamed; docs/data.md)", check=check_pretext_name)
    loader_workers: int | None = param(None, "processes decoding a streamed pretext set ahead of training; 0 = in the "
                                       "training process; None = the CPUs, up to 8", low=0, resumable=True)
    pin_memory: bool = param(True, "pin a streamed set's batches in page-locked memory when training on a GPU",
                             resumable=True)
    prefetch_factor: int = param(2, "batches each loader worker decodes ahead", low=1, resumable=True)
    data_root: str | None = param(None, "dataset root; None searches $BISSL_DATA, data/, the Debian package", resumable=True)
    # 16 px: a SimCLR step costs ~4x less than at 28 px, and the digits are 8x8 to begin with
    image_size: int = param(16, "side of the square training images, in pixels", low=8, high=512)
    # Model
    arch: str = param("resnet18", f"backbone architecture: {ARCH_RULE} (bissl_kit.backbones)", check=check_arch)
    width: int = param(16, "channels of layer1 of the kit's ResNets (64 = standard ResNet, 16 = narrow CPU default)",
                       low=1, high=512)
    small_stem: bool = param(True, "the kit's ResNets: 3×3 stride-1 stem without max-pool (for small images)")
    method: str = param("simclr", "pretext method", choices=METHODS)
    temperature: float = param(0.2, "SimCLR NT-Xent temperature τ (the paper: 0.5)", low=0, low_inclusive=False)
    byol_ema: float = param(0.99, "BYOL target EMA momentum", low=0, high=1, high_inclusive=False)
    proj_hidden: int = param(256, "projector hidden width", low=1)
    proj_dim: int = param(256, "projector output width", low=1)
    # the official algorithm (spec §2.3, §2.5); on the embedded benchmark 'joint' was no faster and its k-NN
    # no better (experiments/pretext_forward/README.md)
    pretext_forward: str = param("per_view", "the two views through backbone and projector: 'per_view' (official: "
                                 "one forward per view, BatchNorm statistics per view) or 'joint' (one forward of "
                                 "both, BatchNorm statistics over the two views mixed)", choices=PRETEXT_FORWARDS)
    partial_batch: str = param("keep", "the last batch of an epoch when batch_size does not divide the pretext set: "
                               "'keep' (official DataLoader) or 'drop'", choices=("keep", "drop"))
    # Augmentation
    crop_scale: tuple[float, float] = param((0.3, 1.0), "random-resized-crop area fraction range", low=0, high=1)
    # None = the chain's own value. The embedded 1-channel chain has no flip (digits, the embedded
    # downstream task, are chiral: mirror invariance is a wrong prior for them, and Fashion-MNIST items
    # are mostly mirror-symmetric, so a flip adds little pretext signal; experiments/pretrain_knn/README.md
    # has the measurement); the paper's chain keeps its flip 0.5.
    flip_p: float | None = param(None, "probability of a horizontal flip per view; None = the chain's own "
                                 "(embedded 1-channel 0, RGB and paper 0.5)", low=0, high=1)
    # Ours, not the paper's: the digits are 8×8 images upscaled, the pretext images sharp.
    lowres_p: float | None = param(None, "probability of a low-resolution view (resize to r×r and back); None = "
                                   "the chain's own (embedded 1-channel 0.5, else 0)", low=0, high=1)
    lowres_size: tuple[int, int] | None = param(None, "range (min, max) of the low resolution r, pixels; None = "
                                                "the chain's own ((6, 12), capped at image_size)", low=1)
    paper_augment: bool = param(False, "the paper's §2.4 augmentation chain instead of the embedded one")
    # Optimisation
    # 200: the embedded run fits the 4-minute budget of `make demo` on a shared 2-core CPU (300 did not), and
    # the digits k-NN (pretext BN) is already ~8 points above random init (experiments/pretrain_knn/README.md)
    steps: int = param(200, "optimiser steps (batches of `batch_size` image pairs)", low=1)
    batch_size: int = param(256, "image pairs per step (global batch)", low=2)
    lr: float = param(1.2, "LARS base learning rate", low=0, low_inclusive=False)
    weight_decay: float = param(1e-6, "LARS weight decay", low=0)
    momentum: float = param(0.9, "LARS momentum", low=0, high=1, high_inclusive=False)
    warmup_steps: int = param(30, "linear warm-up steps before the cosine decay", low=0)
    clip_grad_norm: float | None = param(None, "clip the global gradient norm to this value; None = no clipping",
                                         low=0, low_inclusive=False)
    official_first_step: bool = param(False, "the schedule's first step at the full base lr, as the official "
                                      "scheduler (spec C13); False: the first step is the first warm-up step")
    init_checkpoint: str | None = param(None, "start from this pre-training checkpoint's weights instead of a random "
                                        "initialisation (a continued run; the architecture fields must match it)",
                                        resumable=True)
    bf16: bool = speed.bf16_param()
    channels_last: bool = speed.channels_last_param()
    compile: bool = speed.compile_param()
    sync_bn: bool = param(False, "under torchrun: BatchNorm over the global batch (SyncBatchNorm, as the paper's "
                          "pre-training) instead of per-rank shards; no effect in one process", resumable=True)
    # Monitoring
    eval_dataset: str = param("digits", "labelled set for the k-NN monitor (its train → val splits): a dataset "
                              "name, a registered one or a task folder path", check=check_dataset_name)
    eval_labels_per_class: int | None = param(None, "labelled train images per class of the k-NN monitor; "
                                              "None = the whole train split", low=1)
    knn_every: int = param(100, "k-NN accuracy every this many steps (and at the end); 0 = only at the end",
                           low=0, resumable=True)
    knn_k: int = param(20, "neighbours of the weighted k-NN monitor", low=1)
    knn_temperature: float = param(0.07, "temperature of the weighted k-NN vote", low=0, low_inclusive=False)
    knn_bn: str = param("pretext", "BN statistics of the k-NN features: 'pretext' = re-estimated on a copy over "
                        "5,120 fixed un-augmented pretext images (random init alike), 'running' = as the "
                        "backbone holds them (identity BN at random init); records carry both",
                        choices=("pretext", "running"))
    # Running
    seed: int = param(0, "seed of batch order, augmentations and initialisation", low=0)
    device: str = device_param()
    out_dir: str = param("runs/pretrain", "run directory: checkpoint, metrics, config", resumable=True)
    checkpoint_every: int = param(50, "write the checkpoint every this many steps (and at the end)", low=1, resumable=True)
    progress: bool = param(True, "show a tqdm progress bar", resumable=True)

    def check(self):
        if self.arch not in KIT_ARCHS:  # width and the stem are the kit's ResNets' own knobs: never silently ignored
            fields = {f.name: f.default for f in dataclasses.fields(self) if f.name in ("width", "small_stem")}
            changed = [f"{k}={getattr(self, k)!r}" for k, d in fields.items() if getattr(self, k) != d]
            if changed:
                defaults = " ".join(f"{k}={d!r}" for k, d in fields.items())
                raise ConfigError(f"{', '.join(changed)}: width and small_stem apply to the kit's ResNets "
                                  f"({', '.join(KIT_ARCHS)}) only, and arch={self.arch!r} builds its own network; set "
                                  f"them to their unused defaults ({defaults}) or choose one of the kit's ResNets")
        if self.crop_scale[0] > self.crop_scale[1] or self.crop_scale[0] <= 0:
            raise ConfigError(f"crop_scale={self.crop_scale!r} must be (low, high) with 0 < low <= high <= 1")
        # a continued run mirrors another schedule (the BiSSL lower level's), whose warm-up may outlast it
        if self.warmup_steps >= self.steps and self.init_checkpoint is None:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be < steps={self.steps}")
        if self.lowres_size is not None and not (self.lowres_size[0] <= self.lowres_size[1] <= self.image_size):
            raise ConfigError(f"lowres_size={self.lowres_size!r} must be (min, max) with 1 <= min <= max <= "
                              f"image_size={self.image_size}")

    # the paper's settings (bissl_kit.presets, each value with its spec §); options given override them
    @classmethod
    def paper_iclr(cls, *, baseline: bool = False, **overrides) -> "PretrainConfig":
        """V1: ResNet-18, SimCLR on STL10 unlabeled+train at 96 px, 500 epochs (600 with ``baseline=True``)."""
        from .presets import pretrain_values
        return cls.from_dict({**pretrain_values("iclr", baseline=baseline), **overrides})

    @classmethod
    def paper_neurips(cls, *, method: str = "simclr", **overrides) -> "PretrainConfig":
        """V3: ResNet-50, SimCLR or BYOL (EMA 0.9995) on ImageNet at 96 px, 500 epochs."""
        from .presets import pretrain_values
        return cls.from_dict({**pretrain_values("neurips", method=method), **overrides})

    # what a saved config without these fields (written before they existed) ran with
    SAVED_DEFAULTS: ClassVar[dict] = {"lowres_p": 0.0, "knn_bn": "running", "pretext_forward": "joint",
                                      "partial_batch": "drop", "official_first_step": False, "init_checkpoint": None}
    # between 4bfaaad and 6f9ba7b (2026-12-01) None meant the augmentation chain's own choice
    SAVED_NONE: ClassVar[dict] = {"pretext_forward": lambda v: "per_view" if v.get("paper_augment") else "joint",
                                  "partial_batch": lambda v: "keep" if v.get("paper_augment") else "drop"}

    # the fields a continued run must share with the run it continues (the network and what it sees)
    ARCHITECTURE: ClassVar[tuple] = ("pretext_dataset", "image_size", "arch", "width", "small_stem", "method",
                                     "temperature", "byol_ema", "proj_hidden", "proj_dim", "crop_scale", "flip_p",
                                     "lowres_p", "lowres_size", "paper_augment")


def json_norm(v):
    """A value as JSON reads it back (tuples and lists alike)."""
    return json.loads(json.dumps(v))


def as_run(values: dict) -> dict:
    """A saved or current pre-training config as it ran: fields added since it was saved take
    ``PretrainConfig.SAVED_DEFAULTS``, so that two configs that train alike compare equal."""
    return PretrainConfig.from_saved(values).to_dict()
