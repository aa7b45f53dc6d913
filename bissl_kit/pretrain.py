"""Stage 1: self-supervised pre-training (SimCLR or BYOL) with LARS and warm-up + cosine.

``Pretrainer(cfg).run()`` is a generator of per-step records, so a notebook can update a live plot
while the same code runs headless. The run writes into ``cfg.out_dir``:

* ``checkpoint.pt``: config, step, backbone/head/optimiser state (atomic; the run resumes from it);
* ``metrics.jsonl``: one JSON record per step (loss, lr) and per k-NN evaluation;
* ``config.json``: the config, for humans.

Every random draw (batch order, augmentations) comes from a generator derived from (seed, step), so
a resumed run is bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import data as data_mod
from . import distributed
from .augment import simclr_specs, two_views
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, param
from .evaluate import estimate_bn_stats, extract_features, knn_accuracy
from .models import ARCHS, build_backbone
from .optim import LARS, set_lr, warmup_cosine
from .pretext import METHODS, PRETEXT_FORWARDS, build_pretext
from .rng import generator, resolve_device
from .runlog import MetricsLog, config_conflicts, progress_bar

CHECKPOINT_KIND = "pretrain"


@dataclass(frozen=True)
class PretrainConfig(Config):
    # Data
    pretext_dataset: str = param("fashion_mnist", "pretext images (labels unused)", choices=("fashion_mnist",))
    data_root: str | None = param(None, "dataset root; None searches $BISSL_DATA, data/, the Debian package")
    # 16 px: a SimCLR step costs ~4x less than at 28 px, and the digits are 8x8 to begin with
    image_size: int = param(16, "side of the square training images, in pixels", low=8, high=512)
    # Model
    arch: str = param("resnet18", "backbone architecture", choices=tuple(ARCHS))
    width: int = param(16, "channels of layer1 (64 = standard ResNet, 16 = narrow CPU default)", low=1, high=512)
    small_stem: bool = param(True, "3×3 stride-1 stem without max-pool (for small images)")
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
    # are mostly mirror-symmetric, so a flip adds little pretext signal; measured +4.5 points of digits
    # k-NN at seed 0, benchmarks/experiments/pretrain_knn.md); the paper's chain keeps its flip 0.5.
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
    # the digits k-NN (pretext BN) is already ~8 points above random init (benchmarks/experiments/pretrain_knn.md)
    steps: int = param(200, "optimiser steps (batches of `batch_size` image pairs)", low=1)
    batch_size: int = param(256, "image pairs per step (global batch)", low=2)
    lr: float = param(1.2, "LARS base learning rate", low=0, low_inclusive=False)
    weight_decay: float = param(1e-6, "LARS weight decay", low=0)
    momentum: float = param(0.9, "LARS momentum", low=0, high=1, high_inclusive=False)
    warmup_steps: int = param(30, "linear warm-up steps before the cosine decay", low=0)
    clip_grad_norm: float | None = param(None, "clip the global gradient norm to this value; None = no clipping",
                                         low=0, low_inclusive=False)
    bf16: bool = param(False, "bfloat16 autocast for forward passes (≈1.5× faster on CPU)")
    sync_bn: bool = param(False, "under torchrun: BatchNorm over the global batch (SyncBatchNorm, as the paper's "
                          "pre-training) instead of per-rank shards; no effect in one process")
    # Monitoring
    eval_dataset: str = param("digits", "labelled set for the k-NN monitor (its train → val splits)",
                              choices=("digits", "fashion_mnist"))
    eval_labels_per_class: int | None = param(None, "labelled train images per class of the k-NN monitor; "
                                              "None = the whole train split", low=1)
    knn_every: int = param(100, "k-NN accuracy every this many steps (and at the end); 0 = only at the end", low=0)
    knn_k: int = param(20, "neighbours of the weighted k-NN monitor", low=1)
    knn_temperature: float = param(0.07, "temperature of the weighted k-NN vote", low=0, low_inclusive=False)
    knn_bn: str = param("pretext", "BN statistics of the k-NN features: 'pretext' = re-estimated on a copy over "
                        "5,120 fixed un-augmented pretext images (random init alike), 'running' = as the "
                        "backbone holds them (identity BN at random init); records carry both",
                        choices=("pretext", "running"))
    # Running
    seed: int = param(0, "seed of batch order, augmentations and initialisation", low=0)
    device: str = param("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    out_dir: str = param("runs/pretrain", "run directory: checkpoint, metrics, config")
    checkpoint_every: int = param(50, "write the checkpoint every this many steps (and at the end)", low=1)
    progress: bool = param(True, "show a tqdm progress bar")

    def check(self):
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"device={self.device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.crop_scale[0] > self.crop_scale[1] or self.crop_scale[0] <= 0:
            raise ConfigError(f"crop_scale={self.crop_scale!r} must be (low, high) with 0 < low <= high <= 1")
        if self.warmup_steps >= self.steps:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be < steps={self.steps}")
        if self.lowres_size is not None and not (self.lowres_size[0] <= self.lowres_size[1] <= self.image_size):
            raise ConfigError(f"lowres_size={self.lowres_size!r} must be (min, max) with 1 <= min <= max <= "
                              f"image_size={self.image_size}")

    @classmethod
    def from_saved(cls, values: dict):
        """The config of a run saved by an earlier version of the kit: fields added since then take
        the value that reproduces what that run did (:data:`SAVED_DEFAULTS`), not today's default."""
        return cls.from_dict({**SAVED_DEFAULTS, **values})


