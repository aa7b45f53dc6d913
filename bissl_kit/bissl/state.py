"""What a BiSSL stage keeps in its run folder: its state, saved and resumed, and forks under a new config.

A mixin of :class:`bissl_kit.bissl.trainer.BisslTrainer`: the checkpoint holds the two backbones by
role (``lower`` θ_P, ``upper`` θ_D) and the rest of the state (the pretext head, φ_D, both optimisers,
the level iterators, the step counters, the history).
"""

from __future__ import annotations

from pathlib import Path

from .. import distributed
from ..backbones import recipe_of
from ..checkpoint import load_state
from ..config import ConfigError
from .config import BisslConfig


class StageState:
    def state(self) -> dict:
        """What resuming needs besides the two backbones (saved by role, see :meth:`save`)."""
        rest = {k: v for k, v in self.lower.state_dict().items() if not k.startswith("backbone.")}
        return {"lower_rest": rest, "head": self.head.state_dict(), "num_classes": self.data.num_classes,
                "lower_opt": self.lower_opt.state_dict(), "upper_opt": self.upper_opt.state_dict(),
                "lower_it": self.lower_it.state(), "upper_it": self.upper_it.state(), "stage": self.stage,
                "lower_step": self.lower_step, "upper_step": self.upper_step, "head_warm": self.head_warm,
                "last_pretext_grad": self.last_pretext_grad, "history": self.history}

    def load_state(self, backbones: dict, s: dict) -> None:
        where = str(self.checkpoint_path)
        load_state(self.lower, {**{"backbone." + k: v for k, v in backbones["lower"].items()}, **s["lower_rest"]},
                   where=where, what="lower model")
        load_state(self.upper, backbones["upper"], where=where, what="upper backbone")
        load_state(self.head, s["head"], where=where, what="head")
        self.lower_opt.load_state_dict(s["lower_opt"])
        self.upper_opt.load_state_dict(s["upper_opt"])
        self.lower_it.load(s["lower_it"])
        self.upper_it.load(s["upper_it"])
        self.stage, self.lower_step, self.upper_step = s["stage"], s["lower_step"], s["upper_step"]
        self.head_warm, self.last_pretext_grad, self.history = s["head_warm"], s["last_pretext_grad"], s["history"]

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir.checkpoint_path

    def save(self) -> None:
        if self.run_dir is None:
            return
        sig = getattr(self.lower.backbone, "signature", None)  # the kit's ResNets; a toy backbone has no recipe
        self.run_dir.save(step=self.stage, backbone=recipe_of(self.lower.backbone) if sig else {"builder": None},
                          backbones={"lower": self.lower.backbone.state_dict(), "upper": self.upper.state_dict()},
                          state=self.state())

    def resume(self) -> bool:
        """Load the run folder's checkpoint if it holds one of this run (True); otherwise start a fresh log."""
        if self.run_dir is None:
            return False
        recipe = recipe_of(self.lower.backbone) if hasattr(self.lower.backbone, "signature") else {"builder": None}
        try:  # a killed stage's records go
            ckpt = self.run_dir.resume(lambda ck: lambda r: r.get("stage", 0) <= ck["step"], recipe=recipe)
        except BaseException:
            self.run_dir.close()
            raise
        if ckpt is None:
            return False
        self.load_state(ckpt["backbones"], ckpt["state"])
        return True

    # fields a fork cannot change: they fix the data, the batches or the models the state belongs to
    FIXED_IN_FORK = ("pretrain_checkpoint", "downstream", "labels_per_class", "seed", "lower_batch_size",
                     "upper_batch_size", "partial_batch", "head_warmup_epochs", "sync_bn")

    def continue_with(self, cfg: BisslConfig) -> None:
        """Go on in this run folder under ``cfg``, which may differ in resumable fields only (a longer
        horizon, another device): the folder's saved config then names the stages it holds. Any other
        change is a :meth:`fork`."""
        changed = [k for k in cfg.identity() if cfg.identity()[k] != self.cfg.identity()[k]]
        if changed:
            raise ConfigError(f"{', '.join(changed)} change(s) the numbers of the run: fork it instead")
        self.cfg = cfg
        if self.run_dir is not None:
            self.run_dir.cfg = cfg

    def fork(self, cfg: BisslConfig) -> Path | None:
        """Go on under ``cfg`` in a new run folder that records this run's folder and the stage it branched
        at (:meth:`bissl_kit.rundir.RunDir.fork`); this folder keeps the stages run so far and their config.
        Returns the new folder (None for an in-memory run, whose config is simply replaced)."""
        fixed = [f"{k}: {getattr(self.cfg, k)!r} → {getattr(cfg, k)!r}" for k in self.FIXED_IN_FORK
                 if getattr(cfg, k) != getattr(self.cfg, k)]
        if fixed:
            raise ConfigError(f"a running BiSSL stage cannot change {'; '.join(fixed)}; start a new run instead")
        for group in self.upper_opt.param_groups:
            group.update(momentum=cfg.upper_momentum, weight_decay=cfg.upper_weight_decay)
        for group in self.lower_opt.param_groups:
            group.update(momentum=cfg.lower_momentum, weight_decay=cfg.lower_weight_decay)
        self.lower.pretext_forward = cfg.pretext_forward
        if self.run_dir is None:
            self.cfg = cfg
            return None
        new = self.run_dir.fork(cfg, step=self.stage)
        self.run_dir.close()
        self.run_dir = new.open()
        self.cfg, self.out_dir, self.log = new.cfg, new.path, new.log if distributed.is_main() else None
        self.save()  # the fork's folder starts at the branch point
        return new.path
