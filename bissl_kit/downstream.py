"""The downstream task a backbone is fine-tuned and measured on: its splits, and the evaluations on them.

:func:`load_data` reads a task's train and val splits at the pre-training image size with its
normalisation, and the test split only when asked for (:meth:`DownstreamData.test`: a search trial never
loads it). :func:`evaluate_split` gives a model's top-1/top-5 (mAP for a multi-label task, VOC07) and loss on
a split, across torchrun ranks too; :func:`frozen_metrics` a frozen backbone's k-NN and linear probe
(:func:`bissl_kit.evaluate.evaluate_frozen`; skipped, with the reason, on a multi-label task).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from . import distributed
from .augment import downstream_train_spec, normalize
from .evaluate import accuracy_topk, mean_average_precision
from .losses import downstream_loss

# the metrics reported per task kind, by record key suffix (val_top1, test_map, ...), and how tables name them
SINGLE_LABEL_METRICS = ("top1", "top5")
MULTILABEL_METRICS = ("map",)
METRIC_LABELS = {"top1": "top-1", "top5": "top-5", "map": "mAP"}
MAP_PROTOCOL = "mAP (VOC2007 11-point interpolated AP on the logits, mean over classes, difficult images ignored)"


def metrics_of(multilabel: bool) -> tuple[str, ...]:
    """The metrics of a task, the first one the selection key ('top1'; 'map' for a multi-label task)."""
    return MULTILABEL_METRICS if multilabel else SINGLE_LABEL_METRICS


def metrics_text(rec: dict, split: str) -> str:
    """'val top-1 52.00%, top-5 90.10%' or 'val mAP 45.30' (VOC07's ×100), from a record's ``{split}_{metric}``."""
    parts = [f"{METRIC_LABELS[m]} " + (f"{100 * rec[f'{split}_{m}']:.2f}" if m == "map" else f"{rec[f'{split}_{m}']:.2%}")
             for m in SINGLE_LABEL_METRICS + MULTILABEL_METRICS if f"{split}_{m}" in rec]
    return f"{split} " + ", ".join(parts)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, n: int, *, difficult=None,
                           multilabel_loss: str = "softmax_ce") -> dict:
    """Metrics and mean loss of this rank's ``logits`` of an evaluation set of ``n`` samples (its
    :func:`~bissl_kit.distributed.eval_slice` under torchrun; every rank must call it): top1/top5 for class
    indices, the mean over the union of the ranks' parts; ``map`` for multi-hot labels (``difficult``: the
    whole split's mask), the mAP of the union (the logits are gathered). The loss is the training loss
    (:func:`~bissl_kit.losses.downstream_loss`)."""
    if labels.ndim == 1:
        if distributed.is_distributed():
            return distributed.union_metrics(logits, labels, n)
        # half precision (bf16 autocast) up to float32; float64 (the exact tests' toys) stays float64
        logits = logits.cpu() if logits.dtype == torch.float64 else logits.float().cpu()
        acc = accuracy_topk(logits, labels.cpu())
        return {"top1": acc[1], "top5": acc[5], "loss": F.cross_entropy(logits, labels.cpu()).item()}
    logits, labels = distributed.gather_parts(logits, n).double().cpu(), distributed.gather_parts(labels, n).cpu()
    return {"map": mean_average_precision(logits, labels, None if difficult is None else difficult.cpu()),
            "loss": downstream_loss(logits, labels, multilabel_loss).item()}


@dataclass
class DownstreamData:
    """Train and val splits in memory, and the test split behind :meth:`test` (loaded on first use only:
    a search trial never calls it). ``mean``/``std`` are the pre-training views' normalisation."""

    name: str
    labels_per_class: int | None
    train: data_mod.Split
    val: data_mod.Split
    load_test: Callable[[], data_mod.Split]
    mean: tuple
    std: tuple
    train_spec: object
    _test: data_mod.Split | None = None

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def multilabel(self) -> bool:
        return self.train.multilabel

    @property
    def metrics(self) -> tuple[str, ...]:
        return metrics_of(self.multilabel)

    @property
    def task(self) -> str:
        return task_name(self.name, self.labels_per_class)

    def test(self) -> data_mod.Split:
        if self._test is None:
            self._test = self.load_test()
        return self._test


def task_name(downstream: str, labels_per_class: int | None) -> str:
    """'digits', or 'fashion_mnist:50' for 50 labelled train images per class."""
    return downstream if labels_per_class is None else f"{downstream}:{labels_per_class}"


