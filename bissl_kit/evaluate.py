"""Frozen-backbone evaluation: features, weighted k-NN, linear probe, silhouette, and the one entry point.

:func:`evaluate_frozen` is what every stage calls (the pre-training monitor, fine-tuning's and the
comparison's frozen numbers, notebook 04): features of a train and an eval split under a stated
BatchNorm protocol, then whichever of the k-NN, the linear probe and the silhouette is asked for, each
returned with its protocol string.

The k-NN classifier is the weighted vote of DINO and solo-learn: features are L2-normalised, the k
training samples with the highest cosine similarity s vote for their class with weight exp(s/T), and
the class with the largest total wins. k and T are part of the protocol and are printed beside every
number (:func:`knn_protocol`).

BatchNorm statistics of the frozen features. In eval mode a BN layer normalises with the running
statistics its buffers hold. After pre-training those are a momentum average of the last few
*augmented* batches; at random initialisation they are the buffers' initial values (mean 0, var 1),
so BN is the identity and a random network is an un-normalised random conv net, whose pooled features
approximate a pixel-space kernel (on 8×8 digits a strong one). Comparing a trained backbone with a
random one "as they are" therefore compares two normalisation protocols. :func:`estimate_bn_stats`
("precise BN") gives a *copy* of the backbone whose running statistics are the exact average over a
fixed set of un-augmented images (the pre-training monitor uses pretext images: no downstream data,
no labels); applied to every network alike, random and trained are compared like for like.

The silhouette of the true classes (:func:`silhouette_samples`, scikit-learn's): for an image, a =
mean distance to its own class, b = mean distance to the nearest other class, s = (b − a)/max(a, b);
+1 separated classes, 0 overlapping, < 0 closer to another class.

The linear probe (:func:`linear_probe`) is a multinomial logistic regression on frozen features,
standardised with the train split's per-dimension mean and standard deviation, trained by mini-batch
SGD with momentum and a cosine schedule from a zero initialisation. The problem is convex, so the seed
only orders the batches; its hyper-parameters are printed beside every number (:meth:`ProbeResult.protocol`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .augment import normalize
from .rng import generator


def _local_batchnorm(module: nn.Module) -> None:
    """Make every synchronised BatchNorm of ``module`` (a private copy) an ordinary one, in place: the
    statistics are estimated in one process (the k-NN monitor runs on rank 0 alone, so a
    synchronising layer would wait for ranks that never come). Parameters and buffers are kept; the
    backbones here are 2-D conv nets, so a synchronised layer becomes a ``BatchNorm2d``."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) not in (nn.BatchNorm1d, nn.BatchNorm2d,
                                                                              nn.BatchNorm3d):
            m.__class__ = nn.BatchNorm2d


@torch.no_grad()
def estimate_bn_stats(backbone: nn.Module, images: torch.Tensor, *, mean, std, batch_size: int = 512,
                      device: str | torch.device = "cpu") -> nn.Module:
    """A copy of ``backbone``, in eval mode, whose BN running statistics are estimated on the uint8
    ``images`` (N×C×H×W, normalised with mean/std, no augmentation): "precise BN".

    ``torch.optim.swa_utils.update_bn`` does it: every BN layer's statistics are reset and re-accumulated
    as a cumulative average (momentum None) of the per-batch statistics over the batches of ``images``
    in train mode (one batch: exactly the images' mean and unbiased variance; equal batches: the exact
    mean and the mean within-batch variance), each layer seeing the output of the layers before it in
    train mode. ``backbone`` itself (parameters, buffers, train/eval mode) is not touched. A backbone
    without BN layers is returned as an eval-mode copy."""
    from torch.optim.swa_utils import update_bn

    bb = copy.deepcopy(backbone).to(device)
    _local_batchnorm(bb)
    batches = (normalize(images[i:i + batch_size].to(device), mean, std) for i in range(0, len(images), batch_size))
    update_bn(batches, bb)
    return bb.eval()


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, *, mean, std, batch_size: int = 512,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """Pooled features of uint8 ``images`` (N×C×H×W) in eval mode (BN running statistics, no
    augmentation); the backbone's train/eval mode is restored afterwards. For features under
    re-estimated BN statistics, pass ``estimate_bn_stats(backbone, ...)`` (once for all splits)."""
    was_training = backbone.training
    backbone.eval()
    try:
        feats = [backbone(normalize(images[i:i + batch_size].to(device), mean, std)).float().cpu()
                 for i in range(0, len(images), batch_size)]
    finally:
        backbone.train(was_training)
    return torch.cat(feats)


