"""Stage 3: fine-tuning a backbone with a fresh linear head, and its evaluation (spec §2.1 stage 4, §2.6).

The backbone is what a checkpoint hands on (:func:`bissl_kit.backbones.load_backbone`):

* a pre-training run's backbone: the conventional pipeline's (notebook 01), or a run continuing it for
  as many extra pretext steps as BiSSL's lower level took (the compute-matched baseline of
  :mod:`bissl_kit.compare`);
* a BiSSL run's **lower** backbone θ_P (notebook 02); the upper model (θ_D, φ_D) is discarded, as in
  the official code;
* a fine-tuning run's backbone (fine-tuned again).

Protocol (the official one of spec §2.6, with the changes named):

* a new random ``Linear`` head (seeded by ``seed``); SGD with momentum and coupled weight decay on **all**
  parameters; cosine decay from ``lr`` to 0.001·lr over epochs × batches-per-epoch steps, no warm-up
  (the official scheduler class, so the first step runs at the full lr); batches of ``batch_size``
  with the partial last batch kept (as the official DataLoader); crop + flip augmentation of
  :func:`~bissl_kit.augment.downstream_train_spec`, normalised like the pre-training views.
* val top-1/top-5 every ``eval_every`` epochs and always after the last one, eval-mode BatchNorm.
* **the reported model** is the last epoch's (``select="last"``) or the best-val epoch's
  (``select="best_val"``). Its numbers on the **test** split are computed **once**, at the end, and only
  when ``test=True``: hyper-parameter trials run with ``test=False``, and the test split is then never
  loaded. The official code reports the maximum over epochs of val accuracy and never touches test
  (spec C19); we record that maximum as ``best_val_top1`` for reference only.
* a multi-label task (VOC07) is trained with ``multilabel_loss`` (the official softmax CE on the multi-hot
  vector, or BCE) and measured by its mAP (:data:`~bissl_kit.downstream.MAP_PROTOCOL`) where the others
  have top-1/top-5: records hold ``val_map``/``test_map``/``best_val_map``, and best-val selects on val mAP.
* no second forward pass per step just to log the loss (the official code doubles its forward cost
  and BatchNorm updates that way, spec §2.6).

Every random draw (head initialisation, batch order, augmentations) comes from (seed, purpose, epoch,
batch), so a seed reproduces a run on CPU and a resumed run equals an uninterrupted one. The run
folder (:mod:`bissl_kit.rundir`) holds the checkpoint (kind ``"finetune"``), the log and the config.

Under ``torchrun`` (:mod:`bissl_kit.distributed`) the same run is split over W processes: every rank
draws the same global batch and augmentation and keeps its part (:func:`~bissl_kit.distributed.split`:
sizes differ by at most one, the loss weighted so that the mean of the per-rank gradients, which
DistributedDataParallel computes, is the global batch's); ``batch_size`` stays the global batch.
A partial last batch is kept when every rank gets at least 2 of its images (in one process: unless it
holds a single image), so runs on W ranks and on one process use the same batches unless
``batch_size`` leaves a remainder below 2W. BatchNorm normalises each rank's part unless ``sync_bn``
(the global batch, :class:`~bissl_kit.distributed.SyncBatchNorm`: then equal to one process); the
running statistics are averaged across ranks at the end of every epoch, so the replicas stay
identical. Val and test metrics are computed over the union of the ranks' disjoint parts of the split
(each sample counted once). Rank 0 alone logs and writes the checkpoint (and draws the figure, :mod:`bissl_kit.viz.finetune`);
every rank resumes from that checkpoint.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from . import data as data_mod
from . import distributed, speed
from .augment import augment
from .backbones import LoadedBackbone, load_backbone, rebuild, recipe_of
from .checkpoint import CheckpointError, load_checkpoint, load_state
from .config import Config, ConfigError, device_param, param
from .downstream import MAP_PROTOCOL, DownstreamData, evaluate_split, load_data, task_name
from .losses import MULTILABEL_LOSSES, downstream_loss
from .models import linear_head
from .optim import set_lr, warmup_cosine
from .rng import generator, resolve_device
from .rundir import MetricsLog, RunDir, progress_bar

CHECKPOINT_KIND = "finetune"
SOURCE_KINDS = ("pretrain", "bissl")  # the checkpoints whose backbone fine-tuning starts from


@dataclass(frozen=True)
class FinetuneConfig(Config):
    # Inputs
    backbone_checkpoint: str = param("runs/bissl/checkpoint.pt",
                                     "checkpoint whose backbone is fine-tuned: a pre-training run, a BiSSL run "
                                     "(its lower backbone θ_P) or a compute-matched pretext continuation", resumable=True)
    downstream: str = param("digits", "downstream dataset: a name of bissl_kit.data.DATASETS (built-in or registered) "
                            "or a task folder path (docs/data.md)", check=data_mod.check_dataset_name)
    labels_per_class: int | None = param(None, "few-label train split: labelled images per class; None = all", low=1)
    labels_seed: int = param(0, "which images a few-label train split keeps (BiSSL's upper level uses 0)", low=0)
    data_root: str | None = param(None, "dataset root; None searches $BISSL_DATA, data/, the Debian package", resumable=True)
    # Optimisation (spec §2.6: SGD, momentum 0.9, cosine to 0.001× without warm-up, batch 256, 400 epochs)
    epochs: int = param(20, "fine-tuning epochs (the paper: 400)", low=1)
    batch_size: int = param(256, "images per SGD step", low=2)
    lr: float = param(0.05, "base learning rate of SGD (V2's default 0.05; chosen by search in notebook 05)",
                      low=0, low_inclusive=False)
    weight_decay: float = param(5e-4, "coupled weight decay of SGD, on all parameters (V2's default 5e-4)", low=0)
    momentum: float = param(0.9, "SGD momentum", low=0, high=1, high_inclusive=False)
    bf16: bool = speed.bf16_param()
    channels_last: bool = speed.channels_last_param()
    compile: bool = speed.compile_param()
    multilabel_loss: str = param("softmax_ce", "loss of a multi-label task (VOC07; class-index tasks always use "
                                 "cross-entropy): softmax cross-entropy on the multi-hot vector as the official code "
                                 "(spec C15), or per-class sigmoid BCE", choices=MULTILABEL_LOSSES)
    sync_bn: bool = param(False, "under torchrun: BatchNorm over the global batch (SyncBatchNorm) instead of each "
                          "rank's part; no effect in one process", resumable=True)
    # Evaluation
    eval_every: int = param(1, "val top-1/top-5 every this many epochs (and always after the last); 0 = only at the end",
                            low=0)
    select: str = param("last", "the reported model: the last epoch's, or the epoch with the best val top-1 "
                        "(val mAP: multi-label)",
                        choices=("last", "best_val"))
    test: bool = param(True, "evaluate the reported model once on the test split at the end; False (search "
                             "trials) never loads the test split", resumable=True)
    # Running
    seed: int = param(0, "seed of the head initialisation, batch order and augmentations", low=0)
    device: str = device_param()
    out_dir: str = param("runs/finetune", "run directory: checkpoint, metrics, config", resumable=True)
    checkpoint_every: int = param(5, "write the checkpoint every this many epochs (and at the end)", low=1, resumable=True)
    progress: bool = param(True, "show a tqdm progress bar", resumable=True)

    @classmethod
    def paper(cls, **overrides) -> "FinetuneConfig":
        """The paper's fine-tuning (every version, spec §2.2, §2.6; bissl_kit.presets): 400 epochs, batch 256."""
        from .presets import finetune_values
        return cls.from_dict({**finetune_values(), **overrides})


