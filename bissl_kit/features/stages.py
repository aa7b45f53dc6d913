"""The backbone of every stage of the pipeline, read from its checkpoint, and the task's images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import data as data_mod
from ..backbones import load_backbone
from ..checkpoint import CheckpointError
from .config import FASHION_MNIST_CLASSES, FeaturesConfig


@dataclass
class Stage:
    """One point of the pipeline: a backbone (eval mode), its label and where it came from."""
    key: str          # unique: "random", "pretrained", "bissl_lower", "bissl_upper", "finetuned_<source>"
    kind: str         # one of STAGE_KINDS
    label: str        # for legends and tables
    backbone: nn.Module
    pre_cfg: object   # the PretrainConfig that describes the architecture and image size
    source: str       # provenance, printed beside the numbers
    task: tuple[str, int | None] | None = None  # (downstream, labels_per_class) the stage was trained on, if any


FINETUNE_SOURCES = {"pretrained": ("baseline", "fine-tuned (baseline)"),
                    "matched": ("matched", "fine-tuned (matched baseline)"),
                    "bissl": ("bissl", "fine-tuned (BiSSL)")}


def _finetuned_from(source: dict) -> str:
    """'pretrained', 'matched' (a continued pre-training run) or 'bissl': what a fine-tuned run started as."""
    if source.get("kind") == "pretext_matched" or source.get("continued_from") is not None:
        return "matched"
    return {"pretrain": "pretrained"}.get(source.get("kind"), source.get("kind", "?"))


def load_stage(path, kind: str) -> Stage:
    """The backbone of one checkpoint-backed stage kind (``pretrained``, ``bissl_lower``, ``bissl_upper``,
    ``finetuned``), with its label and provenance, read once."""
    # each role belongs to one checkpoint kind, so a checkpoint of another kind is refused by its role
    role = {"pretrained": "pretrained", "bissl_lower": "lower", "bissl_upper": "upper", "finetuned": "finetuned"}[kind]
    loaded = load_backbone(path, role)
    c, n, pre = loaded.config, loaded.step, loaded.pretrain_config
    if kind == "pretrained":
        return Stage("pretrained", "pretrained", "pre-trained", loaded.backbone, pre,
                     f"{path} ({pre.method}, {n} steps)")
    if kind in ("bissl_lower", "bissl_upper"):
        text = (f"{path} ({n} stage{'' if n == 1 else 's'} of N_L {c['lower_steps']} / N_U {c['upper_steps']}, "
                f"γ {c['gamma']:g})")
        label = "BiSSL θ_P (lower)" if kind == "bissl_lower" else "BiSSL θ_D (upper)"
        return Stage(kind, kind, label, loaded.backbone, pre, text, (c["downstream"], c.get("labels_per_class")))
    # finetuned: the reported model's backbone, labelled by the checkpoint the run started from
    origin = _finetuned_from(loaded.lineage.get("init") or {})
    short, label = FINETUNE_SOURCES.get(origin, (origin, f"fine-tuned ({origin})"))
    return Stage(f"finetuned_{short}", "finetuned", label, loaded.backbone, pre,
                 f"{path} ({c['epochs']} epochs, lr {c['lr']:g}, wd {c['weight_decay']:g}, from a {origin} checkpoint)",
                 (c["downstream"], c.get("labels_per_class")))


def random_init_backbone(pre_cfg, in_channels: int) -> Stage:
    """The backbone at step 0 of the pre-training run (same seed, same initialisation): the control."""
    from ..pretrain import build_model
    backbone = build_model(pre_cfg, in_channels).backbone
    return Stage("random", "random", "random init", backbone.eval(), pre_cfg,
                 f"initialisation of seed {pre_cfg.seed} (step 0 of pre-training)")


def _checkpoint_paths(cfg: FeaturesConfig) -> dict[str, list[tuple[str, bool]]]:
    """Per stage kind, the checkpoint paths to read and whether each was named explicitly."""
    runs = Path(cfg.runs_dir)

    def one(explicit, default):
        return [(explicit, True)] if explicit is not None else [(str(default), False)]

    fts = ([(p, True) for p in cfg.finetune_checkpoints] if cfg.finetune_checkpoints is not None
           else [(str(runs / "finetune" / "checkpoint.pt"), False)])
    bissl = one(cfg.bissl_checkpoint, runs / "bissl" / "checkpoint.pt")
    return {"pretrained": one(cfg.pretrain_checkpoint, runs / "pretrain" / "checkpoint.pt"),
            "bissl_lower": bissl, "bissl_upper": bissl, "finetuned": fts}


def _same_architecture(a, b) -> bool:
    keys = ("arch", "width", "small_stem", "image_size", "paper_augment")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _lineage_differences(a, b) -> str:
    """The pre-training settings (other than bookkeeping such as out_dir) in which two configs differ."""
    from ..pretrain import PretrainConfig, as_run
    skip = PretrainConfig.resumable_fields()
    da, db = as_run(a.to_dict()), as_run(b.to_dict())
    return "; ".join(f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if k not in skip and da[k] != db.get(k))


def collect_stages(cfg: FeaturesConfig, *, log=print) -> tuple[list[Stage], list[str]]:
    """The stages of ``cfg.stages`` that exist, in order, and the notes about those skipped.

    A checkpoint at its default place that is missing is skipped with a note; one named in the config
    that is missing (or unreadable, or for another architecture or task) is an error. Random init needs
    the architecture of some other stage (preferably the pre-training run's)."""
    paths = _checkpoint_paths(cfg)
    loaded: dict[str, list[Stage]] = {}
    notes: list[str] = []
    for kind in cfg.stages:
        if kind == "random":
            continue
        for path, explicit in paths[kind]:
            if not Path(path).is_file():
                if explicit:
                    field_name = {"pretrained": "pretrain_checkpoint", "finetuned": "finetune_checkpoints"}.get(
                        kind, "bissl_checkpoint")
                    raise CheckpointError(f"{field_name}: checkpoint {path!r} (stage {kind!r}) does not exist")
                notes.append(f"skipped {kind!r}: no checkpoint at {path} (run the notebook that makes it, "
                             "or name the file in the parameters)")
                continue
            loaded.setdefault(kind, []).append(load_stage(path, kind))
    found = [s for kind in cfg.stages for s in loaded.get(kind, [])]
    reference = (loaded.get("pretrained") or found or [None])[0]
    if reference is None:
        raise CheckpointError("no checkpoint found for any stage of " + ", ".join(cfg.stages) +
                              f" (looked under runs_dir={cfg.runs_dir!r}); run notebooks 01–03 first or name "
                              "the checkpoints in the parameters")
    kept = []
    for s in found:
        if not _same_architecture(s.pre_cfg, reference.pre_cfg):
            msg = (f"stage {s.label!r} ({s.source}) has another architecture or image size than "
                   f"{reference.label!r}; the panels must show one architecture")
            if any(explicit for _, explicit in paths[s.kind]):
                raise CheckpointError(msg)
            notes.append("skipped: " + msg)
            continue
        differs = _lineage_differences(s.pre_cfg, reference.pre_cfg)
        if s is not reference and differs:
            notes.append(f"note: {s.label!r} descends from a pre-training run with other settings than "
                         f"{reference.label!r} ({differs}); the two are not one pipeline")
        kept.append(s)
    stages = []
    for kind in cfg.stages:
        if kind == "random":
            stages.append(random_init_backbone(reference.pre_cfg, reference.backbone.in_channels))
        stages.extend(s for s in kept if s.kind == kind)
    # unique keys (several fine-tuned runs from the same source kind)
    seen: dict[str, int] = {}
    for s in stages:
        n = seen.get(s.key, 0)
        seen[s.key] = n + 1
        if n:
            s.key, s.label = f"{s.key}_{n + 1}", f"{s.label} #{n + 1}"
    for note in notes:
        log(note)
    return stages, notes


def resolve_task(cfg: FeaturesConfig, stages: list[Stage], *, log=print) -> tuple[str, int | None]:
    """The downstream task: the config's, else the first BiSSL or fine-tuned stage's, else digits. A
    stage trained on another task is kept (its features are still measured on this task) with a note."""
    task = ((cfg.downstream, cfg.labels_per_class) if cfg.downstream is not None
            else next((s.task for s in stages if s.task is not None), ("digits", None)))
    for s in stages:
        if s.task is not None and s.task[0] != task[0]:
            log(f"note: {s.label!r} was trained on {s.task[0]!r}; its features are measured on {task[0]!r}")
    return task


# ---- data and features -----------------------------------------------------------------------------------

@dataclass
class TaskData:
    name: str
    labels_per_class: int | None
    split: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    eval_source_index: np.ndarray  # position of each eval image in the source dataset (provenance)
    num_classes: int
    mean: tuple
    std: tuple

    @property
    def task(self) -> str:
        return self.name if self.labels_per_class is None else f"{self.name}:{self.labels_per_class}"

    def class_names(self) -> list[str]:
        if self.name == "fashion_mnist":
            return list(FASHION_MNIST_CLASSES)
        return [str(c) for c in range(self.num_classes)]


def load_task(name: str, labels_per_class: int | None, split: str, pre_cfg, *, data_root=None) -> TaskData:
    """Train split (k-NN/probe memory) and eval split at the pre-training image size, with its normalisation."""
    from ..pretrain import pretext_view_specs

    size = pre_cfg.image_size
    train = data_mod.load_downstream(name, "train", root=data_root, image_size=size,
                                     labels_per_class=labels_per_class).materialize()
    if train.multilabel:  # colours, silhouettes, the k-NN and the probe all take one class per image
        from ..config import ConfigError
        raise ConfigError(f"features: downstream={name!r} is multi-label (several classes per image); the feature "
                          "analysis (class colours, silhouette, k-NN, linear probe) needs one class per image, so "
                          "choose a single-label downstream set")
    ev = data_mod.load_downstream(name, split, root=data_root, image_size=size).materialize()
    view = pretext_view_specs(pre_cfg, train.images.shape[1])[0]
    return TaskData(name, labels_per_class, split, train.images, train.labels, ev.images, ev.labels,
                    np.asarray(ev.indices), train.num_classes, view.mean, view.std)
