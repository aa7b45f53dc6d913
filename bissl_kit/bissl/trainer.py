"""The BiSSL stage's trainer: the loop of spec §1.6 on given models and data.

One stage = N_L lower steps (LARS, clip, schedule), then the Hessian batch, then N_U upper steps (SGD,
clip, schedule), then an evaluation of (θ_D, φ_D) on the val split and a checkpoint. Before the first
stage a linear head φ_D is warmed up on the frozen θ_D. The run folder (:mod:`bissl_kit.rundir`) holds
the checkpoint, the log and the config; :meth:`BisslTrainer.fork` goes on under a changed config in a
new folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .. import distributed, speed
from ..config import ConfigError
from ..downstream import classification_metrics
from ..losses import downstream_loss
from ..implicit import AveragedOperator, HessianOperator, HypergradientSolver, NonFiniteError, isolated_bn_buffers, rank_mean
from ..optim import LARS, set_lr, warmup_cosine
from ..rng import generator
from ..rundir import RunDir, progress_bar
from .batches import BilevelData, LevelIterator, upper_steps_per_stage
from .config import CHECKPOINT_KIND, BisslConfig
from .diagnostics import _flat_norm, cosine, layer_groups
from .state import StageState

class BisslTrainer(StageState):
    """The bilevel stage on given models and data (see :func:`build_trainer` for the usual set-up).

    ``lower`` is a pretext module with ``.backbone`` (θ_P), ``.head`` (φ_P), ``.loss(v1, v2)`` and
    ``.update_target()``; ``upper_backbone`` (θ_D) has θ_P's architecture; ``head`` is φ_D.
    :meth:`run` is a generator of records, one per lower step, upper step and stage end.
    """

    def __init__(self, cfg: BisslConfig, lower: nn.Module, upper_backbone: nn.Module, head: nn.Module,
                 data: BilevelData, *, device: torch.device | str = "cpu", out_dir: str | Path | None = None,
                 identity: dict | None = None, lineage: dict | None = None):
        self.cfg, self.lower, self.upper, self.head, self.data = cfg, lower, upper_backbone, head, data
        self.device = torch.device(device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        # the run folder (None: an in-memory run); under torchrun rank 0 alone locks, logs and writes
        self.run_dir = (RunDir(out_dir, CHECKPOINT_KIND, cfg, identity=identity, lineage=lineage)
                        if self.out_dir is not None else None)
        self.log = self.run_dir.log if self.run_dir is not None and distributed.is_main() else None
        self._distributed_setup()
        self.names = [n for n, _ in lower.backbone.named_parameters()]
        if self.names != [n for n, _ in upper_backbone.named_parameters()]:
            raise ValueError("upper_backbone must have the same architecture (parameter names) as lower.backbone")
        self.groups = layer_groups(self.names)
        if not hasattr(lower, "pretext_forward"):
            raise ValueError("lower must have a 'pretext_forward' attribute ('per_view' or 'joint') that its loss "
                             "follows, so that the stage can set cfg.pretext_forward")
        lower.pretext_forward = cfg.pretext_forward
        self.lower_opt = LARS(lower.parameters(), lr=cfg.lower_lr, weight_decay=cfg.lower_weight_decay,
                              momentum=cfg.lower_momentum)
        self.upper_params = list(upper_backbone.parameters()) + list(head.parameters())
        self.upper_opt = torch.optim.SGD(self.upper_params, lr=cfg.upper_lr, momentum=cfg.upper_momentum,
                                         weight_decay=cfg.upper_weight_decay)
        keep = cfg.partial_batch == "keep"
        self.lower_it = LevelIterator(data.n_pretext, cfg.lower_batch_size, cfg.seed, "bissl-lower",
                                      field="lower_batch_size", keep_partial=keep)
        self.upper_it = LevelIterator(data.n_downstream, cfg.upper_batch_size, cfg.seed, "bissl-upper",
                                      field="upper_batch_size", keep_partial=keep)
        self._check_partial_batches()
        self.stage = 0                 # finished stages
        self.lower_step = 0            # finished lower optimiser steps (schedule counter)
        self.upper_step = 0
        self.head_warm = cfg.head_warmup_epochs == 0
        self.history: list[dict] = []  # stage records
        self.last_pretext_grad = None  # ∇_θP L_P of the last lower step (alignment diagnostics)
        self._stage_lower_idx: list[torch.Tensor] = []
        # called as solve_observer(operator, v, solution) after every hypergradient solve; lets a benchmark
        # or a notebook inspect the linear systems without changing the run
        self.solve_observer: Callable | None = None
        if self.run_dir is not None:
            self.run_dir.open()  # every check passed: now the folder is ours (a second process is refused)

    def _check_partial_batches(self) -> None:
        """Refuse, before any step, a kept last batch that the run cannot use: one of a single sample
        where BatchNorm must normalise it, or, under torchrun, a pretext batch that does not split into
        equal shards (the gathered NT-Xent needs them) and that the run will draw. Downstream batches
        may split unevenly: each rank's loss is then weighted by its part (``distributed.split``)."""
        c = self.cfg
        levels = (("lower_batch_size", self.lower_it, "pretext", (self.lower,)),
                  ("upper_batch_size", self.upper_it, "downstream", (self.lower.backbone, self.upper, self.head)))
        for field, it, what, modules in levels:
            if it.partial == 1 and any(_has_batchnorm(m) for m in modules):
                raise ConfigError(f"{field}={it.batch_size} with partial_batch='keep' leaves a last batch of 1 "
                                  f"{what} item ({it.n} = {it.n // it.batch_size}·{it.batch_size} + 1), which "
                                  f"BatchNorm cannot normalise; choose another {field} or partial_batch='drop'")
        w = distributed.world_size()
        if self.lower_it.partial % w and self.lower_it.draws_partial(self.stage, c.stages, c.lower_steps):
            raise ConfigError(f"lower_batch_size={c.lower_batch_size} with partial_batch='keep' draws a last batch of "
                              f"{self.lower_it.partial} pretext pairs, which does not split into {w} equal shards; "
                              f"choose a lower_batch_size that leaves a multiple of {w} (or none), or "
                              "partial_batch='drop'")

    def _distributed_setup(self) -> None:
        """Under torchrun: equal shards of every global batch, SyncBatchNorm if asked, identical
        replicas. The gradients are averaged by hand (distributed.all_reduce_mean_ / reduce_mean)
        rather than by DistributedDataParallel, because DDP's hooks fire only in ``backward()`` of
        its own forward: they miss ``torch.autograd.grad`` (v, the upper gradients) and the double
        backward of every Hessian-vector product, which is how the official V1/V2 code ended up with
        unsynchronised upper gradients (spec C6)."""
        c = self.cfg
        if not distributed.is_distributed():
            return
        for size, what in ((c.lower_batch_size, "lower_batch_size"), (c.upper_batch_size, "upper_batch_size")):
            try:
                distributed.check_divisible(size, what)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if c.sync_bn:
            for m in (self.lower, self.upper, self.head):
                distributed.convert_sync_batchnorm(m)
        distributed.broadcast_module(self.lower, self.upper, self.head)

    def _views(self, idx: torch.Tensor, tag: tuple):
        """This rank's shard of the two views of the global pretext batch ``idx`` (the whole batch
        in one process)."""
        v1, v2 = self.data.pretext_views(idx, tag)
        return tuple(speed.inputs(distributed.shard(v), self.cfg.channels_last) for v in (v1, v2))

    def _downstream(self, idx: torch.Tensor, tag: tuple):
        """This rank's part of a downstream batch and the weight of its mean loss (1 in one process and
        for equal shards; a kept partial batch may split unevenly, see :func:`distributed.split`)."""
        x, y = self.data.downstream_batch(idx, tag)
        x = speed.inputs(x, self.cfg.channels_last)
        if len(x) % distributed.world_size() == 0:
            return distributed.shard(x), distributed.shard(y), 1.0
        (x, y), weight = distributed.split(x, y)
        return x, y, weight

    def _sync_buffers(self) -> None:
        """Per-shard BatchNorm running statistics averaged across ranks (replicas stay identical)."""
        if not self.cfg.sync_bn:
            distributed.average_buffers(self.lower, self.upper, self.head)

    @property
    def lower_warmup(self) -> int:
        """The lower warm-up in steps: ``lower_warmup``, or V1's passes over the pretext loader (10·len(loader))."""
        c = self.cfg
        return c.lower_warmup if c.lower_warmup is not None else c.lower_warmup_passes * self.lower_it.per_epoch

    @property
    def upper_steps(self) -> int:
        """Upper steps per stage as run: N_U, or fewer for a short downstream loader (``upper_short_loader``)."""
        c = self.cfg
        return upper_steps_per_stage(c.upper_steps, self.upper_it.per_epoch, c.upper_short_loader)

    # ---- schedules (spec §1.7): lower warm-up + cosine over T·N_L, upper cosine over T·N_U --------------
    def lower_lr(self, step: int) -> float:
        c = self.cfg
        return warmup_cosine(step, base_lr=c.lower_lr, warmup=self.lower_warmup, total=c.stages * c.lower_steps,
                             official_first_step=c.official_first_step)

    def upper_lr(self, step: int) -> float:
        c = self.cfg
        return warmup_cosine(step, base_lr=c.upper_lr, warmup=0, total=c.stages * c.upper_steps,
                             official_first_step=c.official_first_step)

    # ---- the pieces of a stage ----------------------------------------------------------------------
    def warm_up_head(self) -> Iterator[dict]:
        """Linear head φ_D on the frozen θ_D, SGD without schedule; θ_D in train mode, so its BN running
        statistics adapt to the downstream data as in the official code (spec §2.1)."""
        c = self.cfg
        opt = torch.optim.SGD(self.head.parameters(), lr=c.upper_lr, momentum=c.upper_momentum,
                              weight_decay=c.upper_weight_decay)
        it = LevelIterator(self.data.n_downstream, c.upper_batch_size, c.seed, "bissl-head-warmup",
                           keep_partial=c.partial_batch == "keep")
        self.upper.train()
        for epoch in range(c.head_warmup_epochs):
            it.epoch, it.pos = epoch, 0
            losses = []
            for b in range(it.per_epoch):
                x, y, weight = self._downstream(it.next(), ("head", epoch, b))
                with torch.no_grad():
                    feats = self.upper(x)
                loss = _weighted(downstream_loss(self.head(feats), y, c.multilabel_loss), weight)
                value = distributed.mean_value(loss.detach())
                if not torch.isfinite(value) and c.nonfinite_loss == "raise":
                    raise FloatingPointError(f"head warm-up loss is {value.item()} at epoch {epoch + 1}, step {b + 1} "
                                             f"(upper_lr {c.upper_lr:g}); no checkpoint of this run was written")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                distributed.all_reduce_mean_(list(self.head.parameters()))
                opt.step()
                losses.append(value.item())
            self._sync_buffers()
            rec = {"kind": "head_warmup", "epoch": epoch + 1, "loss": sum(losses) / len(losses)}
            if (epoch + 1) % max(c.head_warmup_epochs // 5, 1) == 0 or epoch + 1 == c.head_warmup_epochs:
                rec.update(self.evaluate())
            yield rec
        self.head_warm = True

    def lower_phase(self) -> Iterator[dict]:
        c = self.cfg
        self.lower.train()
        theta_d = [p.detach() for p in self.upper.parameters()]
        for k in range(c.lower_steps):
            lr = self.lower_lr(self.lower_step)
            set_lr(self.lower_opt, lr)
            idx = self.lower_it.next()
            self._stage_lower_idx.append(idx)
            v1, v2 = self._views(idx, ("lower", self.lower_step))
            self.lower.update_target()  # BYOL: EMA at the start of each forward (spec §1.6); SimCLR: no-op
            pretext = self.lower.loss(v1, v2)
            reg = 0.5 * c.lam * sum(((p - d) ** 2).sum() for p, d in zip(self.lower.backbone.parameters(), theta_d))
            pretext_value = distributed.mean_value(pretext.detach())  # the global batch's loss
            self._check_finite(pretext_value, "lower pretext loss", k)
            self.lower_opt.zero_grad(set_to_none=True)
            (pretext + reg).backward()
            distributed.all_reduce_mean_(list(self.lower.parameters()))  # reg is the same on every rank
            # the pretext part of the gradient, for the alignment diagnostics: ∇L_P = ∇(L_P + reg) − λ(θ_P − θ_D)
            self.last_pretext_grad = [p.grad.detach() - c.lam * (p.detach() - d)
                                      for p, d in zip(self.lower.backbone.parameters(), theta_d)]
            if c.lower_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.lower.parameters(), c.lower_clip)
            self.lower_opt.step()
            self.lower_step += 1
            yield {"kind": "lower", "stage": self.stage + 1, "step": k + 1, "lower_step": self.lower_step,
                   "pretext_loss": pretext_value.item(), "reg_loss": reg.item(), "lr": lr}

    def hessian_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The stage's Hessian batch(es), as pretext view pairs (spec §1.6, C1)."""
        c = self.cfg
        if c.hessian_batch == "fresh":
            idx = self.lower_it.first(c.hessian_batches)
        elif c.hessian_batch == "lower":
            idx = self._stage_lower_idx[:c.hessian_batches]
        else:
            g = generator(c.seed, "hessian-random", self.stage)
            idx = [torch.randperm(self.data.n_pretext, generator=g)[:c.lower_batch_size]
                   for _ in range(c.hessian_batches)]
        return [self._views(i, ("hessian", self.stage, j)) for j, i in enumerate(idx)]

    def hessian_operator(self) -> Callable:
        """A(d) = d + H̄d/(λ+δ), H̄ averaged over the Hessian batches."""
        c = self.cfg
        params = dict(self.lower.backbone.named_parameters())
        # under torchrun each product is the mean over ranks of the per-rank products: the global H d
        ops = [rank_mean(HessianOperator(lambda b: self.lower.loss(*b), params, batch, mode=c.hvp,
                                         lam=c.lam, damping=c.damping, bn_stats=c.bn_stats, module=self.lower))
               for batch in self.hessian_batches()]
        return ops[0] if len(ops) == 1 else AveragedOperator(ops)

    def upper_phase(self) -> Iterator[dict]:
        c = self.cfg
        self.lower.train()
        self.upper.train()
        self.head.train()
        # x = v needs no Hessian: building it would cost the products and (bn_stats='update') drift BatchNorm
        op = None if c.solver == "none" else self.hessian_operator()
        opts = dict(solver=c.solver, max_iter=c.resolved_solver_iters, rtol=c.solver_rtol, warm_start=c.warm_start,
                    nonfinite=c.nonfinite)
        solver = HypergradientSolver(op, **opts)
        theta_p = list(self.lower.backbone.parameters())
        theta_d = list(self.upper.parameters())
        phi_d = list(self.head.parameters())
        try:
            for k in range(self.upper_steps):
                lr = self.upper_lr(self.upper_step)
                for group in self.upper_opt.param_groups:
                    group["lr"] = lr
                x_in, y, weight = self._downstream(self.upper_it.next(), ("upper", self.upper_step))
                # implicit term: the upper head on the lower backbone
                with isolated_bn_buffers(self.lower.backbone, keep_updates=c.bn_stats == "update"):
                    implicit_loss = _weighted(downstream_loss(self.head(self.lower.backbone(x_in)), y, c.multilabel_loss),
                                              weight)
                implicit_value = distributed.mean_value(implicit_loss.detach())
                self._check_finite(implicit_value, "upper implicit loss", k)
                grads = distributed.reduce_mean(torch.autograd.grad(implicit_loss, theta_p + phi_d))
                v, g_head_implicit = grads[:len(theta_p)], grads[len(theta_p):]
                try:
                    sol = solver.solve(v)
                except NonFiniteError as e:
                    raise FloatingPointError(f"hypergradient solve is non-finite at stage {self.stage + 1}, upper step "
                                             f"{k + 1} ({e}); nonfinite='zero' would replace it by 0 (the official "
                                             f"behaviour); the last good checkpoint is kept in {str(self.out_dir)!r}") from e
                if self.solve_observer is not None:
                    self.solve_observer(op, v, sol)
                # classic term: the upper model itself
                classic_loss = _weighted(downstream_loss(self.head(self.upper(x_in)), y, c.multilabel_loss), weight)
                classic_value = distributed.mean_value(classic_loss.detach())
                self._check_finite(classic_value, "upper classic loss", k)
                g_classic = distributed.reduce_mean(torch.autograd.grad(classic_loss, theta_d + phi_d))
                g_theta = [xi + c.gamma * gi for xi, gi in zip(sol.x, g_classic[:len(theta_d)])]
                g_phi = [hi + c.gamma * gi for hi, gi in zip(g_head_implicit, g_classic[len(theta_d):])]
                for p, g in zip(theta_d + phi_d, g_theta + g_phi):
                    p.grad = g.detach().clone()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.upper_params, c.upper_clip) \
                    if c.upper_clip is not None else torch.tensor(_flat_norm(g_theta + g_phi))
                self.upper_opt.step()
                self.upper_step += 1
                yield {"kind": "upper", "stage": self.stage + 1, "step": k + 1, "upper_step": self.upper_step,
                       "implicit_loss": implicit_value.item(), "classic_loss": classic_value.item(), "lr": lr,
                       "solver_residuals": [float(sol.initial_residual_norm)] + [float(r) for r in sol.residual_norms],
                       "v_norm": _flat_norm(v), "solver_iterations": sol.iterations,
                       "solver_converged": bool(sol.converged), "solver_seconds": sol.seconds,
                       "solver_nonfinite": sol.n_nonfinite, "solver_negative_curvature": bool(sol.negative_curvature),
                       "grad_norm": float(grad_norm),
                       "distance": self.distance(), **self.alignment(sol.x, g_classic[:len(theta_d)])}
        finally:
            solver.release()

    def alignment(self, x, g_classic) -> dict:
        """Cosines, total and per layer: implicit hypergradient x vs classic ∇_θD L_D, and x vs the
        lower pretext gradient ∇_θP L_P of the last lower step."""
        out = {"cos_implicit_classic": cosine(x, g_classic),
               "cos_implicit_classic_layers": [cosine([x[i] for i in idx], [g_classic[i] for i in idx])
                                               for _, idx in self.groups]}
        if self.last_pretext_grad is not None:
            g = self.last_pretext_grad
            out["cos_implicit_pretext"] = cosine(x, g)
            out["cos_implicit_pretext_layers"] = [cosine([x[i] for i in idx], [g[i] for i in idx])
                                                  for _, idx in self.groups]
        return out

    def distance(self) -> float:
        """‖θ_P − θ_D‖ over the backbone parameters."""
        return _flat_norm([p.detach() - d.detach() for p, d in zip(self.lower.backbone.parameters(),
                                                                   self.upper.parameters())])

    @torch.no_grad()
    def evaluate(self, batch_size: int = 512) -> dict:
        """Top-1/top-5 (mAP: a multi-label task) of the upper model (θ_D, φ_D) on the val split, eval mode."""
        if self.data.val is None:
            return {}
        x, y = self.data.val
        n = len(x)
        if distributed.is_distributed():  # each rank its disjoint part (≥ 1 sample); counts summed (spec C12)
            if n < distributed.world_size():
                raise ValueError(f"the val split has {n} samples, fewer than the {distributed.world_size()} ranks")
            part = distributed.eval_slice(n)
            x, y = x[part], y[part]
        self.upper.eval()
        self.head.eval()
        try:
            logits = torch.cat([self.head(self.upper(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])
        finally:
            self.upper.train()
            self.head.train()
        m = classification_metrics(logits, y, n, difficult=self.data.val_difficult, multilabel_loss=self.cfg.multilabel_loss)
        return {f"val_{k}": v for k, v in m.items()}

    def _check_finite(self, value: torch.Tensor, what: str, step: int) -> None:
        if not torch.isfinite(value) and self.cfg.nonfinite_loss == "raise":
            raise FloatingPointError(f"{what} is {value.item()} at stage {self.stage + 1}, step {step + 1}; "
                                     f"the last good checkpoint is kept in {str(self.out_dir)!r}")

    # ---- the loop --------------------------------------------------------------------------------------
    def run(self, stages: int | None = None, *, replay: bool = False) -> Iterator[dict]:
        """Run ``stages`` more stages (default: up to ``cfg.stages``), yielding every record.

        ``replay=True`` first yields the records a resumed run logged before (so a re-executed
        notebook redraws the whole history). Stages past ``cfg.stages`` keep the schedules at their
        final values."""
        if self.run_dir is not None:
            self.run_dir.open()
        try:
            yield from self._run(stages, replay)
        finally:  # the folder is free for others once the run ends or stops
            if self.run_dir is not None:
                self.run_dir.close()

    def _run(self, stages: int | None, replay: bool) -> Iterator[dict]:
        c = self.cfg
        if replay and self.log is not None:
            yield from self.log.records()
        target = c.stages if stages is None else self.stage + stages
        if not self.head_warm:
            for rec in self.warm_up_head():
                self._log(rec)
                yield rec
            rec = {"kind": "stage", "stage": 0, **self.evaluate(), "distance": self.distance()}
            self.history.append(rec)
            self._log(rec)
            self.save()
            yield rec
        bar = progress_bar(c.progress and distributed.is_main(), total=target, initial=self.stage,
                           desc="BiSSL stages", unit="stage")
        while self.stage < target:
            t0 = time.perf_counter()
            self.lower_it.begin_stage(self.stage, c.lower_steps)
            self.upper_it.begin_stage(self.stage, self.upper_steps)
            self._stage_lower_idx = []
            lower_recs = []
            for rec in self.lower_phase():
                lower_recs.append(rec)
                yield rec
            upper_recs = []
            for rec in self.upper_phase():
                upper_recs.append(rec)
                yield rec
            self.stage += 1
            self._sync_buffers()
            rec = {"kind": "stage", "stage": self.stage, "seconds": time.perf_counter() - t0,
                   **self.evaluate(), "distance": self.distance(),
                   "pretext_loss": _mean(r["pretext_loss"] for r in lower_recs),
                   "implicit_loss": _mean(r["implicit_loss"] for r in upper_recs),
                   "classic_loss": _mean(r["classic_loss"] for r in upper_recs),
                   # entries of the hypergradient replaced by nan_to_num (nonfinite='zero'); 0 means none
                   "solver_nonfinite": sum(r["solver_nonfinite"] for r in upper_recs)}
            self.history.append(rec)
            for r in lower_recs + upper_recs:
                self._log(r)
            self._log(rec)
            self.save()
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{rec[k]:.3g}" for k in ("val_top1", "val_map", "implicit_loss") if k in rec})
            yield rec
        if bar is not None:
            bar.close()

    def _log(self, rec: dict) -> None:
        if self.log is not None:
            self.log.append(rec)


def _weighted(loss: torch.Tensor, weight: float) -> torch.Tensor:
    """A rank's mean loss on the scale of the global batch's (``weight`` 1: unchanged, bit for bit)."""
    return loss if weight == 1.0 else loss * weight


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._NormBase) for m in module.modules())


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