# ---- where the backbone comes from ------------------------------------------------------------------

def describe_source(loaded: LoadedBackbone) -> dict:
    """What a fine-tuned backbone started as, for the records: the checkpoint's kind, role and how far
    its run got (a continued pre-training run also says how many steps it added)."""
    src = {"kind": loaded.kind, "role": loaded.role, "path": loaded.path}
    if loaded.kind == "pretrain":
        init = loaded.lineage.get("init")
        src["steps"] = loaded.step
        if init is not None:  # a run continuing another: the compute-matched baseline
            src["continued_from"] = init.get("checkpoint")
    elif loaded.kind == "bissl":
        src.update(stages=loaded.step, lower_steps=loaded.step * loaded.config["lower_steps"])
    return src


def source_label(source: dict) -> str:
    if source["kind"] == "bissl":
        return "BiSSL lower backbone θ_P" if source.get("role", "lower") == "lower" else "BiSSL upper backbone θ_D"
    if source.get("continued_from") is not None or source["kind"] == "pretext_matched":  # (a format-1 record)
        return "compute-matched pre-trained backbone"
    return "pre-trained backbone"


def load_finetuned(path: str | Path):
    """(backbone, head, config) of a fine-tuning checkpoint: the *reported* model (``select``), in eval mode."""
    ckpt = load_checkpoint(path, kind=CHECKPOINT_KIND)
    cfg = FinetuneConfig.from_saved(ckpt["config"])
    backbone = rebuild(ckpt["backbone"])
    load_state(backbone, ckpt["backbones"]["finetuned"], where=str(path), what="backbone")
    head = linear_head(backbone.feat_dim, ckpt["state"]["num_classes"])
    load_state(head, reported_head(ckpt["state"]), where=str(path), what="head")
    return backbone.eval(), head.eval(), cfg


