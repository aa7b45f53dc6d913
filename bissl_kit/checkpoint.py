"""Checkpoints: a plain dict (kind, config, step, states, signature), written atomically.

A checkpoint is written to a temporary file in the same directory, flushed to disk and renamed over
the old one, so a run killed at any moment leaves either the previous complete checkpoint or the new
complete one, never half a file. Loading checks the kind, the format and the backbone signature and
names what differs, before any state is touched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, truncated, or from another kind or architecture."""


class RunConflictError(CheckpointError):
    """A run folder holds a run with another config: resuming it would mix two runs, starting afresh
    would overwrite it. Always the user's choice, never a failed trial to record and skip."""


def nonfinite_entries(obj: Any, prefix: str = "") -> list[str]:
    """Names (``model['backbone.bn1.running_var']``) of the floating-point tensors in ``obj`` (nested dicts,
    lists, tuples) that hold a NaN or an Inf."""
    if isinstance(obj, torch.Tensor):
        return [prefix or "tensor"] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += nonfinite_entries(v, f"{prefix}[{k!r}]" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out += nonfinite_entries(v, f"{prefix}[{i}]")
    return out


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` (plus the format number) to ``path``.

    A payload with a NaN or Inf in any floating-point tensor is refused with :class:`FloatingPointError`
    (naming the checkpoint's kind, step and the tensors) and the previous checkpoint is kept: a diverged
    state (e.g. an overflowed BatchNorm running variance, which a finite training loss does not reveal)
    must never replace the last good one."""
    path = Path(path)
    bad = nonfinite_entries(payload)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        kind = payload.get("kind", "unknown")
        unit = {"bissl": "stage", "finetune": "epoch"}.get(kind, "step")
        kept = (f"the last good checkpoint {str(path)!r} is kept unchanged" if path.exists()
                else f"no checkpoint was written to {str(path)!r}")
        raise FloatingPointError(
            f"{kind} checkpoint at {unit} {payload.get('step')} not written: non-finite values (NaN/Inf) in "
            f"{shown}; the run diverged and {kept} (lower the learning rate, or clip gradients)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({**payload, "format": FORMAT}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, *, kind: str | None = None,
                    signature: dict | None = None) -> dict[str, Any]:
    """Read a checkpoint, checking that it is complete, of ``kind`` and for ``signature``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable or truncated "
                              f"({type(e).__name__}: {e}); delete it or point to another file") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a bissl_kit checkpoint of format {FORMAT}")
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(f"{str(path)!r} holds a {ckpt.get('kind')!r} checkpoint, expected {kind!r}")
    if signature is not None:
        check_signature(ckpt.get("signature", {}), signature, where=str(path))
    return ckpt


def check_signature(found: dict, expected: dict, *, where: str) -> None:
    """Raise naming every architecture field that differs between a checkpoint and the model."""
    diffs = [f"{k}: checkpoint {found.get(k)!r} vs model {v!r}" for k, v in expected.items() if found.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {where!r} is for another architecture ({'; '.join(diffs)})")
