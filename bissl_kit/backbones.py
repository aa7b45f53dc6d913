"""Which backbones the kit builds, how a backbone is recorded and rebuilt, and the one loader of backbones
from checkpoints.

``arch`` (:data:`ARCH_RULE`) names the backbone of every stage:

* ``"resnet18"``, ``"resnet50"``: the kit's ResNets (:mod:`bissl_kit.models`; ``width`` and
  ``small_stem`` apply to these only), the default;
* ``"tv:NAME"``: a torchvision classification model (``torchvision.models.list_models``), randomly
  initialised; its classifier (the last ``nn.Linear`` it registers, which is the head in every
  torchvision classification model) is replaced by the identity, and its first convolution by one of
  ``in_channels`` when the images are not RGB;
* ``"timm:NAME"``: a timm model built with ``num_classes=0`` (no head) and ``in_chans`` (needs the
  ``timm`` extra: ``pip install 'bissl_kit[timm]'``);
* ``"MODULE:FUNCTION"``: a function of yours, called as ``FUNCTION(in_channels=C)``, returning an
  ``nn.Module`` that maps (N, C, H, W) images to (N, D) features; D is its ``feat_dim`` attribute, or
  measured by one forward of a 64-px image.

Every backbone meets one contract: ``backbone(x)`` returns pooled features (N, ``feat_dim``), and it
has ``in_channels`` and ``signature()``. Every checkpoint stores a *recipe* (``checkpoint["backbone"]``)
beside the backbone's state, so any loader (fine-tuning, features, compare) rebuilds the network
without the user repeating it: ``{"builder": "resnet", "arch", "width", "in_channels", "small_stem"}``
for the kit's ResNets, ``{"builder": "torchvision" | "timm" | "function", "arch", "in_channels"}``
otherwise. :func:`load_backbone` reads any checkpoint and returns the backbone of the role asked for,
by default the one the stage hands on: the pre-trained backbone, BiSSL's lower backbone θ_P, the
fine-tuned backbone of the reported model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, content_signature, load_checkpoint, load_state
from .config import ConfigError

KIT_ARCHS = ("resnet18", "resnet50")  # bissl_kit.models.ARCHS (not imported here: models imports torchvision's ResNet)
ARCH_RULE = ("'resnet18' or 'resnet50' (the kit's ResNets), 'tv:NAME' (a torchvision classification model), "
             "'timm:NAME' (a timm model; pip install 'bissl_kit[timm]') or 'MODULE:FUNCTION' (your function, "
             "FUNCTION(in_channels=C) -> nn.Module of (N, C, H, W) images to (N, D) features)")
BUILDERS = {"tv": "torchvision", "timm": "timm"}  # arch prefixes; any other 'a:b' is a function of the user's


def builder_of(arch: str) -> str:
    """'resnet', 'torchvision', 'timm' or 'function': who builds ``arch``."""
    if arch in KIT_ARCHS:
        return "resnet"
    prefix, sep, rest = arch.partition(":")
    if not sep or not prefix or not rest:
        raise ConfigError(f"arch={arch!r} is not allowed; arch must be {ARCH_RULE}")
    return BUILDERS.get(prefix, "function")


def _timm():
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise ConfigError("arch='timm:...' needs timm, which is not installed: pip install 'bissl_kit[timm]' "
                          "(or pip install timm)") from None


def _user_function(arch: str):
    module, _, name = arch.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ConfigError(f"arch={arch!r}: module {module!r} cannot be imported ({e}); a function of yours is "
                          "'MODULE:FUNCTION' with MODULE on the Python path") from None
    except AttributeError:
        raise ConfigError(f"arch={arch!r}: module {module!r} has no {name!r}") from None
    if not callable(fn):
        raise ConfigError(f"arch={arch!r}: {module}.{name} is not a function")
    return fn


def check_arch(name: str, arch: str) -> None:
    """A config check: ``arch`` names a backbone that can be built here (the library installed, the model
    known), so a misspelt model fails when the config is built, not in the middle of a run."""
    builder = builder_of(arch)
    model = arch.partition(":")[2]
    if builder == "torchvision":
        import torchvision
        known = torchvision.models.list_models(module=torchvision.models)  # the classification models only
        if model not in known:
            raise ConfigError(f"{name}={arch!r}: torchvision has no classification model {model!r}; "
                              f"it has {', '.join(known[:12])}, ... (torchvision.models.list_models())")
    elif builder == "timm":
        if not _timm().is_model(model):
            raise ConfigError(f"{name}={arch!r}: timm has no model {model!r} (timm.list_models('*{model[:4]}*') "
                              "lists the close ones)")
    elif builder == "function":
        _user_function(arch)


class ForeignBackbone(nn.Module):
    """A torchvision, timm or user network behind the kit's backbone contract (module docstring)."""

    def __init__(self, net: nn.Module, *, builder: str, arch: str, in_channels: int, feat_dim: int):
        super().__init__()
        self.net = net
        self.builder, self.arch, self.in_channels, self.feat_dim = builder, arch, in_channels, feat_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise RuntimeError(f"backbone arch={self.arch!r} returned {shape}, not (N, feat_dim) features; "
                               "a backbone must pool its features (a function of yours: end with a global pool "
                               "and flatten)")
        return out

    def signature(self) -> dict:
        return {"builder": self.builder, "arch": self.arch, "in_channels": self.in_channels}


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _torchvision(arch: str, in_channels: int) -> ForeignBackbone:
    import torchvision
    net = torchvision.models.get_model(arch.partition(":")[2], weights=None)
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"arch={arch!r} has no Linear classifier to strip; wrap it in a function of yours")
    head_name, head = linears[-1]
    _set_module(net, head_name, nn.Identity())
    conv_name, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels != in_channels:
        _set_module(net, conv_name, nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                              conv.padding, conv.dilation, conv.groups, conv.bias is not None))
    return ForeignBackbone(net, builder="torchvision", arch=arch, in_channels=in_channels, feat_dim=head.in_features)


