"""The deterministic batch iterator: one pass over a dataset in an order fixed by (seed, epoch)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ..rng import generator


def iterate_batches(dataset, batch_size, *, seed, epoch=0, shuffle=True, drop_last=True, num_workers=0,
                    device="cpu"):
    """Yield (images uint8, labels int64) batches on ``device``, one pass over ``dataset``.

    The order is a permutation drawn from (seed, "batches", epoch) only, so the same arguments give
    the same batches on any machine, and a resumed run can start at any epoch. In-memory datasets
    (``.images`` tensor, or a TensorDataset) are sliced by tensor indexing; others go through a
    DataLoader with ``num_workers`` workers and the same order. ``drop_last`` drops the partial
    last batch.
    """
    n = len(dataset)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 (got {batch_size!r})")
    if drop_last and batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the dataset ({n} examples) and drop_last=True, "
                         "so there would be no batch at all; use a smaller batch_size or drop_last=False")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0 (got {num_workers!r})")
    order = torch.randperm(n, generator=generator(seed, "batches", epoch)) if shuffle else torch.arange(n)
    order = order[: n - n % batch_size if drop_last else n]
    device = torch.device(device)

    images = getattr(dataset, "images", None)
    labels = getattr(dataset, "labels", None)
    if images is None and isinstance(dataset, torch.utils.data.TensorDataset):
        images, labels = dataset.tensors[:2]

    def batches():
        if isinstance(images, torch.Tensor):
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                yield images[idx].to(device), labels[idx].to(device)
            return
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(), num_workers=num_workers,
                            pin_memory=device.type == "cuda")
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return batches()  # a generator made after the checks, so bad arguments fail at the call
