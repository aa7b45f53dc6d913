"""Frozen-backbone evaluation: feature extraction and weighted k-NN accuracy.

The k-NN classifier is the weighted vote of DINO and solo-learn: features are L2-normalised, the k
training samples with the highest cosine similarity s vote for their class with weight exp(s/T), and
the class with the largest total wins. k and T are part of the protocol and are printed beside every
number (:func:`knn_protocol`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .augment import normalize


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, *, mean, std, batch_size: int = 512,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """Pooled features of uint8 ``images`` (N×C×H×W) in eval mode (BN running statistics, no
    augmentation); the backbone's train/eval mode is restored afterwards."""
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