# What a saved config without these fields (written before they existed) ran with.
SAVED_DEFAULTS = {"lowres_p": 0.0, "knn_bn": "running", "pretext_forward": "joint", "partial_batch": "drop"}


def as_run(values: dict) -> dict:
    """A saved or current pre-training config as it ran: fields added since it was saved take
    :data:`SAVED_DEFAULTS`, so that two configs that train alike compare equal."""
    return PretrainConfig.from_saved(values).to_dict()


# The k-NN monitor's BN protocols (PretrainConfig.knn_bn), as printed beside its numbers.
KNN_BN_IMAGES = 5120  # fixed pretext images of the 'pretext' protocol (the same for every seed and run)
def knn_bn_images(images: torch.Tensor) -> torch.Tensor:
    """The fixed pretext images of the 'pretext' BN protocol: drawn with seed 0 whatever the run's seed,
    so that every run, seed and pipeline stage (notebook 04) is measured alike."""
    pick = torch.randperm(len(images), generator=generator(0, "knn-bn"))[:KNN_BN_IMAGES]
    return images[pick]


KNN_BN_PROTOCOLS = {
    "pretext": f"BN statistics re-estimated on {KNN_BN_IMAGES} un-augmented pretext images",
    "running": "BN running statistics as held (identity at random init)",
}


# fields that do not change the numbers a run produces: a run may resume with other values of these
# (sync_bn, like the world size, says how the run is executed: it changes nothing in one process)
RESUMABLE_FIELDS = frozenset({"progress", "checkpoint_every", "knn_every", "device", "out_dir", "data_root",
                              "sync_bn"})


def pretext_view_specs(cfg: PretrainConfig, channels: int):
    """The two augmentation specs of the pretext views (also the BiSSL lower level's): the chain of
    ``simclr_specs`` with the config's crop scale and, where not None, its flip and low resolution."""
    changes = {"scale": tuple(cfg.crop_scale)}
    for name in ("flip_p", "lowres_p", "lowres_size"):
        if getattr(cfg, name) is not None:
            changes[name] = getattr(cfg, name)
    return tuple(dataclasses.replace(s, **changes)
                 for s in simclr_specs(cfg.image_size, channels, paper=cfg.paper_augment))


def build_model(cfg: PretrainConfig, in_channels: int):
    torch.manual_seed(cfg.seed)  # initialisation is the only draw from the global generator
    backbone = build_backbone(cfg.arch, in_channels=in_channels, width=cfg.width, small_stem=cfg.small_stem)
    return build_pretext(cfg.method, backbone, proj_hidden=cfg.proj_hidden, proj_dim=cfg.proj_dim,
                         temperature=cfg.temperature, byol_ema=cfg.byol_ema, pretext_forward=cfg.pretext_forward)


def load_pretrained(path: str | Path, *, map_location="cpu"):
    """The pretext model (backbone + head) of a pre-training checkpoint, and its config."""
    ckpt = load_checkpoint(path, kind=CHECKPOINT_KIND)
    cfg = PretrainConfig.from_saved(ckpt["config"])
    model = build_model(cfg, ckpt["in_channels"])
    model.load_state_dict(ckpt["model"])
    return model.to(map_location), cfg


