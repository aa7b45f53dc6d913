"""The paper's settings for every stage, each value with its source in the spec (/work/shared/spec/bissl.md).

Two versions: ``iclr`` (V1, arXiv 2410.02387v1: ResNet-18, SimCLR, STL10) and ``neurips`` (V3, v4 of the
paper: ResNet-50 on ImageNet, SimCLR or BYOL). The config classes expose them as
``PretrainConfig.paper_iclr()``, ``PretrainConfig.paper_neurips(method=...)``, ``FinetuneConfig.paper(...)``
and ``CompareConfig.paper(...)``; the BiSSL stage's are ``BisslConfig.paper_iclr`` / ``paper_neurips``
(:mod:`bissl_kit.bissl.config`). ``bissl_kit reproduce`` (:mod:`bissl_kit.reproduce`) chains them.

The kit counts pre-training in optimiser steps; the paper in epochs over the pretext set. A preset
converts with the official DataLoader's rule (partial last batch kept, spec §2.5): ⌈n / B⌉ steps per
epoch, with n from :data:`PRETEXT_IMAGES`.
"""

from __future__ import annotations

import math

from .bissl.config import PAPER_NEURIPS_UPPER
from .config import ConfigError

VERSIONS = ("iclr", "neurips")

# images of each pretext set (the epoch → step conversion): STL10 unlabeled 100k, + its 5k labelled train
# images; ImageNet-1k train
PRETEXT_IMAGES = {"stl10": 100_000, "stl10+train": 105_000, "imagenet": 1_281_167}

# the downstream sets with code per version (spec §4), in the kit's names (bissl_kit.data.DATASETS)
PAPER_DOWNSTREAM = {
    # V1: the twelve sets below plus stl10 and fashion_mnist (spec §4)
    "iclr": ("stl10", "fashion_mnist", "food101", "cars", "dtd", "pets", "flowers102", "aircraft", "cifar10",
             "cifar100", "caltech101", "sun397", "voc07", "cub200"),
    # V3: the twelve classification sets of its models/*.json (spec §2.5, §4)
    "neurips": tuple(PAPER_NEURIPS_UPPER["simclr"]),
}


def steps_per_epoch(pretext: str, batch_size: int) -> int:
    """Optimiser steps of one epoch over ``pretext`` (official DataLoader: the partial last batch kept)."""
    if pretext not in PRETEXT_IMAGES:
        raise ConfigError(f"pretext {pretext!r} has no known size; the paper presets know {', '.join(PRETEXT_IMAGES)}")
    return math.ceil(PRETEXT_IMAGES[pretext] / batch_size)


def _pretrain_common(pretext: str, epochs: int) -> dict:
    """What V1 and V3 share (spec §2.2 'same' across the pretext rows, §2.3, §2.4)."""
    batch = 1024                                         # §2.2 pretext opt: bs 1024
    per_epoch = steps_per_epoch(pretext, batch)
    return dict(
        pretext_dataset=pretext, image_size=96,          # §2.2 image size: 96 everywhere
        width=64, small_stem=False,                      # §2.3: timm ResNet, standard ImageNet stem even at 96 px
        temperature=0.5,                                 # §2.2 SimCLR τ
        proj_hidden=256, proj_dim=256,                   # §2.2 projector feat-256-256-256
        pretext_forward="per_view",                      # §2.3: one backbone forward per view
        partial_batch="keep",                            # §2.5: drop_last on the sampler only
        paper_augment=True,                              # §2.4
        crop_scale=(0.08, 1.0),                          # §2.2 note / C14: the crop area is torchvision's default
        batch_size=batch, lr=4.8, weight_decay=1e-6, momentum=0.9,  # §2.2 pretext opt: LARS lr 4.8, wd 1e-6, mom 0.9
        steps=epochs * per_epoch,
        warmup_steps=10 * per_epoch,                     # §2.2: warm-up 10 epochs, then cosine
        official_first_step=True,                        # §1.7 / C13: the official scheduler's first step
        sync_bn=True,                                    # §2.1 stage 1: SyncBN + DDP
        knn_every=0,                                     # the k-NN monitor is ours: at the start and the end only
        checkpoint_every=per_epoch,                      # once an epoch
    )


def pretrain_values(version: str, *, method: str = "simclr", baseline: bool = False) -> dict:
    """The PretrainConfig fields of ``version``'s pre-training. ``baseline=True`` (V1 only): the baseline
    pipeline's separate 600-epoch run; BiSSL starts from the 500-epoch one (spec §2.2, §3)."""
    if version == "iclr":
        if method != "simclr":
            raise ConfigError(f"method={method!r}: the ICLR version pre-trains with SimCLR only (spec §2.2)")
        # §2.2 V1: timm resnet18, STL10 (the 'unlabeled+train'; the V1 table lists `unlabeled`, 100k),
        # 500 epochs for BiSSL's init, 600 for the baseline
        return {**_pretrain_common("stl10+train", 600 if baseline else 500), "arch": "resnet18", "method": "simclr",
                "eval_dataset": "stl10"}
    if version == "neurips":
        if baseline:
            raise ConfigError("baseline=True: V3 has no separate baseline pre-training; both pipelines start from "
                              "the same 500-epoch checkpoint (spec §3)")
        if method not in ("simclr", "byol"):
            raise ConfigError(f"method={method!r} is not allowed; method must be 'simclr' or 'byol'")
        # §2.2 V3: resnet50 on ImageNet train, 500 epochs, BYOL EMA 0.9995
        return {**_pretrain_common("imagenet", 500), "arch": "resnet50", "method": method, "byol_ema": 0.9995,
                "eval_dataset": "cifar10"}
    raise ConfigError(f"version={version!r} must be one of {', '.join(map(repr, VERSIONS))}")


# §2.2 FT row (400 epochs, bs 256, SGD mom 0.9, cosine without warm-up: the FinetuneConfig protocol), SyncBN;
# §2.6: evaluated every epoch, the maximum over epochs of val top-1 reported (select='best_val')
FINETUNE = dict(epochs=400, batch_size=256, momentum=0.9, sync_bn=True, eval_every=1, select="best_val")

# §2.2 HPO row: lr qloguniform[1e-4, 1], wd qloguniform[1e-5, 1e-2]; 200 trials (V1 code and README; V3's
# classification config) or 100 (the V2/V3 READMEs); 10 seeds (§2.2 seeds row, §3)
SEARCH = {"iclr": dict(trials=200, seeds=10), "neurips": dict(trials=100, seeds=10)}


def finetune_values() -> dict:
    """The FinetuneConfig fields of the paper's fine-tuning (the same in every version)."""
    return dict(FINETUNE)


def compare_values(version: str) -> dict:
    """The CompareConfig fields of ``version``'s search and seed runs."""
    if version not in SEARCH:
        raise ConfigError(f"version={version!r} must be one of {', '.join(map(repr, VERSIONS))}")
    return {**{k: v for k, v in FINETUNE.items() if k not in ("sync_bn",)}, **SEARCH[version],
            "lr_range": (1e-4, 1.0), "wd_range": (1e-5, 1e-2)}
