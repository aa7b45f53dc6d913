"""Stage 1: self-supervised pre-training (SimCLR or BYOL) with LARS and warm-up + cosine.

``Pretrainer(cfg).run()`` is a generator of per-step records, so a notebook can update a live plot
while the same code runs headless. The run owns the folder ``cfg.out_dir`` (:mod:`bissl_kit.rundir`):
its checkpoint (the backbone, the projector, the optimiser), one log record per step (loss, lr) and
per k-NN evaluation, and the config.

A run may continue another one (``init_checkpoint``): it starts from that run's weights instead of a
random initialisation, with an optimiser and schedule of its own. The compute-matched baseline of
:mod:`bissl_kit.compare` is such a run, with the BiSSL lower level's optimiser, batch and schedule.

Every random draw (batch order, augmentations) comes from a generator derived from (seed, step), so
a resumed run is bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator

import torch

from . import data as data_mod
from . import distributed, speed
from .augment import simclr_specs, two_views
from .backbones import build as build_backbone, check_recipe, recipe_of
from .checkpoint import CheckpointError, content_signature, load_checkpoint, load_state
from .config import ConfigError
from .data.pretext import StepBatches, default_workers, pretext_fingerprint
from .evaluate import evaluate_frozen
from .optim import LARS, set_lr, warmup_cosine
from .pretext import build_pretext
from .pretrain_config import PretrainConfig, as_run, json_norm
from .rng import generator, resolve_device
from .rundir import MetricsLog, RunDir, progress_bar

CHECKPOINT_KIND = "pretrain"


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


def pretext_state(ckpt: dict) -> dict:
    """The whole pretext model's state_dict of a pre-training checkpoint (backbone, head, BYOL target)."""
    return {**{"backbone." + k: v for k, v in ckpt["backbones"]["pretrained"].items()}, **ckpt["state"]["rest"]}


def load_pretrained(path: str | Path, *, map_location="cpu"):
    """The pretext model (backbone + head) of a pre-training checkpoint, and its config."""
    ckpt = load_checkpoint(path, kind=CHECKPOINT_KIND)
    cfg = PretrainConfig.from_saved(ckpt["config"])
    model = build_model(cfg, ckpt["backbone"]["in_channels"])
    load_state(model, pretext_state(ckpt), where=str(path))
    return model.to(map_location), cfg