@dataclass(frozen=True)
class KNNResult:
    accuracy: float  # top-1, in [0, 1]
    k: int
    temperature: float
    n_train: int
    n_eval: int

    def protocol(self) -> str:
        return knn_protocol(self.k, self.temperature, self.n_train, self.n_eval)


def knn_protocol(k: int, temperature: float, n_train: int, n_eval: int) -> str:
    return f"weighted k-NN (cosine, k={k}, T={temperature:g}), {n_train} train → {n_eval} eval samples"


def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, feats: torch.Tensor, *, k: int,
                temperature: float, num_classes: int, chunk: int = 1024) -> torch.Tensor:
    """Class scores (N, num_classes) of the weighted k-NN vote."""
    if k < 1:
        raise ValueError(f"k={k!r} must be >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    k = min(k, len(train_feats))
    train = F.normalize(train_feats, dim=1)
    scores = []
    for i in range(0, len(feats), chunk):
        sim = F.normalize(feats[i:i + chunk], dim=1) @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_feats, train_labels, feats, labels, *, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None) -> KNNResult:
    num_classes = num_classes or int(max(train_labels.max(), labels.max())) + 1
    pred = knn_predict(train_feats, train_labels, feats, k=k, temperature=temperature,
                       num_classes=num_classes).argmax(1)
    acc = (pred == labels).float().mean().item()
    return KNNResult(acc, min(k, len(train_feats)), temperature, len(train_feats), len(feats))


# ---- linear probe ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeResult:
    accuracy: float  # top-1 on the eval features, in [0, 1]
    train_accuracy: float  # top-1 on the train features (a probe far below 1 here is under-fitted)
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    n_train: int
    n_eval: int

    def protocol(self) -> str:
        return (f"linear probe (logistic regression on standardised frozen features, SGD momentum 0.9, "
                f"cosine lr {self.lr:g}→0, wd {self.weight_decay:g}, {self.epochs} epochs of batch {self.batch_size}), "
                f"{self.n_train} train → {self.n_eval} eval samples")


