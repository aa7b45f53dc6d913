"""Backbones of one's own: torchvision and timm models by name and a user function behind the kit's backbone
contract, rebuilt from every checkpoint's recipe without the user repeating the architecture."""
import sys

import pytest
import torch

from bissl_kit.backbones import build, load_backbone, rebuild, recipe_of
from bissl_kit.checkpoint import CheckpointError, load_checkpoint
from bissl_kit.config import ConfigError
from bissl_kit.finetune import FinetuneConfig, finetune
from bissl_kit.pretrain import PretrainConfig, Pretrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_pretrain(out_dir, arch: str, **changes):
    cfg = PretrainConfig(arch=arch, steps=2, batch_size=16, warmup_steps=1, proj_hidden=16, proj_dim=8, knn_every=0,
                         eval_labels_per_class=2, checkpoint_every=2, image_size=8, progress=False, device="cpu",
                         out_dir=str(out_dir), **changes)
    trainer = Pretrainer(cfg)
    for _ in trainer.run():
        pass
    return trainer, out_dir / "checkpoint.pt"


def same_features(a: torch.nn.Module, b: torch.nn.Module, in_channels: int = 1) -> bool:
    x = torch.randn(3, in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_torchvision_backbone_is_rebuilt_from_its_checkpoint(tmp_path):
    trainer, path = tiny_pretrain(tmp_path / "pre", "tv:resnet18")
    ckpt = load_checkpoint(path)
    assert ckpt["backbone"] == {"builder": "torchvision", "arch": "tv:resnet18", "in_channels": 1}
    loaded = load_backbone(path)  # nothing but the file: the recipe names the model
    assert loaded.backbone.feat_dim == 512 and loaded.in_channels == 1
    assert same_features(loaded.backbone, trainer.model.backbone)
    # the head is gone: the output is the 512-d pooled feature, not 1000 logits
    assert trainer.model.backbone(torch.zeros(2, 1, 16, 16)).shape == (2, 512)


def test_timm_backbone_is_rebuilt_by_pretraining_and_fine_tuning_loaders(tmp_path):
    pytest.importorskip("timm")
    trainer, path = tiny_pretrain(tmp_path / "pre", "timm:resnet10t")
    assert load_checkpoint(path)["backbone"] == {"builder": "timm", "arch": "timm:resnet10t", "in_channels": 1}
    assert same_features(load_backbone(path).backbone, trainer.model.backbone)
    ft = FinetuneConfig(backbone_checkpoint=str(path), epochs=1, batch_size=64, labels_per_class=4, test=False,
                        progress=False, device="cpu", out_dir=str(tmp_path / "ft"))
    result = finetune(ft)
    assert 0 <= result["val_top1"] <= 1
    tuned = load_checkpoint(tmp_path / "ft" / "checkpoint.pt")
    assert tuned["backbone"]["builder"] == "timm"
    assert not same_features(load_backbone(tmp_path / "ft" / "checkpoint.pt").backbone, trainer.model.backbone)


USER_MODULE = '''
import torch
from torch import nn


def tiny(in_channels):
    # no feat_dim attribute: the kit measures it
    return nn.Sequential(nn.Conv2d(in_channels, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


def unpooled(in_channels):
    return nn.Conv2d(in_channels, 4, 3)


def not_a_module(in_channels):
    return 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_backbones.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_backbones"
    sys.modules.pop("my_backbones", None)


def test_a_user_function_is_a_backbone_and_its_checkpoint_names_it(tmp_path, user_module):
    trainer, path = tiny_pretrain(tmp_path / "pre", f"{user_module}:tiny")
    assert trainer.model.backbone.feat_dim == 6
    assert load_checkpoint(path)["backbone"] == {"builder": "function", "arch": "my_backbones:tiny", "in_channels": 1}
    assert same_features(load_backbone(path).backbone, trainer.model.backbone)
    # where the user's module cannot be imported, reading the checkpoint says what is missing
    sys.modules.pop(user_module)
    sys.path.remove(str(tmp_path))
    with pytest.raises(CheckpointError, match="cannot be rebuilt here.*'my_backbones' cannot be imported"):
        load_backbone(path)


def test_the_kits_resnets_keep_their_recipe():
    b = build("resnet18", in_channels=1, width=4, small_stem=True)
    assert recipe_of(b) == {"builder": "resnet", "arch": "resnet18", "width": 4, "in_channels": 1, "small_stem": True}
    assert same_features(rebuild(recipe_of(b)), b) is False  # a fresh initialisation ...
    c = rebuild(recipe_of(b))
    c.load_state_dict(b.state_dict())
    assert same_features(c, b)  # ... that takes the saved state


@pytest.mark.parametrize("arch, message", [
    ("resnet34", "arch='resnet34' is not allowed; arch must be 'resnet18' or 'resnet50'"),
    ("tv:resnet_nope", "torchvision has no classification model 'resnet_nope'"),
    ("tv:fasterrcnn_resnet50_fpn", "torchvision has no classification model"),
    ("timm:not_a_model", "timm has no model 'not_a_model'"),
    ("no_such_module_xyz:f", "module 'no_such_module_xyz' cannot be imported"),
    ("math:nope", "module 'math' has no 'nope'"),
    ("math:pi", "math.pi is not a function"),
])
def test_an_unknown_backbone_is_a_config_error_naming_it(arch, message):
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PretrainConfig(arch=arch)


def test_the_kits_resnet_knobs_are_refused_with_a_foreign_backbone_not_ignored():
    PretrainConfig(arch="tv:resnet18")  # at their defaults they are unused, and fine
    with pytest.raises(ConfigError, match=r"width=64, small_stem=False: width and small_stem apply to the kit's "
                                          r"ResNets .* set them to their unused defaults \(width=16 small_stem=True\)"):
        PretrainConfig(arch="tv:resnet18", width=64, small_stem=False)


def test_without_timm_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as on a core install: `import timm` raises ImportError
    with pytest.raises(ConfigError, match=r"needs timm, which is not installed: pip install 'bissl_kit\[timm\]'"):
        PretrainConfig(arch="timm:resnet10t")
    with pytest.raises(CheckpointError, match="cannot be rebuilt here.*bissl_kit\\[timm\\]"):
        rebuild({"builder": "timm", "arch": "timm:resnet10t", "in_channels": 3})


def test_a_user_function_that_breaks_the_contract_is_named(user_module):
    with pytest.raises(ConfigError, match="returns \\(1, 4, 62, 62\\) for a 64-px image, not \\(N, D\\) features"):
        build(f"{user_module}:unpooled", in_channels=1)
    with pytest.raises(ConfigError, match="returned a int, not an nn.Module"):
        build(f"{user_module}:not_a_module", in_channels=1)