def _timm_backbone(arch: str, in_channels: int) -> ForeignBackbone:
    net = _timm().create_model(arch.partition(":")[2], pretrained=False, num_classes=0, in_chans=in_channels)
    # with num_classes=0 timm returns the pre-logits features: head_hidden_size where a model has a pre-logits
    # layer (e.g. MobileNetV3), num_features otherwise
    dim = getattr(net, "head_hidden_size", None) or net.num_features
    return ForeignBackbone(net, builder="timm", arch=arch, in_channels=in_channels, feat_dim=int(dim))


def _function_backbone(arch: str, in_channels: int) -> ForeignBackbone:
    net = _user_function(arch)(in_channels=in_channels)
    if not isinstance(net, nn.Module):
        raise ConfigError(f"arch={arch!r} returned a {type(net).__name__}, not an nn.Module")
    dim = getattr(net, "feat_dim", None)
    if dim is None:
        was_training = net.training
        with torch.no_grad():
            out = net.eval()(torch.zeros(1, in_channels, 64, 64))
        net.train(was_training)
        if out.dim() != 2:
            raise ConfigError(f"arch={arch!r} returns {tuple(out.shape)} for a 64-px image, not (N, D) features")
        dim = out.shape[1]
    return ForeignBackbone(net, builder="function", arch=arch, in_channels=in_channels, feat_dim=int(dim))


FOREIGN = {"torchvision": _torchvision, "timm": _timm_backbone, "function": _function_backbone}


def build(arch: str = "resnet18", *, in_channels: int = 1, width: int = 16, small_stem: bool = True) -> nn.Module:
    """A freshly initialised backbone of ``arch`` (module docstring); ``width`` and ``small_stem`` shape the
    kit's ResNets only."""
    from .models import build_backbone
    builder = builder_of(arch)
    if builder == "resnet":
        return build_backbone(arch, in_channels=in_channels, width=width, small_stem=small_stem)
    return FOREIGN[builder](arch, in_channels)

# the backbones a checkpoint of each kind holds, the first being what the stage hands on
ROLES = {"pretrain": ("pretrained",), "bissl": ("lower", "upper"), "finetune": ("finetuned",)}


def recipe_of(backbone: nn.Module) -> dict:
    """The recipe that rebuilds ``backbone`` (see the module docstring)."""
    signature = backbone.signature()
    return signature if "builder" in signature else {"builder": "resnet", **signature}


def rebuild(recipe: dict) -> nn.Module:
    """A freshly initialised backbone from its recipe."""
    builder = recipe.get("builder")
    if builder not in ("resnet", *FOREIGN):
        raise CheckpointError(f"unknown backbone builder {builder!r} in the recipe {recipe}")
    try:
        if builder == "resnet":
            from .models import build_backbone
            return build_backbone(**{k: v for k, v in recipe.items() if k != "builder"})
        return FOREIGN[builder](recipe["arch"], recipe["in_channels"])
    except ConfigError as e:  # the library or the user's module is missing where the checkpoint is read
        raise CheckpointError(f"the checkpoint's backbone {recipe} cannot be rebuilt here: {e}") from None


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
