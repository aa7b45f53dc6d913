"""How a backbone is recorded and rebuilt, and the one loader of backbones from checkpoints.

Every checkpoint stores a *recipe* (``checkpoint["backbone"]``) beside the backbone's state, so any
loader can rebuild the network without the user repeating its architecture: ``{"builder": "resnet",
"arch": ..., "width": ..., "in_channels": ..., "small_stem": ...}`` for the kit's ResNets
(:mod:`bissl_kit.models`). :func:`load_backbone` reads any checkpoint and returns the backbone of the
role asked for, by default the one the stage hands on: the pre-trained backbone, BiSSL's lower
backbone θ_P, the fine-tuned backbone of the reported model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .checkpoint import CheckpointError, content_signature, load_checkpoint, load_state

# the backbones a checkpoint of each kind holds, the first being what the stage hands on
ROLES = {"pretrain": ("pretrained",), "bissl": ("lower", "upper"), "finetune": ("finetuned",)}


def recipe_of(backbone: nn.Module) -> dict:
    """The recipe that rebuilds ``backbone`` (see the module docstring)."""
    return {"builder": "resnet", **backbone.signature()}


def rebuild(recipe: dict) -> nn.Module:
    """A freshly initialised backbone from its recipe."""
    from .models import build_backbone
    if recipe.get("builder") != "resnet":
        raise CheckpointError(f"unknown backbone builder {recipe.get('builder')!r} in the recipe {recipe}")
    return build_backbone(**{k: v for k, v in recipe.items() if k != "builder"})


def check_recipe(found: dict, expected: dict, *, where: str) -> None:
    """Raise naming every architecture field in which a checkpoint's backbone differs from the model's."""
    diffs = [f"{k}: checkpoint {found.get(k)!r} vs model {v!r}" for k, v in expected.items() if found.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {where!r} is for another architecture ({'; '.join(diffs)})")


@dataclass
class LoadedBackbone:
    """A backbone read from a checkpoint, with what it came from."""

    backbone: nn.Module
    role: str               # "pretrained", "lower", "upper" or "finetuned"
    kind: str               # the checkpoint's kind
    path: str
    step: int               # finished steps / stages / epochs of the run that wrote it
    config: dict            # that run's config
    pretrain_config: object  # the PretrainConfig the backbone descends from (architecture, image size, views)
    lineage: dict = field(default_factory=dict)
    signature: str = ""     # the checkpoint's content signature (bissl_kit.checkpoint.content_signature)

    @property
    def in_channels(self) -> int:
        return self.backbone.in_channels


def load_backbone(path: str | Path, which: str | None = None) -> LoadedBackbone:
    """The backbone of role ``which`` of any checkpoint (default: the one its stage hands on: pre-trained,
    BiSSL's lower θ_P, or the fine-tuned one), rebuilt from its recipe, in eval mode."""
    from .pretrain import PretrainConfig

    ckpt = load_checkpoint(path)
    roles = ROLES[ckpt["kind"]]
    which = roles[0] if which is None else which
    if which not in roles:
        raise CheckpointError(f"{str(path)!r} is a {ckpt['kind']!r} checkpoint: it holds the backbone(s) "
                              f"{', '.join(map(repr, roles))}, not {which!r}")
    backbone = rebuild(ckpt["backbone"])
    load_state(backbone, ckpt["backbones"][which], where=str(path), what=f"{which} backbone")
    pre = PretrainConfig.from_saved(ckpt["lineage"]["pretrain_config"])
    return LoadedBackbone(backbone.eval(), which, ckpt["kind"], str(path), ckpt["step"], ckpt["config"], pre,
                          ckpt["lineage"], content_signature(ckpt))