def reported_head(state: dict) -> dict:
    """The head of the model a fine-tuning checkpoint reports (the finished run's, else the current one)."""
    if state.get("reported_head") is not None:
        return state["reported_head"]
    if state.get("reported") is not None:  # upgraded format 1
        return state["reported"]["head"]
    return state["head"] if "head" in state else state["model"]["head"]


class Finetuner:
    """One fine-tuning run: :meth:`run` yields step and epoch records, then the final record.

    ``data`` may be shared between runs on the same task (the search does); by default it is loaded
    from the config. A run directory with a checkpoint of the same config resumes; a finished run
    only adds what is missing (the test evaluation when ``test`` turned True). Under torchrun every
    rank builds one (module docstring)."""

    def __init__(self, cfg: FinetuneConfig, *, data: DownstreamData | None = None):
        self.cfg = cfg
        distributed.init(device=cfg.device)  # under torchrun: join the process group, pick this rank's GPU
        self.device = resolve_device(cfg.device)
        self.out_dir = Path(cfg.out_dir)
        try:
            loaded = load_backbone(cfg.backbone_checkpoint)
            if loaded.kind not in SOURCE_KINDS:
                raise CheckpointError(f"{cfg.backbone_checkpoint!r} holds a {loaded.kind!r} checkpoint; fine-tuning "
                                      "starts from a pre-training or a BiSSL run's checkpoint")
        except CheckpointError as e:
            raise CheckpointError(f"backbone_checkpoint={cfg.backbone_checkpoint!r} cannot be used: {e}") from e
        self.backbone, self.pre_cfg, self.source = loaded.backbone.train(), loaded.pretrain_config, describe_source(loaded)
        # the run depends on the content of the backbone's checkpoint, not on where it lies (a moved file
        # resumes; another one is a conflict)
        identity = {"backbone_checkpoint": loaded.signature}
        lineage = {"pretrain_config": self.pre_cfg.to_dict(), "init": {**self.source, "signature": loaded.signature}}
        # rank 0 alone locks the folder, logs and writes checkpoints; every rank resumes from them
        self.run_dir = RunDir(cfg.out_dir, CHECKPOINT_KIND, cfg, identity=identity, lineage=lineage)
        self.log = self.run_dir.log
        if data is None:
            data = load_data(cfg.downstream, self.pre_cfg, labels_per_class=cfg.labels_per_class,
                             labels_seed=cfg.labels_seed, data_root=cfg.data_root)
        elif (data.name, data.labels_per_class) != (cfg.downstream, cfg.labels_per_class):
            raise ConfigError(f"data is {data.task!r} but the config asks for "
                              f"{task_name(cfg.downstream, cfg.labels_per_class)!r}")
        self.data = data
        self.run_dir.identity["downstream_data"] = data_mod.fingerprint(data.train.images, data.train.labels,
                                                                      data.val.images, data.val.labels)
        self.in_channels = data.train.images.shape[1]
        if self.in_channels != self.backbone.in_channels:
            raise ConfigError(f"downstream={cfg.downstream!r} has {self.in_channels} channels but the backbone "
                              f"of {cfg.backbone_checkpoint!r} takes {self.backbone.in_channels}")
        torch.manual_seed(cfg.seed)  # the head's initialisation is the only draw from the global generator
        self.head = linear_head(self.backbone.feat_dim, data.num_classes)
        speed.memory_format(self.backbone.to(self.device), cfg.channels_last)
        self.head.to(self.device)
        self.optimizer = torch.optim.SGD(self.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        n = len(data.train)
        w = distributed.world_size()
        if cfg.batch_size < 2 * w:
            raise ConfigError(f"batch_size={cfg.batch_size} is the global batch; with {w} ranks it must be at "
                              f"least {2 * w} (2 images per rank)")
        # the partial last batch is kept (official DataLoader), except a single image (per rank): BatchNorm in
        # train mode cannot normalise one 1×1 feature map
        self.drop_last = 0 < n % cfg.batch_size < 2 * w
        self.steps_per_epoch = n // cfg.batch_size if self.drop_last else math.ceil(n / cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.epoch = 0                 # finished epochs
        self.history: list[dict] = []  # epoch records
        self.best: dict | None = None  # {"epoch", "val_top1", "states"} of the best evaluated epoch
        self.result: dict | None = None
        self._reported: dict | None = None  # the reported model's states, once the run is finished
        self.run_dir.open()  # every check passed: now the folder is ours (a second process is refused)
        try:
            self._resume()
        except BaseException:
            self.run_dir.close()
            raise
        if cfg.sync_bn and distributed.is_distributed():
            distributed.convert_sync_batchnorm(self.backbone)  # same parameters and buffers, in place
        # backbone → head; under torchrun through DistributedDataParallel (gradients averaged across ranks,
        # rank 0's parameters and buffers broadcast when it is built)
        self.model = speed.compiled(distributed.data_parallel(nn.Sequential(self.backbone, self.head)), cfg.compile)

    def parameters(self):
        return list(self.backbone.parameters()) + list(self.head.parameters())

    # ---- persistence -----------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir.checkpoint_path

    def _states(self) -> dict:
        return {"backbone": copy.deepcopy(self.backbone.state_dict()), "head": copy.deepcopy(self.head.state_dict())}

    def save(self) -> Path | None:
        """Write the checkpoint (rank 0; the other ranks wait until it is written, then return None).
        A finished run keeps only what :func:`load_finetuned` and a later test evaluation need: the
        reported model."""
        done = self.result is not None
        common = {"num_classes": self.data.num_classes, "history": self.history, "result": self.result}
        if done:
            reported = self.reported_states()
            backbone, state = reported["backbone"], {**common, "reported_head": reported["head"]}
        else:
            backbone = self.backbone.state_dict()
            state = {**common, "head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "best": self.best}
        path = self.run_dir.save(step=self.epoch, backbone=recipe_of(self.backbone),
                                 backbones={"finetuned": backbone}, state=state)
        distributed.barrier()  # a Finetuner built next on any rank resumes from this file
        return path

    def _resume(self) -> None:
        # a killed epoch's records go, and so does a final record that is about to be redone
        def keep(ck):
            redo = self._needs_final(ck["state"]["result"])
            return lambda r: r.get("epoch", 0) <= ck["step"] and not (redo and r.get("kind") == "final")
        ckpt = self.run_dir.resume(keep, recipe=recipe_of(self.backbone))
        if ckpt is None:
            return
        state = ckpt["state"]
        load_state(self.backbone, ckpt["backbones"]["finetuned"], where=str(self.checkpoint_path), what="backbone")
        load_state(self.head, reported_head(state), where=str(self.checkpoint_path), what="head")
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.history, self.result = ckpt["step"], state["history"], state["result"]
        self.best = state.get("best")
        if self.result is not None:
            self._reported = {"backbone": ckpt["backbones"]["finetuned"], "head": reported_head(state)}

    def _needs_final(self, result: dict | None) -> bool:
        """Whether the final evaluation is (re)done: the run has none yet, or it lacks the test numbers that
        ``test`` asks for (a finished search trial continued as a seed run)."""
        return result is None or (self.cfg.test and f"test_{self.key}" not in result)

    @property
    def key(self) -> str:
        """The selection metric: val top-1, or val mAP for a multi-label task (records: val_top1 / val_map)."""
        return self.data.metrics[0]

    # ---- training --------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        # the official scheduler class (spec §1.7): no warm-up, cosine to 0.001×, first step at the full lr
        return warmup_cosine(step, base_lr=self.cfg.lr, warmup=0, total=self.total_steps, official_first_step=True)

    def train_epoch(self, epoch: int) -> Iterator[dict]:
        cfg = self.cfg
        self.backbone.train()
        self.head.train()
        batches = data_mod.iterate_batches(self.data.train, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                           drop_last=self.drop_last, device=self.device)
        for b, (images, labels) in enumerate(batches):
            step = epoch * self.steps_per_epoch + b
            lr = self.lr_at(step)
            set_lr(self.optimizer, lr)
            # the global batch's augmentation (one generator draws every image's parameters), then this
            # rank's part of it; ``weight`` scales its mean loss to its share of the global mean
            x = augment(images, self.data.train_spec, generator(cfg.seed, "finetune-augment", epoch, b))
            (x, labels), weight = distributed.split(x.to(self.head.weight.dtype), labels)
            with speed.autocast(self.device, cfg.bf16):
                loss = downstream_loss(self.model(speed.inputs(x, cfg.channels_last)), labels, cfg.multilabel_loss)
            if weight != 1.0:
                loss = loss * weight
            value = distributed.mean_value(loss.detach())  # the global batch's loss, the same on every rank
            if not torch.isfinite(value):
                raise FloatingPointError(f"fine-tuning loss is {value.item()} at epoch {epoch + 1}, step {step + 1} "
                                         f"(lr {lr:.4g}); the last good checkpoint is {str(self.checkpoint_path)!r}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            yield {"kind": "step", "epoch": epoch + (b + 1) / self.steps_per_epoch, "step": step + 1,
                   "loss": value.item(), "lr": lr}

    def evaluate(self, split: str = "val") -> dict:
        """Top-1/top-5 (mAP: multi-label)/loss of the current model on ``split`` ('val'; 'test' only for final numbers)."""
        data = self.data.val if split == "val" else self.data.test()
        return evaluate_split(self.backbone, self.head, data, mean=self.data.mean, std=self.data.std,
                              device=self.device, multilabel_loss=self.cfg.multilabel_loss)

    def run(self, *, replay: bool = False) -> Iterator[dict]:
        """Train to ``cfg.epochs`` and finish; yields step, epoch and final records. ``replay=True`` first
        yields a resumed run's earlier records (to redraw a plot)."""
        cfg = self.cfg
        if distributed.is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
        need_final = self._needs_final(self.result)
        if replay:
            yield from self.log.records()
        bar = progress_bar(cfg.progress and distributed.is_main() and self.epoch < cfg.epochs,
                           total=cfg.epochs, initial=self.epoch,
                           desc=f"fine-tune {self.data.task}", unit="epoch")
        while self.epoch < cfg.epochs:
            t0 = time.perf_counter()
            losses = []
            for rec in self.train_epoch(self.epoch):
                losses.append(rec["loss"])
                self.log.append(rec)
                yield rec
            self.epoch += 1
            # per-part BatchNorm statistics averaged, so every rank evaluates and saves the same model
            # (with sync_bn they are equal already; in one process this does nothing)
            distributed.average_buffers(self.backbone, self.head)
            rec = {"kind": "epoch", "epoch": self.epoch, "train_loss": sum(losses) / len(losses),
                   "seconds": time.perf_counter() - t0}
            last = self.epoch == cfg.epochs
            if last or (cfg.eval_every and self.epoch % cfg.eval_every == 0):
                val = self.evaluate("val")
                rec.update({f"val_{m}": val[m] for m in self.data.metrics}, val_loss=val["loss"])
                key = self.key
                if self.best is None or val[key] > self.best[f"val_{key}"]:
                    self.best = {"epoch": self.epoch, f"val_{key}": val[key],
                                 "states": self._states() if cfg.select == "best_val" else None}
            self.history.append(rec)
            self.log.append(rec)
            yield rec
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{rec[k]:.3g}" for k in ("train_loss", "val_top1", "val_map") if k in rec})
            if not last and self.epoch % cfg.checkpoint_every == 0:
                self.save()
        if bar is not None:
            bar.close()
        if need_final:
            self.result = self._final()
            self.save()
            self.log.append(self.result)
            yield self.result

    def reported_states(self) -> dict:
        if self._reported is not None:
            return self._reported
        if self.cfg.select == "best_val" and self.best is not None and self.best["states"] is not None:
            return self.best["states"]
        return {"backbone": self.backbone.state_dict(), "head": self.head.state_dict()}

    def _final(self) -> dict:
        """The reported model's val numbers, and its test numbers when ``cfg.test`` (the only place the
        test split is read)."""
        cfg = self.cfg
        states = self.reported_states()
        self._reported = copy.deepcopy(states)
        self.backbone.load_state_dict(states["backbone"])
        self.head.load_state_dict(states["head"])
        key = self.key
        evaluated = [r for r in self.history if f"val_{key}" in r]
        if self.result is not None:  # a finished run asked for its test numbers now
            selected = self.result["selected_epoch"]
        else:
            selected = self.best["epoch"] if cfg.select == "best_val" else cfg.epochs
        val = self.evaluate("val")
        rec = {"kind": "final", "epoch": cfg.epochs, "selected_epoch": selected,
               **{f"val_{m}": val[m] for m in self.data.metrics}, "val_loss": val["loss"], "n_val": val["n"],
               f"best_val_{key}": max(r[f"val_{key}"] for r in evaluated), "lr": cfg.lr,
               "weight_decay": cfg.weight_decay, "seed": cfg.seed, "source": self.source,
               "protocol": self.protocol("val", val["n"], selected)}
        if cfg.test:
            test = self.evaluate("test")
            rec.update({f"test_{m}": test[m] for m in self.data.metrics}, test_loss=test["loss"], n_test=test["n"],
                       test_protocol=self.protocol("test", test["n"], selected))
        return rec

    def protocol(self, split: str, n: int, selected_epoch: int) -> str:
        cfg = self.cfg
        src = source_label(self.source)
        chosen = "last epoch" if cfg.select == "last" else f"best-val epoch {selected_epoch}"
        metric = (f"{MAP_PROTOCOL}, trained with multilabel_loss={cfg.multilabel_loss}" if self.data.multilabel
                  else "top-1/top-5")
        return (f"{self.data.task} {split} (n={n}) {metric}; {src} fine-tuned {cfg.epochs} epochs with a new "
                f"linear head (SGD lr {cfg.lr:.3g}, wd {cfg.weight_decay:.3g}, momentum {cfg.momentum:g}, "
                f"cosine, batch {cfg.batch_size}, {len(self.data.train)} train images); model: {chosen}; "
                f"seed {cfg.seed}")


def finetune(cfg: FinetuneConfig, *, data: DownstreamData | None = None) -> dict:
    """Run (or resume, or just read back) a fine-tuning run to its end; return its final record."""
    tuner = Finetuner(cfg, data=data)
    for _ in tuner.run():
        pass
    return tuner.result


def read_metrics(out_dir: str | Path) -> list[dict]:
    """All records of a fine-tuning run directory's ``metrics.jsonl``."""
    return MetricsLog(out_dir).records()
