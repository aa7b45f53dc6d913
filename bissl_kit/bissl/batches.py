"""The data a BiSSL stage consumes: each level's batches, as the official DataLoaders give them.

Each level walks a seeded permutation of its data in batches of B (``partial_batch="keep"``: ⌈n/B⌉
batches, the last one smaller, as a DataLoader without ``drop_last``; ``"drop"``: ⌊n/B⌋ equal
batches); when fewer than the stage's N batches remain it starts a new permutation seeded by the stage
index (the official ``set_epoch(stage)``). :func:`build_data` turns indices into the pretext views and
downstream batches of the embedded or paper data.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import ConfigError
from ..rng import generator
from .config import BisslConfig

class LevelIterator:
    """Batches of one level: walks a permutation of ``n`` items in batches of ``batch_size`` (with
    ``keep_partial`` the last one holds the n mod B left over, as a DataLoader without ``drop_last``);
    a new permutation (seeded by the stage, like the official ``set_epoch(stage)``) starts when fewer
    than ``need`` batches remain."""

    def __init__(self, n: int, batch_size: int, seed: int, tag: str, *, field: str = "batch size",
                 keep_partial: bool = False):
        if batch_size > n:
            raise ConfigError(f"{field}={batch_size} is larger than the {tag} data ({n} items); "
                              f"{field} must be <= {n}")
        self.n, self.batch_size, self.seed, self.tag = n, batch_size, seed, tag
        self.partial = n % batch_size if keep_partial else 0  # size of the short last batch, 0 if none
        self.per_epoch = n // batch_size + (1 if self.partial else 0)
        self.epoch, self.pos = 0, 0

    def order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=generator(self.seed, self.tag, epoch))

    def begin_stage(self, stage: int, need: int) -> None:
        if self.per_epoch - self.pos < need:
            self.epoch, self.pos = stage, 0

    def _wrap(self) -> None:
        if self.pos >= self.per_epoch:  # need > per_epoch: wrap within the stage
            self.epoch, self.pos = self.epoch + 1, 0

    def next(self) -> torch.Tensor:
        self._wrap()
        idx = self.order(self.epoch)[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
        self.pos += 1
        return idx

    def draws_partial(self, first_stage: int, stages: int, need: int) -> bool:
        """Whether stages ``first_stage`` to ``stages − 1``, each taking ``need`` batches from here on,
        draw the short last batch (positions only: no permutation is computed, the state is kept)."""
        if not self.partial:
            return False
        sim = copy.copy(self)
        for stage in range(first_stage, stages):
            sim.begin_stage(stage, need)
            for _ in range(need):
                sim._wrap()
                if sim.pos == sim.per_epoch - 1:
                    return True
                sim.pos += 1
        return False

    def first(self, k: int = 1) -> list[torch.Tensor]:
        """The first ``k`` batches of a fresh iterator over the current permutation."""
        order = self.order(self.epoch)
        return [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(k)]

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


@dataclass
class BilevelData:
    """How a stage turns indices into tensors. ``pretext_views(idx, tag)`` returns the two augmented
    views of pretext items ``idx`` (``tag`` seeds the augmentation); ``downstream_batch(idx, tag)``
    returns (inputs, labels) of downstream train items; ``val`` is (inputs, labels) of the val split,
    already normalised."""

    n_pretext: int
    n_downstream: int
    pretext_views: Callable[[torch.Tensor, tuple], tuple[torch.Tensor, torch.Tensor]]
    downstream_batch: Callable[[torch.Tensor, tuple], tuple[torch.Tensor, torch.Tensor]]
    val: tuple[torch.Tensor, torch.Tensor] | None = None
    num_classes: int | None = None
    val_difficult: torch.Tensor | None = None  # multi-label val split: the images AP ignores per class (VOC07)
    identity: dict = field(default_factory=dict)  # fingerprints of the data, checked when a run resumes


def upper_steps_per_stage(upper_steps: int, batches: int, rule: str) -> int:
    """Upper steps a stage takes when the downstream loader has ``batches`` < N_U batches (spec §2.5):
    'cycle' N_U (V3), 'truncate' N_U // L (V1, C9: Flowers gets 2, DTD 1), 'whole_passes' ⌊N_U/L⌋·L (V2)."""
    if batches >= upper_steps or rule == "cycle":
        return upper_steps
    if rule == "truncate":
        return upper_steps // batches
    return upper_steps // batches * batches


def build_data(cfg: BisslConfig, pre_cfg, device: torch.device) -> BilevelData:
    """Pretext views as in pre-training (same augmentation), downstream train crops + flips, and the
    normalised val split, all on ``device``."""
    from .. import data as data_mod
    from ..augment import augment, downstream_train_spec, normalize, two_views
    from ..pretrain import pretext_view_specs

    from ..data.pretext import default_workers, pretext_fingerprint
    # a streamed pretext set decodes each lower batch in a pool of loader_workers threads
    images = data_mod.load_pretext(pre_cfg.pretext_dataset, root=cfg.data_root, image_size=pre_cfg.image_size,
                                   workers=default_workers() if cfg.loader_workers is None else cfg.loader_workers)
    channels = images.shape[1]
    views = pretext_view_specs(pre_cfg, channels)
    train = data_mod.load_downstream(cfg.downstream, "train", root=cfg.data_root, image_size=pre_cfg.image_size,
                                     labels_per_class=cfg.labels_per_class).materialize()
    val = data_mod.load_downstream(cfg.downstream, "val", root=cfg.data_root,
                                   image_size=pre_cfg.image_size).materialize()
    if train.images.shape[1] != channels:
        raise ConfigError(f"downstream={cfg.downstream!r} has {train.images.shape[1]} channels but the "
                          f"pre-trained backbone takes {channels}")
    down_spec = downstream_train_spec(pre_cfg.image_size, channels, paper=pre_cfg.paper_augment)
    mean, std = views[0].mean, views[0].std

    def pretext_views(idx, tag):
        return two_views(images[idx].to(device), *views, generator(cfg.seed, "bissl-views", *tag))

    def downstream_batch(idx, tag):
        x = augment(train.images[idx].to(device), down_spec, generator(cfg.seed, "bissl-down", *tag))
        return x, train.labels[idx].to(device)

    identity = {"pretext_data": pretext_fingerprint(images),
                "downstream_data": data_mod.fingerprint(train.images, train.labels, val.images, val.labels)}
    return BilevelData(len(images), len(train.labels), pretext_views, downstream_batch,
                       val=(normalize(val.images.to(device), mean, std), val.labels.to(device)),
                       num_classes=train.num_classes, identity=identity, val_difficult=val.difficult)
