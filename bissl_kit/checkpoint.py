"""The checkpoint: one format for every stage, written atomically, read in one place.

A checkpoint is a plain dict:

* ``kind``: the stage that wrote it, ``"pretrain"``, ``"bissl"`` or ``"finetune"``;
* ``format``: :data:`FORMAT`; older files are converted when read (:func:`upgrade`);
* ``config``: the stage's config as run; ``step``: finished steps (pre-training), stages (BiSSL) or
  epochs (fine-tuning);
* ``backbone``: how to rebuild the backbone (a recipe for :func:`bissl_kit.backbones.build_backbone`),
  and ``backbones``: its state by role: ``pretrained`` (pre-training), ``lower`` θ_P and ``upper`` θ_D
  (BiSSL), ``finetuned`` (fine-tuning: the reported model's);
* ``lineage``: where the run comes from: the pre-training config its backbone descends from
  (``pretrain_config``, which also fixes the image size and normalisation), the checkpoint it started
  from (``init``, with the content signature of that file), the run it was forked from (``parent``);
* ``state``: what the stage needs to resume (optimisers, heads, iterators, history).

Writing is atomic (:mod:`bissl_kit.files`): a run killed at any moment, or a full disk, leaves either
the previous complete checkpoint or the new one, never half a file; a state with a NaN or Inf is
never written. Reading checks the kind and the format and names
what is wrong before any state is touched. :func:`load_checkpoint` is the kit's one ``torch.load``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from .files import write_atomic

FORMAT = 2
KINDS = ("pretrain", "bissl", "finetune")
# what a stage's ``step`` counts, for messages
STEP_UNITS = {"pretrain": "step", "bissl": "stage", "finetune": "epoch"}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, truncated, or from another kind or architecture."""


class RunConflictError(CheckpointError):
    """A run folder holds a run with another config: resuming it would mix two runs, starting afresh
    would overwrite it. Always the user's choice, never a failed trial to record and skip."""


def nonfinite_entries(obj: Any, prefix: str = "") -> list[str]:
    """Names (``backbones['lower']['bn1.running_var']``) of the floating-point tensors in ``obj`` (nested
    dicts, lists, tuples) that hold a NaN or an Inf."""
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
        kept = (f"the last good checkpoint {str(path)!r} is kept unchanged" if path.exists()
                else f"no checkpoint was written to {str(path)!r}")
        raise FloatingPointError(
            f"{kind} checkpoint at {STEP_UNITS.get(kind, 'step')} {payload.get('step')} not written: non-finite "
            f"values (NaN/Inf) in {shown}; the run diverged and {kept} (lower the learning rate, or clip gradients)")
    return write_atomic(path, lambda f: torch.save({**payload, "format": FORMAT}, f), binary=True)


