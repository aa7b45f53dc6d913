"""The paper presets of every stage against the spec's values (spec §2.2–§2.6, §3)."""
import pytest

from bissl_kit.bissl import BisslConfig
from bissl_kit.bissl.config import PAPER_NEURIPS_UPPER
from bissl_kit.compare import CompareConfig
from bissl_kit.config import ConfigError
from bissl_kit.finetune import FinetuneConfig
from bissl_kit.presets import PAPER_DOWNSTREAM, compare_values, pretrain_values, steps_per_epoch
from bissl_kit.pretrain import PretrainConfig

# the data and k-NN sets of the pretext presets ('stl10+train', 'imagenet') are read by the pretext readers
# of issue 18 part 1; the rest of each preset must build today
EMBEDDED_DATA = dict(pretext_dataset="fashion_mnist", eval_dataset="digits")

# spec §2.2, the rows every version shares
SHARED = dict(image_size=96, batch_size=1024, lr=4.8, weight_decay=1e-6, momentum=0.9, temperature=0.5, proj_hidden=256,
              proj_dim=256, width=64, small_stem=False, paper_augment=True, pretext_forward="per_view",
              partial_batch="keep", official_first_step=True, crop_scale=(0.08, 1.0), sync_bn=True)


def test_iclr_pretraining_is_v1s():
    v = pretrain_values("iclr")
    assert {k: v[k] for k in SHARED} == SHARED
    assert (v["arch"], v["method"], v["pretext_dataset"]) == ("resnet18", "simclr", "stl10+train")
    # 105,000 images in batches of 1024 with the last one kept: 103 steps an epoch; 500 epochs, warm-up 10
    assert steps_per_epoch("stl10+train", 1024) == 103
    assert (v["steps"], v["warmup_steps"]) == (500 * 103, 10 * 103)
    assert pretrain_values("iclr", baseline=True)["steps"] == 600 * 103  # spec §3: the baseline's 600 epochs
    assert steps_per_epoch("stl10", 1024) == 98  # spec §3's "98 steps per epoch" of the unlabeled set
    cfg = PretrainConfig.paper_iclr(**EMBEDDED_DATA)
    assert {k: getattr(cfg, k) for k in SHARED} == SHARED and cfg.steps == 51_500


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_neurips_pretraining_is_v3s(method):
    v = pretrain_values("neurips", method=method)
    assert {k: v[k] for k in SHARED} == SHARED
    assert (v["arch"], v["method"], v["pretext_dataset"], v["byol_ema"]) == ("resnet50", method, "imagenet", 0.9995)
    assert v["steps"] == 500 * 1252 and v["warmup_steps"] == 12_520  # ⌈1,281,167 / 1024⌉ = 1252 steps an epoch
    assert PretrainConfig.paper_neurips(method=method, **EMBEDDED_DATA).method == method


def test_preset_errors_name_what_is_wrong():
    with pytest.raises(ConfigError, match="ICLR version pre-trains with SimCLR only"):
        pretrain_values("iclr", method="byol")
    with pytest.raises(ConfigError, match="V3 has no separate baseline pre-training"):
        pretrain_values("neurips", baseline=True)
    with pytest.raises(ConfigError, match="version='icml' must be one of 'iclr', 'neurips'"):
        compare_values("icml")
    with pytest.raises(ConfigError, match="unknown PretrainConfig parameter"):
        PretrainConfig.paper_iclr(epochs=3, **EMBEDDED_DATA)


def test_finetuning_and_search_presets():
    ft = FinetuneConfig.paper()
    assert (ft.epochs, ft.batch_size, ft.momentum, ft.sync_bn, ft.eval_every, ft.select) == (400, 256, 0.9, True, 1,
                                                                                          "best_val")
    for version, trials in (("iclr", 200), ("neurips", 100)):
        c = CompareConfig.paper(version)
        assert (c.trials, c.seeds, c.epochs, c.batch_size, c.select) == (trials, 10, 400, 256, "best_val")
        assert (c.lr_range, c.wd_range) == ((1e-4, 1.0), (1e-5, 1e-2))


def test_bissl_presets_match_the_spec_table():
    """Spec §2.2: T 500, N_L 20, N_U 8, B_P 1024, B_D 256, lower LARS 1.0 / 1e-6 / 0.9, λ 1e-3, δ 10, K 5,
    grad clip 10 at both levels, 20 head warm-up epochs; γ 0.01 (V1) and 1 (V3); V1 upper SGD 0.015 / 0.01."""
    shared = dict(stages=500, lower_steps=20, upper_steps=8, lower_batch_size=1024, upper_batch_size=256, lower_lr=1.0,
                  lower_weight_decay=1e-6, lower_momentum=0.9, lam=1e-3, damping=10.0, resolved_solver_iters=5,
                  solver="layerwise", lower_clip=10.0, upper_clip=10.0, head_warmup_epochs=20, hessian_batches=1,
                  upper_momentum=0.9)
    iclr = BisslConfig.paper_iclr()
    assert {k: getattr(iclr, k) for k in shared} == shared
    assert (iclr.gamma, iclr.upper_lr, iclr.upper_weight_decay, iclr.lower_warmup_passes) == (0.01, 0.015, 0.01, 10)
    neurips = BisslConfig.paper_neurips(downstream="cifar100", method="byol")
    assert {k: getattr(neurips, k) for k in shared} == shared
    assert (neurips.gamma, neurips.upper_lr, neurips.upper_weight_decay, neurips.lower_warmup) == (1.0, 0.01, 1e-3, 200)


def test_the_downstream_sets_are_the_versions():
    assert len(PAPER_DOWNSTREAM["neurips"]) == 12 and set(PAPER_DOWNSTREAM["neurips"]) == set(PAPER_NEURIPS_UPPER["byol"])
    assert set(PAPER_DOWNSTREAM["iclr"]) == set(PAPER_DOWNSTREAM["neurips"]) | {"stl10", "fashion_mnist"}