class Pretrainer:
    """Holds the data, model and optimiser of one pre-training run; :meth:`run` trains."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        distributed.init(device=cfg.device)  # under torchrun: join the process group, pick this rank's GPU
        self.device = resolve_device(cfg.device)
        self.out_dir = Path(cfg.out_dir)
        self.init = self._init_checkpoint() if cfg.init_checkpoint is not None else None
        identity = {} if self.init is None else {"init_checkpoint": self.init["signature"]}
        # the pre-training a backbone descends from: this run's, or for a continued run the one it continues
        lineage = {"pretrain_config": cfg.to_dict() if self.init is None else self.init["pretrain_config"]}
        if self.init is not None:
            lineage["init"] = {k: self.init[k] for k in ("checkpoint", "signature", "step")}
        # rank 0 alone locks the folder, logs and writes checkpoints; every rank resumes from them
        self.run_dir = RunDir(cfg.out_dir, CHECKPOINT_KIND, cfg, identity=identity, lineage=lineage)
        self.log = self.run_dir.log
        workers = default_workers() if cfg.loader_workers is None else cfg.loader_workers
        self.images = data_mod.load_pretext(cfg.pretext_dataset, root=cfg.data_root, image_size=cfg.image_size,
                                            workers=workers)
        self.run_dir.identity["pretext_data"] = pretext_fingerprint(self.images)
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
                                                  labels_per_class=cfg.eval_labels_per_class).materialize()
        self.knn_val = data_mod.load_downstream(cfg.eval_dataset, "val", root=cfg.data_root,
                                                image_size=cfg.image_size).materialize()
        if self.knn_train.multilabel:
            raise ConfigError(f"eval_dataset={cfg.eval_dataset!r} is multi-label; the k-NN monitor votes for one class "
                              "per image, so eval_dataset must be a single-label set (docs/data.md)")
        if self.knn_train.images.shape[1] != channels:
            raise ConfigError(f"eval_dataset={cfg.eval_dataset!r} has {self.knn_train.images.shape[1]} channel(s) but the "
                              f"pretext images have {channels}; choose an eval_dataset with {channels} (docs/data.md)")
        self.bn_images = knn_bn_images(self.images)
        self.model = build_model(cfg, channels)
        if self.init is not None:
            check_recipe(self.init["backbone"], recipe_of(self.model.backbone), where=cfg.init_checkpoint)
            load_state(self.model, self.init["model"], where=cfg.init_checkpoint)
            if hasattr(self.model, "reset_target"):
                self.model.reset_target()  # BYOL: the target restarts from the online weights, as in BiSSL
        speed.memory_format(self.model.to(self.device), cfg.channels_last)
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
        # a streamed set: a DataLoader decodes each step's images ahead, in the order batch_indices gives
        self.batches = StepBatches(self.images, self.batch_indices, stop=cfg.steps, workers=workers,
                                   pin_memory=cfg.pin_memory and self.device.type == "cuda",
                                   prefetch_factor=cfg.prefetch_factor)
        self.run_dir.open()  # every check passed: now the folder is ours (a second process is refused)
        try:
            self._resume()
        except BaseException:
            self.run_dir.close()
            raise
        if cfg.sync_bn and distributed.is_distributed():
            distributed.convert_sync_batchnorm(self.model)
        # model.loss, through DistributedDataParallel under torchrun (gradients averaged across ranks)
        self.loss_fn = speed.compiled(distributed.loss_module(self.model), cfg.compile)

    # ---- persistence ---------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir.checkpoint_path

    def _init_checkpoint(self) -> dict:
        """What a continued run starts from: the model of ``init_checkpoint``, whose pre-training settings
        must be this run's (``ARCHITECTURE``), and the content signature its numbers depend on."""
        cfg = self.cfg
        try:
            ckpt = load_checkpoint(cfg.init_checkpoint, kind=CHECKPOINT_KIND)
        except CheckpointError as e:
            raise CheckpointError(f"init_checkpoint={cfg.init_checkpoint!r} cannot be used: {e}") from e
        parent, mine = as_run(ckpt["config"]), as_run(cfg.to_dict())
        differs = [f"{k}: checkpoint {parent[k]!r} vs config {mine[k]!r}" for k in PretrainConfig.ARCHITECTURE
                   if json_norm(mine[k]) != json_norm(parent[k])]
        if differs:
            raise ConfigError(f"init_checkpoint={cfg.init_checkpoint!r} is a pre-training run with other settings "
                              f"({'; '.join(differs)}); a continued run keeps the network and views of the run it "
                              "continues")
        return {"checkpoint": str(cfg.init_checkpoint), "signature": content_signature(ckpt), "step": ckpt["step"],
                "backbone": ckpt["backbone"], "model": pretext_state(ckpt),
                "pretrain_config": ckpt["lineage"]["pretrain_config"]}

    def _resume(self) -> None:
        ckpt = self.run_dir.resume(lambda ck: lambda r: r["step"] <= ck["step"], recipe=recipe_of(self.model.backbone))
        if ckpt is None:
            return
        load_state(self.model, pretext_state(ckpt), where=str(self.checkpoint_path))
        self.optimizer.load_state_dict(ckpt["state"]["optimizer"])
        self.step = ckpt["step"]

    def save(self) -> Path | None:
        backbone = self.model.backbone
        rest = {k: v for k, v in self.model.state_dict().items() if not k.startswith("backbone.")}
        return self.run_dir.save(step=self.step, backbone=recipe_of(backbone),
                                 backbones={"pretrained": backbone.state_dict()},
                                 state={"rest": rest, "optimizer": self.optimizer.state_dict()})

    # ---- evaluation ----------------------------------------------------------------------------
    def knn(self, bn: str | None = None):
        """Weighted k-NN accuracy of the current backbone: eval set train split → val split, with the
        BN statistics of protocol ``bn`` (default ``cfg.knn_bn``; see :data:`KNN_BN_PROTOCOLS`).
        'pretext' re-estimates them on a copy: the model's own buffers are not touched."""
        bn = bn or self.cfg.knn_bn
        if bn not in KNN_BN_PROTOCOLS:
            raise ValueError(f"bn={bn!r} must be one of {tuple(KNN_BN_PROTOCOLS)}")
        res = evaluate_frozen(self.model.backbone, (self.knn_train.images, self.knn_train.labels),
                              (self.knn_val.images, self.knn_val.labels), mean=self.mean, std=self.std,
                              num_classes=self.knn_train.num_classes,
                              bn_images=self.bn_images if bn == "pretext" else None, bn=KNN_BN_PROTOCOLS[bn],
                              knn_k=self.cfg.knn_k, knn_temperature=self.cfg.knn_temperature, device=self.device)
        return res.knn

    # ---- training ------------------------------------------------------------------------------
    @property
    def stream(self) -> str:
        """The name of the run's random streams: a continued run draws from streams of its own (named
        after the compute-matched baseline, their first use), so it never repeats the batches and views
        of the run it continues."""
        return "pretext" if self.init is None else "matched-pretext"

    def batch_indices(self, step: int) -> torch.Tensor:
        """The pretext items of ``step``: epoch e's batches follow a permutation seeded by (seed, e)."""
        epoch, i = divmod(step, self.batches_per_epoch)
        if getattr(self, "_order_epoch", None) != epoch:  # one permutation per epoch (ImageNet's takes ~40 ms)
            perm = generator(self.cfg.seed, f"{self.stream}-order", epoch)
            self._order, self._order_epoch = torch.randperm(len(self.images), generator=perm), epoch
        return self._order[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]

    def batch(self, step: int) -> torch.Tensor:
        """The uint8 images of ``step`` (:meth:`batch_indices`), sliced or streamed."""
        return self.batches.get(step)

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        lr = warmup_cosine(step, base_lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps,
                           official_first_step=cfg.official_first_step)
        set_lr(self.optimizer, lr)
        x = self.batch(step).to(self.device)
        v1, v2 = two_views(x, *self.view_specs, generator(cfg.seed, f"{self.stream}-views", step))
        v1, v2 = distributed.shard(v1), distributed.shard(v2)  # this rank's part of the global batch
        v1, v2 = speed.inputs(v1, cfg.channels_last), speed.inputs(v2, cfg.channels_last)
        self.model.train()
        with speed.autocast(self.device, cfg.bf16):
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
        return {"kind": "step", "step": step + 1, "loss": value.item(), "lr": lr}

    def run(self, *, replay: bool = False) -> Iterator[dict]:
        """Train until ``cfg.steps``; yields one record per step (``step`` counts finished steps)
        (kind ``"step"``) and, after k-NN evaluations, one of kind ``"knn"`` with its ``protocol``. ``replay=True``
        first yields the records of a resumed run's earlier steps (to redraw a plot)."""
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if replay:
            yield from self.log.records()
        main = distributed.is_main()  # the k-NN monitor runs on rank 0 (all samples, each once)
        if self.step == 0 and main:
            rec = self._knn_record()
            self.log.append(rec)
            yield rec
        bar = progress_bar(cfg.progress and main, total=cfg.steps, initial=self.step, desc=f"pretrain {cfg.method}", unit="step")
        t0 = time.perf_counter()
        self.run_dir.open()
        try:
            yield from self._loop(bar, t0, main)
        finally:
            self.run_dir.close()  # the folder is free for others once the run ends or stops
            self.batches.close()  # a streamed set's loader workers
        if bar is not None:
            bar.close()

    def _loop(self, bar, t0: float, main: bool) -> Iterator[dict]:
        cfg = self.cfg
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

    def _knn_record(self) -> dict:
        """``knn`` under the configured BN protocol (with its ``protocol``), and ``knn_by_bn``: the
        accuracy under each protocol, so that a change of protocol is never read as a training gain."""
        res = {bn: self.knn(bn) for bn in KNN_BN_PROTOCOLS}
        main = res[self.cfg.knn_bn]
        return {"kind": "knn", "step": self.step, "knn": main.accuracy,
                "protocol": f"{self.cfg.eval_dataset} val, {main.protocol()}, {KNN_BN_PROTOCOLS[self.cfg.knn_bn]}",
                "knn_by_bn": {bn: r.accuracy for bn, r in res.items()}}


def pretrain(cfg: PretrainConfig) -> list[dict]:
    """Run (or resume) pre-training to the end; return all records of this call."""
    return list(Pretrainer(cfg).run())


def read_metrics(out_dir: str | Path) -> list[dict]:
    """All records of a run directory's ``metrics.jsonl`` (step records and k-NN records)."""
    return MetricsLog(out_dir).records()
