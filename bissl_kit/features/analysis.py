"""The analysis: every stage's numbers (k-NN, probe, silhouette) and, on request, its UMAP picture."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import data as data_mod
from ..evaluate import evaluate_frozen
from .config import FeaturesConfig
from .embedding import stratified_subset, umap_embeddings
from .stages import TaskData, collect_stages, load_task, resolve_task


@dataclass
class StageResult:
    key: str
    label: str
    source: str
    knn: float
    probe: float
    silhouette: float
    knn_correct: np.ndarray      # per eval image
    knn_pred: np.ndarray         # per eval image
    silhouette_per_image: np.ndarray
    features: np.ndarray | None = None   # (pictured images) × feat_dim
    embedding: np.ndarray | None = None  # (pictured images) × 2


@dataclass
class FeatureAnalysis:
    cfg: FeaturesConfig
    data: TaskData
    stages: list[StageResult]
    protocols: dict[str, str]     # "knn", "probe", "silhouette", "umap"
    pictured: np.ndarray          # indices into the eval split of the pictured images
    reference: str
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def stage(self, key: str) -> StageResult:
        return next(s for s in self.stages if s.key == key)

    def rows(self) -> list[dict]:
        return [{"stage": s.label, "k-NN": s.knn, "linear probe": s.probe, "silhouette": s.silhouette,
                 "checkpoint": s.source} for s in self.stages]

    def protocol_text(self) -> str:
        d = self.data
        return "\n".join([f"task: {d.task}, train → {d.split} ({len(d.train_labels)} → {len(d.eval_labels)} images)",
                          f"features: {self.protocols['bn']}",
                          f"k-NN: {self.protocols['knn']}", f"probe: {self.protocols['probe']}",
                          f"separability: {self.protocols['silhouette']}", f"pictures: {self.protocols['umap']}"])


def analyse(cfg: FeaturesConfig, *, log=print) -> FeatureAnalysis:
    """Load every stage that exists, extract features, compute the numbers (:func:`measure`) and the
    UMAP pictures (:func:`embed`)."""
    return embed(measure(cfg, log=log))


def measure(cfg: FeaturesConfig, *, log=print) -> FeatureAnalysis:
    """Every stage's features and numbers; the pictured images' features are kept for :func:`embed`."""
    t0 = time.perf_counter()
    stages, notes = collect_stages(cfg, log=log)
    name, lpc = resolve_task(cfg, stages, log=log)
    data = load_task(name, lpc, cfg.split, stages[0].pre_cfg, data_root=cfg.data_root)
    seconds = {"load": time.perf_counter() - t0}
    device = torch.device(cfg.device)

    t0 = time.perf_counter()
    results, protocols = [], {}
    pictured = stratified_subset(data.eval_labels, cfg.max_points, cfg.seed)
    from ..pretrain import KNN_BN_PROTOCOLS, knn_bn_images
    bn_images = None
    if cfg.bn == "pretext":
        pre = stages[0].pre_cfg
        bn_images = knn_bn_images(data_mod.load_pretext(pre.pretext_dataset, root=cfg.data_root,
                                                        image_size=pre.image_size))
    protocols["bn"] = KNN_BN_PROTOCOLS[cfg.bn]
    probe = dict(epochs=cfg.probe_epochs, lr=cfg.probe_lr, weight_decay=cfg.probe_weight_decay)
    for st in stages:
        res = evaluate_frozen(st.backbone.to(device), (data.train_images, data.train_labels),
                              (data.eval_images, data.eval_labels), mean=data.mean, std=data.std,
                              num_classes=data.num_classes, bn_images=bn_images, bn=KNN_BN_PROTOCOLS[cfg.bn],
                              knn_k=cfg.knn_k, knn_temperature=cfg.knn_temperature, probe=probe,
                              silhouette=cfg.metric, keep_features=True, seed=cfg.seed, device=device)
        protocols.update(knn=res.knn.protocol(), probe=res.probe.protocol(), silhouette=res.silhouette.protocol())
        pred = res.knn_predictions
        results.append(StageResult(st.key, st.label, st.source, res.knn.accuracy, res.probe.accuracy,
                                   res.silhouette.silhouette, (pred == data.eval_labels).numpy(), pred.numpy(),
                                   res.silhouette_samples.numpy(), features=res.eval_features[pictured].numpy()))
    seconds["features and numbers"] = time.perf_counter() - t0
    reference = next((s.key for s in stages if s.kind == cfg.reference_stage), stages[0].key)
    return FeatureAnalysis(cfg, data, results, protocols, pictured, reference, notes, seconds)


def embed(analysis: FeatureAnalysis) -> FeatureAnalysis:
    """Fill in each stage's 2-D UMAP embedding of the pictured images (and the pictures' protocol)."""
    cfg = analysis.cfg
    t0 = time.perf_counter()
    emb = umap_embeddings({r.key: r.features for r in analysis.stages}, cfg, analysis.reference)
    for r in analysis.stages:
        r.embedding = emb[r.key]
    analysis.seconds["umap"] = time.perf_counter() - t0
    ref_label = analysis.stage(analysis.reference).label
    how = {"aligned": f"one UMAP per stage, Procrustes-aligned to {ref_label!r}",
           "pooled": "one UMAP fitted on all stages' features stacked (positions not comparable across stages)",
           "reference": f"UMAP fitted on {ref_label!r}, the other stages transformed into it"}[cfg.umap_fit]
    analysis.protocols["umap"] = (f"{how}; n_neighbors={cfg.n_neighbors}, min_dist={cfg.min_dist:g}, "
                                  f"metric={cfg.metric}, seed={cfg.seed}; {len(analysis.pictured)} "
                                  f"{analysis.data.split} images")
    return analysis


def changed_predictions(analysis: FeatureAnalysis, before: str, after: str) -> tuple[list[int], list[int]]:
    """Eval images the k-NN gets wrong at ``before`` and right at ``after`` (fixed), and the reverse (broken)."""
    a, b = analysis.stage(before).knn_correct, analysis.stage(after).knn_correct
    return np.flatnonzero(~a & b).tolist(), np.flatnonzero(a & ~b).tolist()