def load_data(downstream: str, pre_cfg, *, labels_per_class=None, labels_seed=0, data_root=None) -> DownstreamData:
    """The downstream splits at the pre-training image size, with its normalisation and channels."""
    from .pretrain import pretext_view_specs

    size = pre_cfg.image_size
    train = data_mod.load_downstream(downstream, "train", root=data_root, image_size=size,
                                     labels_per_class=labels_per_class, seed=labels_seed).materialize()
    val = data_mod.load_downstream(downstream, "val", root=data_root, image_size=size).materialize()
    channels = train.images.shape[1]
    views = pretext_view_specs(pre_cfg, channels)

    def load_test():
        return data_mod.load_downstream(downstream, "test", root=data_root, image_size=size).materialize()

    return DownstreamData(downstream, labels_per_class, train, val, load_test, views[0].mean, views[0].std,
                          downstream_train_spec(size, channels, paper=pre_cfg.paper_augment))


# ---- evaluation ----------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_split(backbone: nn.Module, head: nn.Module, split, *, mean, std, device="cpu",
                   batch_size: int = 1024, multilabel_loss: str = "softmax_ce") -> dict:
    """Top-1, top-5 and cross-entropy (mAP and ``multilabel_loss`` for a multi-label split) of (backbone,
    head) on a split in memory, eval mode (restored after).

    Under torchrun every rank evaluates its disjoint part of the split and the metrics are those of the
    union (:func:`classification_metrics`): every rank must call it."""
    n = len(split)
    images, labels = split.images, split.labels
    many = distributed.is_distributed()
    if many:
        if n < distributed.world_size():
            raise ValueError(f"the split has {n} samples, fewer than the {distributed.world_size()} ranks")
        part = distributed.eval_slice(n)
        images, labels = images[part], labels[part]
    dtype = next(head.parameters()).dtype  # the images come as float32; a float64 model gets float64
    modes = backbone.training, head.training
    backbone.eval()
    head.eval()
    try:
        logits = [head(backbone(normalize(images[i:i + batch_size].to(device), mean, std).to(dtype)))
                  for i in range(0, len(images), batch_size)]
    finally:
        backbone.train(modes[0])
        head.train(modes[1])
    # under torchrun on the model's device (NCCL reduces GPU tensors)
    return {**classification_metrics(torch.cat(logits), labels.to(device) if many else labels, n,
                                     difficult=getattr(split, "difficult", None), multilabel_loss=multilabel_loss),
            "n": n}


# ---- the trainer ---------------------------------------------------------------------------------------


def frozen_metrics(backbone: nn.Module, data: DownstreamData, *, split: str = "val", knn_k: int = 20,
                   knn_temperature: float = 0.07, probe: bool = True, probe_epochs: int = 100,
                   probe_lr: float = 0.1, probe_weight_decay: float = 0.0, seed: int = 0,
                   device="cpu") -> dict:
    """Weighted k-NN and linear-probe accuracy of a frozen backbone: train-split features → ``split``
    (val for monitoring, test only for final numbers). Each value comes with its protocol string. A
    multi-label task gets None for both, the reason in the protocol strings and ``skipped``.
    Under torchrun it uses no collective: every rank computes the whole of it (each sample once, the
    same numbers on every rank), so a caller may run it on rank 0 alone."""
    from .evaluate import evaluate_frozen

    if data.multilabel:  # both vote or predict one class per image; a multi-label version is not built yet
        why = (f"{data.task} {split}: no k-NN or linear probe, {data.name} is multi-label (several classes per image) "
               "and both assume one class per image")
        out = {"knn": None, "knn_protocol": why, "skipped": why}
        return {**out, "probe": None, "probe_protocol": why} if probe else out
    target = data.val if split == "val" else data.test()
    # trained backbones only (pre-trained, BiSSL, fine-tuned): their BN statistics were estimated in
    # training; a random init's were not (notebooks 01 and 04 re-estimate them for that comparison)
    res = evaluate_frozen(backbone, (data.train.images, data.train.labels), (target.images, target.labels),
                          mean=data.mean, std=data.std, num_classes=data.num_classes, bn="BN statistics as held",
                          knn_k=knn_k, knn_temperature=knn_temperature,
                          probe=dict(epochs=probe_epochs, lr=probe_lr, weight_decay=probe_weight_decay) if probe else None,
                          seed=seed, device=device)
    protocols = res.protocols(f"{data.task} {split}")
    out = {"knn": res.knn.accuracy, "knn_protocol": protocols["knn"]}
    if probe:
        out.update(probe=res.probe.accuracy, probe_protocol=protocols["probe"])
    return out