class Pretrainer:
    """Holds the data, model and optimiser of one pre-training run; :meth:`run` trains."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        distributed.init(device=cfg.device)  # under torchrun: join the process group, pick this rank's GPU
        self.device = resolve_device(cfg.device)
        self.out_dir = Path(cfg.out_dir)
        # rank 0 alone logs and writes checkpoints; every rank resumes from them
        self.log = MetricsLog(self.out_dir) if distributed.is_main() else distributed.NullLog()
        self.images = data_mod.load_pretext(cfg.pretext_dataset, root=cfg.data_root, image_size=cfg.image_size)
        if cfg.batch_size > len(self.images):
            raise ConfigError(f"batch_size={cfg.batch_size} is larger than the pretext set "
                              f"({len(self.images)} images)")
        try:
            distributed.check_divisible(cfg.batch_size, "batch_size")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        channels = self.images.shape[1]
        self.view_specs = pretext_view_specs(cfg, channels)
        self.mean, self.std = self.view_specs[0].mean, self.view_specs[0].std
        self.knn_train = data_mod.load_downstream(cfg.eval_dataset, "train", root=cfg.data_root,
                                                  image_size=cfg.image_size,
                                                  labels_per_class=cfg.eval_labels_per_class)
        self.knn_val = data_mod.load_downstream(cfg.eval_dataset, "val", root=cfg.data_root,
                                                image_size=cfg.image_size)
        self.bn_images = knn_bn_images(self.images)
        self.model = build_model(cfg, channels).to(self.device)
        self.optimizer = LARS(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                              momentum=cfg.momentum)
        self.step = 0
        n, b = len(self.images), cfg.batch_size
        self.partial = n % b if cfg.partial_batch == "keep" else 0  # size of an epoch's short last batch
        if self.partial == 1:
            raise ConfigError(f"batch_size={b} with partial_batch='keep' leaves a last batch of 1 image per epoch "
                              f"({n} = {n // b}·{b} + 1), which BatchNorm cannot normalise; choose another "
                              "batch_size or partial_batch='drop'")
        if self.partial % distributed.world_size():
            raise ConfigError(f"batch_size={b} with partial_batch='keep' leaves a last batch of {self.partial} images "
                              f"per epoch, which does not split into {distributed.world_size()} equal shards; choose "
                              "another batch_size or partial_batch='drop'")
        self.batches_per_epoch = n // b + (1 if self.partial else 0)
        self._resume()
        if cfg.sync_bn and distributed.is_distributed():
            distributed.convert_sync_batchnorm(self.model)
        # model.loss, through DistributedDataParallel under torchrun (gradients averaged across ranks)
        self.loss_fn = distributed.loss_module(self.model)

    # ---- persistence ---------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def _resume(self) -> None:
        if not self.checkpoint_path.exists():
            return
        ckpt = load_checkpoint(self.checkpoint_path, kind=CHECKPOINT_KIND)
        conflicts = config_conflicts(as_run(ckpt["config"]), as_run(self.cfg.to_dict()), RESUMABLE_FIELDS)
        if conflicts:
            raise CheckpointError(
                f"{str(self.out_dir)!r} holds a pre-training run with another config ({'; '.join(conflicts)}). "
                f"Choose another out_dir, or delete {str(self.checkpoint_path)!r} to start afresh.")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = ckpt["step"]

    def save(self) -> Path | None:
        if not distributed.is_main():
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(self.cfg.to_json())
        return save_checkpoint(self.checkpoint_path, {
            "kind": CHECKPOINT_KIND, "config": self.cfg.to_dict(), "step": self.step,
            "in_channels": self.images.shape[1], "signature": self.model.backbone.signature(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})

    def _trim_log(self) -> None:
        """Drop records past the checkpoint step: a killed run may have logged steps it must redo."""
        if self.step == 0:
            self.log.clear()  # no checkpoint: the run starts afresh
        else:
            self.log.keep(lambda r: r["step"] <= self.step)

    # ---- evaluation ----------------------------------------------------------------------------
    def knn(self, bn: str | None = None):
        """Weighted k-NN accuracy of the current backbone: eval set train split → val split, with the
        BN statistics of protocol ``bn`` (default ``cfg.knn_bn``; see :data:`KNN_BN_PROTOCOLS`).
        'pretext' re-estimates them on a copy: the model's own buffers are not touched."""
        bn = bn or self.cfg.knn_bn
        kw = dict(mean=self.mean, std=self.std, device=self.device)
        backbone = self.model.backbone
        if bn == "pretext":
            backbone = estimate_bn_stats(backbone, self.bn_images, **kw)
        elif bn != "running":
            raise ValueError(f"bn={bn!r} must be one of {tuple(KNN_BN_PROTOCOLS)}")
        train = extract_features(backbone, self.knn_train.images, **kw)
        val = extract_features(backbone, self.knn_val.images, **kw)
        return knn_accuracy(train, self.knn_train.labels, val, self.knn_val.labels,
                            k=self.cfg.knn_k, temperature=self.cfg.knn_temperature)

    # ---- training ------------------------------------------------------------------------------
    def batch(self, step: int) -> torch.Tensor:
        """The uint8 images of ``step``: epoch e's batches follow a permutation seeded by (seed, e)."""
        epoch, i = divmod(step, self.batches_per_epoch)
        perm = generator(self.cfg.seed, "pretext-order", epoch)
        order = torch.randperm(len(self.images), generator=perm)
        idx = order[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]
        return self.images[idx]

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        lr = warmup_cosine(step, base_lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps)
        set_lr(self.optimizer, lr)
        x = self.batch(step).to(self.device)
        v1, v2 = two_views(x, *self.view_specs, generator(cfg.seed, "pretext-views", step))
        v1, v2 = distributed.shard(v1), distributed.shard(v2)  # this rank's part of the global batch
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = self.loss_fn(v1, v2)
        value = distributed.mean_value(loss.detach())  # the global batch's loss
        if not torch.isfinite(value):
            raise FloatingPointError(f"pre-training loss is {value.item()} at step {step + 1} of {cfg.steps} (lr {lr:.4g}); "
                                     f"the last good checkpoint is {str(self.checkpoint_path)!r}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
        self.optimizer.step()
        self.model.update_target()
        return {"step": step + 1, "loss": value.item(), "lr": lr}

    def run(self, *, replay: bool = False) -> Iterator[dict]:
        """Train until ``cfg.steps``; yields one record per step (``step`` counts finished steps)
        and, after k-NN evaluations, a record with ``knn`` and its ``protocol``. ``replay=True``
        first yields the records of a resumed run's earlier steps (to redraw a plot)."""
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._trim_log()
        if replay:
            yield from read_metrics(self.out_dir)
        main = distributed.is_main()  # the k-NN monitor runs on rank 0 (all samples, each once)
        if self.step == 0 and main:
            rec = self._knn_record()
            self.log.append(rec)
            yield rec
        bar = progress_bar(cfg.progress and main, total=cfg.steps, initial=self.step, desc=f"pretrain {cfg.method}", unit="step")
        t0 = time.perf_counter()
        while self.step < cfg.steps:
            rec = self.train_step(self.step)
            self.step += 1
            rec["epoch"] = self.step / self.batches_per_epoch
            rec["seconds"] = time.perf_counter() - t0
            self.log.append(rec)
            yield rec
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.3g}")
            last = self.step == cfg.steps
            if main and (last or (cfg.knn_every and self.step % cfg.knn_every == 0)):
                rec = self._knn_record()
                self.log.append(rec)
                yield rec
            if last or self.step % cfg.checkpoint_every == 0:
                self.save()
        if bar is not None:
            bar.close()

    def _knn_record(self) -> dict:
        """``knn`` under the configured BN protocol (with its ``protocol``), and ``knn_by_bn``: the
        accuracy under each protocol, so that a change of protocol is never read as a training gain."""
        res = {bn: self.knn(bn) for bn in KNN_BN_PROTOCOLS}
        main = res[self.cfg.knn_bn]
        return {"step": self.step, "knn": main.accuracy,
                "protocol": f"{self.cfg.eval_dataset} val, {main.protocol()}, {KNN_BN_PROTOCOLS[self.cfg.knn_bn]}",
                "knn_by_bn": {bn: r.accuracy for bn, r in res.items()}}


def pretrain(cfg: PretrainConfig) -> list[dict]:
    """Run (or resume) pre-training to the end; return all records of this call."""
    return list(Pretrainer(cfg).run())


def read_metrics(out_dir: str | Path) -> list[dict]:
    """All records of a run directory's ``metrics.jsonl`` (step records and k-NN records)."""
    return MetricsLog(out_dir).records()
