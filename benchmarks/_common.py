"""Small helpers shared by the benchmark scripts (not part of the kit's API)."""
from __future__ import annotations

import os

import torch


def device_name(device: str | torch.device) -> str:
    """The card's name on CUDA (every GPU number must name it), else the CPU's cores and torch threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def sync(device: str | torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock time covers it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flat(ts) -> torch.Tensor:
    """A tuple of parameter-shaped tensors as one vector."""
    return torch.cat([t.reshape(-1) for t in ts])
