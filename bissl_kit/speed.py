"""The speed options of the training stages: bfloat16 autocast, channels-last memory and ``torch.compile``.

All three are off by default (the CPU default; with them off a run is bit-identical to one of a kit
without them) and are config fields of each stage (``bf16``, ``channels_last``, ``compile``), not
resumable: they change the numbers (bf16 at every step; channels-last and compile through other kernels'
summation order on a GPU), so a run resumes only under the values it started with.

Where each is valid (docs/scale.md has the measurements):

* **pre-training and fine-tuning** (first-order: one backward per step): all three. bf16 autocasts the
  training forward passes; losses, optimiser states and the k-NN / val / test evaluations stay float32.
  ``compile`` compiles the loss (pre-training) or the classifier's forward (fine-tuning); the checkpoint
  holds the uncompiled modules' state, so a compiled and an uncompiled run read each other's files.
* **BiSSL**: only ``channels_last``. The hypergradient's Hessian-vector products differentiate a
  gradient (double backward): ``torch.compile``'s AOTAutograd does not support double backward, and in
  bfloat16 (8 bits of mantissa) the Hessian-vector products that the conjugate-gradient / MINRES solve
  iterates on are too coarse for its residual tolerances. A BiSSL config with either set is a
  :class:`~bissl_kit.config.ConfigError` naming the option (:data:`BISSL_INVALID`).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from .config import ConfigError, param

# the reason each option is invalid in the BiSSL stage (its hypergradient needs double backward)
BISSL_INVALID = {
    "bf16": "the hypergradient's Hessian-vector products and their linear solve need float32 (bfloat16 keeps "
            "8 mantissa bits, coarser than the solver's residual tolerance)",
    "compile": "the hypergradient's Hessian-vector products differentiate a gradient (double backward), which "
               "torch.compile's AOTAutograd does not support",
}


def bf16_param():
    return param(False, "bfloat16 autocast of the training forward passes (GPUs with bf16, recent CPUs); "
                 "evaluations stay float32 (bissl_kit.speed)")


def channels_last_param():
    return param(False, "channels-last memory format for the network and its inputs (faster convolutions on "
                 "GPUs, with bf16 above all; bissl_kit.speed)")


def compile_param():
    return param(False, "torch.compile the training forward (minutes of compilation at the start, then faster "
                 "steps on a GPU; bissl_kit.speed)")


def check_bissl(cfg) -> None:
    """Raise naming each speed option that is set but invalid in the BiSSL stage (module docstring)."""
    for name, why in BISSL_INVALID.items():
        if getattr(cfg, name, False):
            raise ConfigError(f"{name}=True is not valid in the BiSSL stage: {why}; use it for pre-training and "
                              "fine-tuning (channels_last is valid in all three)")


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on ``device`` when ``enabled``; a no-op context otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def memory_format(module: nn.Module, channels_last: bool) -> nn.Module:
    """``module`` with its 4-d parameters and buffers in channels-last layout (in place) when asked."""
    return module.to(memory_format=torch.channels_last) if channels_last else module


def inputs(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An image batch in the layout the network was given (channels-last strides when asked)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def compiled(fn: Callable, enabled: bool) -> Callable:
    """``torch.compile(fn)`` when ``enabled`` (a module, or a bound method such as ``model.loss``), else ``fn``.
    The module's own parameters stay those of the uncompiled module: its state_dict is unchanged."""
    return torch.compile(fn) if enabled else fn