def load_checkpoint(path: str | os.PathLike, *, kind: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Read a checkpoint of any format (converted to the current one), checking that it is complete and,
    when ``kind`` is given, of that kind (or one of those kinds)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a folder, not a checkpoint file (a run folder's checkpoint is "
                              f"{str(path / 'checkpoint.pt')!r})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        # weights_only: a checkpoint holds tensors, numbers, strings and containers only, so loading one
        # never runs code from the file
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable or truncated "
                              f"({type(e).__name__}: {e}); delete it or point to another file") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (1, FORMAT):
        raise CheckpointError(f"{str(path)!r} is not a bissl_kit checkpoint (format {FORMAT} or older)")
    ckpt = upgrade(ckpt)
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and ckpt["kind"] not in kinds:
        expected = " or ".join(repr(k) for k in kinds)
        raise CheckpointError(f"{str(path)!r} holds a {ckpt['kind']!r} checkpoint, expected {expected}")
    return ckpt


def load_state(module, state: dict, *, where: str, what: str = "model") -> None:
    """``module.load_state_dict(state)``, or a :class:`CheckpointError` naming the file when the saved state
    does not fit the module (missing or unexpected keys, other shapes: a damaged or foreign checkpoint)."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"checkpoint {where!r}: its {what} does not fit the network it is loaded into "
                              f"({' '.join(first[:2])[:300]}); it is damaged or of another network") from None


def content_signature(checkpoint: str | os.PathLike | dict) -> str:
    """A hash of what a run started from a checkpoint depends on: its kind, step, backbones and, for a
    pre-training checkpoint, the rest of the pretext model (projector, BYOL target). ``checkpoint``: its
    path, or the dict read. A moved or copied file keeps it; another run's checkpoint does not."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((ckpt["kind"], ckpt["step"])).encode())
    parts = {f"backbones.{role}": sd for role, sd in ckpt["backbones"].items()}
    if "rest" in ckpt.get("state", {}):
        parts["rest"] = ckpt["state"]["rest"]
    for part in sorted(parts):
        for name, t in sorted(parts[part].items()):
            h.update(f"{part}.{name}".encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- older formats -----------------------------------------------------------------------------------------

def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _rest(state: dict, prefix: str = "backbone.") -> dict:
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def _recipe(signature: dict, in_channels: int) -> dict:
    return {"builder": "resnet", **{"in_channels": in_channels, **signature}}


def upgrade(ckpt: dict) -> dict:
    """A format-1 checkpoint (four layouts, one per kind) in the current format. Pre-training, BiSSL and
    fine-tuning runs keep the state they resume from; a format-1 compute-matched continuation
    (``pretext_matched``) becomes a pre-training checkpoint whose lineage names the run it continued."""
    if ckpt.get("format") == FORMAT:
        return ckpt
    kind = ckpt["kind"]
    out = {"format": FORMAT, "step": ckpt["step"]}
    if kind == "pretrain":
        return {**out, "kind": "pretrain", "config": ckpt["config"],
                "backbone": _recipe(ckpt["signature"], ckpt["in_channels"]),
                "backbones": {"pretrained": _strip(ckpt["model"], "backbone.")},
                "lineage": {"pretrain_config": ckpt["config"]},
                "state": {"rest": _rest(ckpt["model"]), "optimizer": ckpt["optimizer"]}}
    if kind == "pretext_matched":
        return {**out, "kind": "pretrain", "config": ckpt["pretrain_config"],
                "backbone": _recipe(ckpt["signature"], ckpt["in_channels"]),
                "backbones": {"pretrained": _strip(ckpt["model"], "backbone.")},
                "lineage": {"pretrain_config": ckpt["pretrain_config"],
                            "init": {"checkpoint": ckpt["pretrain_checkpoint"], "continued_steps": ckpt["step"],
                                     "settings": ckpt["settings"]}},
                "state": {"rest": _rest(ckpt["model"]), "optimizer": ckpt["optimizer"]}}
    if kind == "bissl":
        meta, state = ckpt["meta"], ckpt["state"]
        return {**out, "kind": "bissl", "config": ckpt["config"],
                "backbone": _recipe(ckpt["signature"], meta["in_channels"]),
                "backbones": {"lower": _strip(state["lower"], "backbone."), "upper": state["upper"]},
                "lineage": {"pretrain_config": meta["pretrain_config"]},
                "state": {**{k: v for k, v in state.items() if k not in ("lower", "upper")},
                          "lower_rest": _rest(state["lower"]), "num_classes": meta["num_classes"]}}
    if kind == "finetune":
        reported = ckpt.get("reported") or ckpt["model"]
        return {**out, "kind": "finetune", "config": ckpt["config"],
                "backbone": _recipe(ckpt["signature"], ckpt["in_channels"]),
                "backbones": {"finetuned": reported["backbone"]},
                "lineage": {"pretrain_config": ckpt["pretrain_config"], "init": ckpt["source"]},
                "state": {k: ckpt.get(k) for k in ("model", "optimizer", "best", "reported", "history", "result",
                                                   "num_classes")}}
    raise CheckpointError(f"a format-1 checkpoint of unknown kind {kind!r}")
