"""UMAP embeddings of each stage's features, made comparable across panels (see the package docstring)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import FeaturesConfig


def procrustes_align(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``x`` rotated or reflected (the orthogonal Procrustes solution R), rescaled to the spread of
    ``ref`` and shifted onto its centre, so that the same rows of both lie as close as possible. Only
    a similarity transform: the picture is never bent. The scale is *not* the least-squares one, which
    shrinks a panel towards its centre the less it resembles the reference; here every panel keeps the
    reference's root-mean-square spread."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    xc, rc = x - x.mean(0), ref - ref.mean(0)
    u, _, vt = np.linalg.svd(xc.T @ rc)
    scale = math.sqrt((rc ** 2).sum() / max((xc ** 2).sum(), 1e-300))
    return scale * xc @ (u @ vt) + ref.mean(0)


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``n`` samples, the same share of every class, drawn with ``seed``."""
    y = labels.numpy()
    if len(y) <= n:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.append(rng.permutation(idx)[:max(1, round(n * len(idx) / len(y)))])
    return np.sort(np.concatenate(keep))


def _reducer(cfg: FeaturesConfig, n: int):
    import umap  # ~10 s of numba compilation on the first fit of a process

    return umap.UMAP(n_neighbors=min(cfg.n_neighbors, n - 1), min_dist=cfg.min_dist, metric=cfg.metric,
                     random_state=cfg.seed, n_components=2, n_jobs=1)  # seeded UMAP is single-threaded anyway


def umap_embeddings(feats: dict[str, np.ndarray], cfg: FeaturesConfig, reference: str) -> dict[str, np.ndarray]:
    """A 2-D embedding per stage (same images, same order), made comparable as ``cfg.umap_fit`` says
    (module docstring). Deterministic for a given ``cfg.seed`` (``random_state`` runs UMAP single-threaded)."""
    keys = list(feats)
    n = len(next(iter(feats.values())))
    if cfg.umap_fit == "pooled":
        pooled = _reducer(cfg, n * len(keys)).fit_transform(np.concatenate([feats[k] for k in keys]))
        return {k: pooled[i * n:(i + 1) * n] for i, k in enumerate(keys)}
    if cfg.umap_fit == "reference":
        reducer = _reducer(cfg, n).fit(feats[reference])
        return {k: (reducer.embedding_ if k == reference else reducer.transform(feats[k])) for k in keys}
    out = {k: _reducer(cfg, n).fit_transform(feats[k]) for k in keys}
    return {k: (v if k == reference else procrustes_align(v, out[reference])) for k, v in out.items()}