PROBE_MOMENTUM = 0.9


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, eval_feats: torch.Tensor,
                 eval_labels: torch.Tensor, *, epochs: int = 100, lr: float = 0.1, weight_decay: float = 0.0,
                 batch_size: int = 256, seed: int = 0, num_classes: int | None = None) -> ProbeResult:
    """Top-1 accuracy of a logistic-regression probe trained on frozen ``train_feats`` (N×D).

    Both feature sets are standardised with the train features' mean and standard deviation (so the
    probe sees every dimension on one scale, whatever the backbone's feature norms). The weights start
    at zero; SGD (momentum 0.9, coupled weight decay on the weights, not the bias) runs ``epochs``
    passes over seeded permutations with the lr decayed by a cosine from ``lr`` to 0. Deterministic on
    CPU for a given ``seed``. Computed in float64 on the CPU: the probe is tiny and this keeps it
    independent of the features' dtype and device.
    """
    for name, v, ok in (("epochs", epochs, isinstance(epochs, int) and epochs >= 1),
                        ("lr", lr, isinstance(lr, (int, float)) and lr > 0),
                        ("weight_decay", weight_decay, isinstance(weight_decay, (int, float)) and weight_decay >= 0),
                        ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1)):
        if not ok:
            raise ValueError(f"linear_probe: {name}={v!r} must be " +
                             {"epochs": "an int >= 1", "lr": "a number > 0", "weight_decay": "a number >= 0",
                              "batch_size": "an int >= 1"}[name])
    if train_feats.ndim != 2 or eval_feats.ndim != 2 or train_feats.shape[1] != eval_feats.shape[1]:
        raise ValueError(f"linear_probe: features must be N×D with the same D (got {tuple(train_feats.shape)} "
                         f"and {tuple(eval_feats.shape)})")
    if len(train_feats) != len(train_labels) or len(eval_feats) != len(eval_labels):
        raise ValueError("linear_probe: every feature row needs one label")
    y = train_labels.detach().to("cpu", torch.long)
    ye = eval_labels.detach().to("cpu", torch.long)
    num_classes = num_classes or int(max(y.max(), ye.max())) + 1
    # Single-threaded: the probe's matrices are tiny, so threads only add synchronisation (on a busy
    # 2-core machine two threads were an order of magnitude slower than one), and one thread makes the
    # result independent of the caller's thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w, b, mean, std = _fit_probe(train_feats, y, num_classes, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                     batch_size=batch_size, seed=seed)
    finally:
        torch.set_num_threads(threads)
    x = (train_feats.detach().to("cpu", torch.float64) - mean) / std
    xe = (eval_feats.detach().to("cpu", torch.float64) - mean) / std
    train_acc = ((x @ w + b).argmax(1) == y).double().mean().item()
    acc = ((xe @ w + b).argmax(1) == ye).double().mean().item()
    return ProbeResult(acc, train_acc, epochs, float(lr), float(weight_decay), batch_size, len(x), len(xe))


