"""Backbones and heads.

The backbone is torchvision's ResNet (its BasicBlock/Bottleneck, its layer builder), with two options the
paper's timm models lack and small images need:

* ``small_stem``: a 3×3 stride-1 first convolution and no max-pool, the usual CIFAR-style stem. At 28 px
  the ImageNet stem (7×7 stride 2 + max-pool) leaves a 7×7 map before layer1 and 1×1 after layer4.
* ``width``: the channel count of layer1; the layers have (w, 2w, 4w, 8w) channels. ``width=64`` is
  the standard ResNet; ``width=16`` with ResNet-18 is the narrow CPU default (0.7 M parameters, about a
  tenth of a full ResNet-18's step time on a CPU; docs/benchmarks.md).

The classifier ``fc`` is removed: ``backbone(x)`` returns the globally pooled features (N, feat_dim),
like the official code's timm model with ``fc`` replaced by ``Flatten``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

# layers per stage, and the block type, of the two ResNets the paper uses
ARCHS = {
    "resnet18": (tv_resnet.BasicBlock, (2, 2, 2, 2)),
    "resnet50": (tv_resnet.Bottleneck, (3, 4, 6, 3)),
}


class ResNetBackbone(tv_resnet.ResNet):
    """torchvision ResNet with a configurable width, channel count and stem; returns pooled features."""

    def __init__(self, arch: str = "resnet18", *, in_channels: int = 3, width: int = 64,
                 small_stem: bool = False):
        if arch not in ARCHS:
            raise ValueError(f"arch={arch!r} is not supported; choose one of {sorted(ARCHS)}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width={width!r} must be an integer >= 1 (64 = standard ResNet, 16 = narrow CPU default)")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels={in_channels!r} must be 1 (grayscale) or 3 (RGB)")
        block, layers = ARCHS[arch]
        super().__init__(block, list(layers))
        # torchvision hard-codes widths 64..512 inside __init__; rebuild the stages with ours.
        # _make_layer reads and advances self.inplanes, so it is reset before the first stage.
        self.inplanes = width
        self.conv1 = (nn.Conv2d(in_channels, width, 3, 1, 1, bias=False) if small_stem
                      else nn.Conv2d(in_channels, width, 7, 2, 3, bias=False))
        self.bn1 = nn.BatchNorm2d(width)
        if small_stem:
            self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.fc = nn.Identity()
        self.feat_dim = 8 * width * block.expansion
        self.arch, self.width, self.in_channels, self.small_stem = arch, width, in_channels, small_stem
        # the same initialisation torchvision applies to its own layers
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.layer4(self.layer3(self.layer2(self.layer1(
            self.maxpool(self.relu(self.bn1(self.conv1(x))))))))), 1)

    def signature(self) -> dict:
        """What must match for a state_dict of this backbone to load (checked on checkpoint load)."""
        return {"arch": self.arch, "width": self.width, "in_channels": self.in_channels,
                "small_stem": self.small_stem}


def build_backbone(arch: str = "resnet18", *, in_channels: int = 1, width: int = 16,
                   small_stem: bool = True) -> ResNetBackbone:
    """The backbone of every stage. Defaults: the narrow ResNet-18 for 28-px grayscale images on a CPU."""
    return ResNetBackbone(arch, in_channels=in_channels, width=width, small_stem=small_stem)


class Projector(nn.Sequential):
    """SimCLR projector of the paper (spec §2.2): feat→256→256→256, Linear+BN+ReLU twice, then a
    Linear without bias. BYOL's predictor is the same module on 256-d inputs."""

    def __init__(self, in_dim: int, hidden: int = 256, out: int = 256):
        super().__init__(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out, bias=False),
        )


def linear_head(feat_dim: int, num_classes: int) -> nn.Linear:
    """The downstream head: one Linear layer on the pooled features (spec §1.1, φ_D)."""
    return nn.Linear(feat_dim, num_classes)


class Classifier(nn.Module):
    """A backbone with a linear head: the downstream model (θ_D, φ_D)."""

    def __init__(self, backbone: ResNetBackbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = linear_head(backbone.feat_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
