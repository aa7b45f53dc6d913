"""Backbones: torchvision's ResNet with a width and stem option; heads of the paper."""
import pytest
import torch
import torchvision

from bissl_kit.models import Classifier, Projector, build_backbone


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_standard_widths_match_torchvision():
    for arch, tv in (("resnet18", torchvision.models.resnet18), ("resnet50", torchvision.models.resnet50)):
        ours = build_backbone(arch, in_channels=3, width=64, small_stem=False)
        ref = tv()
        assert n_params(ours) == n_params(ref) - n_params(ref.fc)
        assert ours.feat_dim == ref.fc.in_features


def test_narrow_cpu_default_shapes_and_size():
    b = build_backbone()  # resnet18, width 16, small stem, 1 channel
    assert b.feat_dim == 128
    assert 0.6e6 < n_params(b) < 0.8e6
    assert b(torch.randn(3, 1, 28, 28)).shape == (3, 128)
    assert isinstance(b.maxpool, torch.nn.Identity) and b.conv1.kernel_size == (3, 3)


def test_paper_setting_96px_resnet50():
    b = build_backbone("resnet50", in_channels=3, width=8, small_stem=False)
    assert b(torch.randn(2, 3, 96, 96)).shape == (2, 8 * 8 * 4)


def test_projector_layout_of_the_spec():
    p = Projector(128)
    linears = [m for m in p if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128, 256), (256, 256), (256, 256)]
    assert linears[-1].bias is None and linears[0].bias is not None
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in p) == 2


def test_classifier_and_bad_arguments():
    c = Classifier(build_backbone(width=4), num_classes=10)
    assert c(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="arch='resnet34'"):
        build_backbone("resnet34")
    with pytest.raises(ValueError, match="in_channels=2"):
        build_backbone(in_channels=2)