def _fit_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int, lr: float,
               weight_decay: float, batch_size: int, seed: int):
    """(W, b, mean, std) of the probe: logits = ((x − mean)/std) W + b, minimising the mean
    cross-entropy + (weight_decay/2)‖W‖² by SGD with momentum and a cosine lr."""
    x = feats.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.long)
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)  # constant dimensions stay 0
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64)
    b = torch.zeros(num_classes, dtype=torch.float64)
    mw, mb = torch.zeros_like(w), torch.zeros_like(b)
    total = epochs * -(-len(x) // batch_size)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator(seed, "linear-probe", epoch))
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            xb, yb = x[idx], y[idx]
            # gradient of the mean cross-entropy, written out: (softmax(xW + b) − onehot(y)) / n
            p = torch.softmax(xb @ w + b, dim=1)
            p[torch.arange(len(idx)), yb] -= 1.0
            p /= len(idx)
            mw.mul_(PROBE_MOMENTUM).add_(xb.T @ p + weight_decay * w)
            mb.mul_(PROBE_MOMENTUM).add_(p.sum(0))
            step_lr = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            w.sub_(step_lr * mw)
            b.sub_(step_lr * mb)
            step += 1
    return w, b, mean, std


def accuracy_topk(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Fraction of samples whose label is among the k highest logits (k capped at the class count)."""
    out = {}
    for k in ks:
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices
        out[k] = (top == labels[:, None]).any(1).float().mean().item()
    return out


# ---- multi-label: average precision ----------------------------------------------------------------------

VOC07_RECALLS = tuple(t / 10 for t in range(11))  # the 11 recall levels of the VOC2007 interpolated AP


def average_precision(scores: torch.Tensor, targets: torch.Tensor, ignore: torch.Tensor | None = None, *,
                      interpolated: bool = True) -> torch.Tensor:
    """Per-class average precision (float64, C) of ``scores`` (N×C, raw logits: only their order counts) against
    multi-hot ``targets`` (N×C), all classes at once on CPU tensors.

    Each class ranks the images by score; at rank r, precision = TP/r' and recall = TP/P, where TP counts
    the positives among the first r, r' the images among them that are not ignored, and P the positives.
    ``ignore`` (bool N×C) drops an image from a class's ranking: VOC07's "difficult" images (the only
    objects of the class there are difficult). ``interpolated``: the VOC2007 11-point AP, the mean over
    t ∈ {0, 0.1, …, 1} of the largest precision at a recall ≥ t (0 where none reaches t); else the
    non-interpolated AP, the mean of the precisions at the ranks of the positives (scikit-learn's
    ``average_precision_score`` without ties). A class without positives gets NaN."""
    s = scores.detach().to("cpu", torch.float64)
    pos = targets.detach().to("cpu") > 0
    if s.ndim != 2 or s.shape != pos.shape:
        raise ValueError(f"average_precision: scores and targets must both be N×C (got {tuple(s.shape)} and "
                         f"{tuple(pos.shape)})")
    keep = torch.ones_like(pos) if ignore is None else ~ignore.detach().to("cpu", torch.bool)
    order = s.argsort(dim=0, descending=True, stable=True)
    pos, keep = pos.gather(0, order), keep.gather(0, order)
    tp = (pos & keep).cumsum(0, dtype=torch.float64)
    seen = keep.cumsum(0, dtype=torch.float64)
    n_pos = tp[-1]
    precision = torch.where(keep, tp / seen.clamp_min(1), torch.zeros_like(tp))  # an ignored rank adds no point
    recall = tp / n_pos.clamp_min(1)
    if interpolated:
        # t = k/10 and recall = TP/P are both correctly rounded, so a recall of exactly t counts
        ap = sum(torch.where(recall >= t, precision, torch.zeros_like(precision)).amax(0)
                 for t in VOC07_RECALLS) / len(VOC07_RECALLS)
    else:
        ap = (precision * (pos & keep)).sum(0) / n_pos.clamp_min(1)
    return torch.where(n_pos > 0, ap, torch.full_like(ap, math.nan))


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor, ignore: torch.Tensor | None = None, *,
                           interpolated: bool = True) -> float:
    """The mean over classes of :func:`average_precision`, in [0, 1] (the VOC2007 "mAP" is 100×): classes without
    a positive in the split are left out of the mean (every class has positives in each VOC2007 split; a tiny
    subset may not). Raises when no class has one."""
    ap = average_precision(scores, targets, ignore, interpolated=interpolated)
    ap = ap[~ap.isnan()]
    if not len(ap):
        raise ValueError("mean_average_precision: no class has a positive (non-ignored) image")
    return ap.mean().item()


# ---- class separability ----------------------------------------------------------------------------------

def silhouette_samples(feats: torch.Tensor, labels: torch.Tensor, *, metric: str = "cosine") -> torch.Tensor:
    """Per-sample silhouette of the true classes in float64 (scikit-learn's; a sample alone in its class
    gets 0, the usual convention)."""
    from sklearn.metrics import silhouette_samples as sk_silhouette

    x = feats.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.long)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"silhouette: features must be N×D with one label each (got {tuple(x.shape)}, {len(y)} labels)")
    if len(torch.unique(y)) < 2:
        raise ValueError("silhouette: needs at least two classes")
    return torch.from_numpy(sk_silhouette(x.numpy(), y.numpy(), metric=metric))


@dataclass(frozen=True)
class SeparabilityResult:
    silhouette: float
    metric: str
    n: int
    num_classes: int

    def protocol(self) -> str:
        return (f"silhouette of the true classes in feature space ({self.metric} distance), "
                f"{self.n} samples, {self.num_classes} classes; +1 separated, 0 overlapping")


def separability(feats: torch.Tensor, labels: torch.Tensor, *, metric: str = "cosine") -> SeparabilityResult:
    """Mean silhouette of the true classes in feature space."""
    s = silhouette_samples(feats, labels, metric=metric)
    return SeparabilityResult(s.mean().item(), metric, len(s), int(torch.unique(labels).numel()))


# ---- the entry point -------------------------------------------------------------------------------------

@dataclass
class FrozenEvaluation:
    """What :func:`evaluate_frozen` measured; ``None`` for what was not asked for."""

    bn: str                                  # the BatchNorm protocol of the features
    knn: KNNResult | None = None
    knn_predictions: torch.Tensor | None = None  # the k-NN's class per eval sample
    probe: ProbeResult | None = None
    silhouette: SeparabilityResult | None = None
    silhouette_samples: torch.Tensor | None = None
    eval_features: torch.Tensor | None = None

    def protocols(self, where: str) -> dict[str, str]:
        """Each measurement's protocol, prefixed by ``where`` (e.g. 'digits val')."""
        out = {}
        for name, res in (("knn", self.knn), ("probe", self.probe), ("silhouette", self.silhouette)):
            if res is not None:
                out[name] = f"{where}, {res.protocol()}, {self.bn}"
        return out


def frozen_features(backbone: nn.Module, train_images: torch.Tensor, eval_images: torch.Tensor, *, mean, std,
                    bn_images: torch.Tensor | None = None, device: str | torch.device = "cpu"):
    """(train features, eval features) of a frozen backbone: pooled, eval-mode BatchNorm, no augmentation;
    with ``bn_images`` the BN statistics are re-estimated on them first, on a copy (once for both splits)."""
    kw = dict(mean=mean, std=std, device=device)
    net = estimate_bn_stats(backbone, bn_images, **kw) if bn_images is not None else backbone
    return extract_features(net, train_images, **kw), extract_features(net, eval_images, **kw)


def evaluate_frozen(backbone: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                    evaluation: tuple[torch.Tensor, torch.Tensor], *, mean, std, num_classes: int,
                    bn_images: torch.Tensor | None = None, bn: str = "BN statistics as held",
                    knn_k: int | None = 20, knn_temperature: float = 0.07, probe: dict | None = None,
                    silhouette: str | None = None, keep_features: bool = False, seed: int = 0,
                    device: str | torch.device = "cpu") -> FrozenEvaluation:
    """A frozen backbone's numbers on an ``evaluation`` split (uint8 images, labels), with ``train`` as the
    k-NN's memory and the probe's training set.

    ``bn_images`` (uint8, unaugmented): BatchNorm statistics re-estimated on them first, on a copy
    (:func:`estimate_bn_stats`), and ``bn`` names that protocol; else the statistics as the backbone
    holds them. ``knn_k`` None skips the k-NN; ``probe`` (the :func:`linear_probe` settings: epochs, lr,
    weight_decay) adds the probe; ``silhouette`` (a metric, 'cosine' or 'euclidean') adds the silhouette
    of the eval split's true classes."""
    if train[1].ndim != 1 or evaluation[1].ndim != 1:
        raise ValueError("evaluate_frozen: labels must be one class index per image; a multi-label set (VOC07) has no "
                         "k-NN, probe or silhouette here (bissl_kit.downstream.frozen_metrics skips them)")
    train_f, eval_f = frozen_features(backbone, train[0], evaluation[0], mean=mean, std=std, bn_images=bn_images,
                                      device=device)
    out = FrozenEvaluation(bn, eval_features=eval_f if keep_features else None)
    if knn_k is not None:
        scores = knn_predict(train_f, train[1], eval_f, k=knn_k, temperature=knn_temperature, num_classes=num_classes)
        out.knn_predictions = scores.argmax(1)
        out.knn = KNNResult((out.knn_predictions == evaluation[1]).float().mean().item(), min(knn_k, len(train_f)),
                            knn_temperature, len(train_f), len(eval_f))
    if probe is not None:
        out.probe = linear_probe(train_f, train[1], eval_f, evaluation[1], seed=seed, num_classes=num_classes, **probe)
    if silhouette is not None:
        out.silhouette_samples = silhouette_samples(eval_f, evaluation[1], metric=silhouette)
        out.silhouette = SeparabilityResult(out.silhouette_samples.mean().item(), silhouette, len(eval_f),
                                            int(torch.unique(evaluation[1]).numel()))
    return out
