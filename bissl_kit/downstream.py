"""The downstream task a backbone is fine-tuned and measured on: its splits, and the evaluations on them.

:func:`load_data` reads a task's train and val splits at the pre-training image size with its
normalisation, and the test split only when asked for (:meth:`DownstreamData.test`: a search trial never
loads it). :func:`evaluate_split` gives a model's top-1/top-5 and loss on a split, across torchrun ranks
too; :func:`frozen_metrics` a frozen backbone's k-NN and linear probe (:func:`bissl_kit.evaluate.evaluate_frozen`).
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
from .evaluate import accuracy_topk


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
                   batch_size: int = 1024) -> dict:
    """Top-1, top-5 and cross-entropy of (backbone, head) on a split in memory, eval mode (restored after).

    Under torchrun every rank evaluates its disjoint part of the split and the counts and loss sums are
    added across ranks (:func:`bissl_kit.distributed.union_metrics`): every rank must call it."""
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
    if many:  # on the model's device (NCCL reduces GPU tensors)
        return {**distributed.union_metrics(torch.cat(logits), labels.to(device), n), "n": n}
    logits = torch.cat([lg.float().cpu() for lg in logits])
    acc = accuracy_topk(logits, split.labels)
    return {"top1": acc[1], "top5": acc[5], "loss": F.cross_entropy(logits, split.labels).item(), "n": len(split)}


# ---- the trainer ---------------------------------------------------------------------------------------


def frozen_metrics(backbone: nn.Module, data: DownstreamData, *, split: str = "val", knn_k: int = 20,
                   knn_temperature: float = 0.07, probe: bool = True, probe_epochs: int = 100,
                   probe_lr: float = 0.1, probe_weight_decay: float = 0.0, seed: int = 0,
                   device="cpu") -> dict:
    """Weighted k-NN and linear-probe accuracy of a frozen backbone: train-split features → ``split``
    (val for monitoring, test only for final numbers). Each value comes with its protocol string.
    Under torchrun it uses no collective: every rank computes the whole of it (each sample once, the
    same numbers on every rank), so a caller may run it on rank 0 alone."""
    from .evaluate import evaluate_frozen

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
