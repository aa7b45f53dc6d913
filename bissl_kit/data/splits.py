"""The split rules: stratified train/val/test carves with the fixed :data:`SPLIT_SEED`, few-label
train subsets, and the digits and Caltech101 rules (the protocol is in :mod:`bissl_kit.data`)."""

from __future__ import annotations

import numpy as np

SPLIT_SEED = 0  # every train/val/test carve uses this seed; never change it (results would stop being comparable)
VAL_FRACTION = 0.2  # share of each class of the official train split that becomes val (spec §2.5: cifar10 32k/8k)
DIGITS_TEST_FRACTION = 0.2  # digits has no official test split; this share of each class is held out as test
CALTECH_TRAINVAL_PER_CLASS = 30  # the usual Caltech101 protocol; the paper's 2424/606/5647 follow from it


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices 0..N-1 into (kept, held). For each class in increasing label order, a
    permutation from ``np.random.default_rng(seed)``; its first round(fraction·n_class) go to held.
    Both results are sorted, so a split keeps the original order of the data."""
    rng = np.random.default_rng(seed)
    held = [rng.permutation(idx)[: int(fraction * len(idx) + 0.5)]
            for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held), held


def _take_per_class(labels: np.ndarray, n: int, seed: int, what: str) -> np.ndarray:
    """Sorted indices of ``n`` examples per class, drawn like :func:`_stratified_split`."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < n:
        raise ValueError(f"{what}: asked for {n} per class, but class {classes[counts.argmin()]} has only "
                         f"{counts.min()}")
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n] for c in classes]))


def _carve(labels: np.ndarray, split: str) -> np.ndarray:
    """train/val indices carved from an official train split: VAL_FRACTION per class is val."""
    train, val = _stratified_split(labels, VAL_FRACTION, SPLIT_SEED)
    return train if split == "train" else val


def _digits_split(labels: np.ndarray, split: str) -> np.ndarray:
    rest, test = _stratified_split(labels, DIGITS_TEST_FRACTION, SPLIT_SEED)
    if split == "test":
        return test
    return rest[_carve(labels[rest], split)]


def _caltech_split(labels: np.ndarray, split: str) -> np.ndarray:
    trainval = _take_per_class(labels, CALTECH_TRAINVAL_PER_CLASS, SPLIT_SEED, "caltech101 train+val")
    if split == "test":
        return np.setdiff1d(np.arange(len(labels)), trainval)
    return trainval[_carve(labels[trainval], split)]
