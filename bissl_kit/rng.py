"""Seeding: every random draw comes from a generator derived from (run seed, purpose, index).

Deriving a fresh generator per step (instead of carrying one generator's state along) makes a run
resumable at any step with bit-identical results and no RNG state in the checkpoint.
"""

from __future__ import annotations

import hashlib

import torch

from .config import ConfigError


def derive_seed(seed: int, *tags) -> int:
    """A 63-bit seed from the run seed and any tags (strings, ints), stable across processes."""
    text = repr((int(seed),) + tuple(tags)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def generator(seed: int, *tags) -> torch.Generator:
    """A CPU generator for (seed, *tags); draw on CPU, then move to the model's device."""
    return torch.Generator().manual_seed(derive_seed(seed, *tags))


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was asked for, but CUDA is not available here; use 'cpu' or 'auto'")
    if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise ConfigError(f"device={device!r}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1}")
    return torch.device(device)
