r"""The operator of the hypergradient's linear system, A(d) = d + H d/(λ+δ) (spec §1.4).

H is the Hessian of the pretext loss with respect to the backbone θ_P only, on the stage's Hessian
batch(es); λ is the proximal weight and δ the damping that the official code adds to λ inside the
hypergradient only.  Every operator here is a :class:`DampedOperator`: it supplies the product
``hvp(d) = H d`` and shares one damped map ``A(d) = d + scale·H d`` with ``scale = 1/(λ+δ)``.

* :class:`HessianOperator`: H of one loss on one batch, by double backward (recompute or reuse the
  gradient graph), with control over the BatchNorm side effects;
* :class:`AveragedOperator`: the mean of several operators' products (V1/V2 average H over a list
  of Hessian batches);
* :class:`RankMeanOperator`: under torchrun, the mean over ranks of the per-rank products, i.e. the
  product of the global batch (spec §1.8, C7); :func:`rank_mean` wraps an operator when distributed.

BatchNorm (spec C5)
-------------------
In train mode every BatchNorm forward normalises with the batch statistics *and* updates the running
buffers.  :class:`HessianOperator` takes ``bn_stats``:

* ``"restore"`` (default): every pretext forward the operator runs uses private copies of the
  BatchNorm buffers (``running_mean``, ``running_var``, ``num_batches_tracked``) of ``module``, which
  are then dropped; the module's own buffers are bit-identical after any number of products, in
  both modes.  The forward still normalises with batch statistics, so H is the Hessian of the same
  train-mode loss as in the official code; only the side effect on the buffers is removed.
* ``"update"``: the updated copies are written back into the module's buffers after each forward.
  With ``mode="recompute"`` each product runs ``loss_fn`` once, so every BatchNorm layer gets one
  running-stat update per BatchNorm forward in ``loss_fn`` per product (the official code feeds the
  two SimCLR views as two forwards: two per product, 2·K·N_U per stage): this is the official drift
  (spec C5).  With ``mode="reuse"`` only the single graph-building forward updates them: once per
  stage, whatever the number of products.

Either way the retained graph holds only the private copies, so the caller's own train-mode forwards
through the backbone during the stage (the downstream forward through θ_P) may update the buffers in
place without breaking later products.  In eval mode BatchNorm uses its running buffers and updates
nothing, whatever ``bn_stats`` says.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..distributed import is_distributed, reduce_mean

__all__ = ["OFFICIAL_LAMBDA", "OFFICIAL_DAMPING", "DampedOperator", "HessianOperator", "isolated_bn_buffers",
           "AveragedOperator", "RankMeanOperator", "rank_mean"]

#: Proximal weight λ of the lower problem.
OFFICIAL_LAMBDA = 1e-3
#: Damping δ added to λ inside the hypergradient only: A = I + H/(λ + δ).
OFFICIAL_DAMPING = 10.0

Tensors = tuple[Tensor, ...]

_HVP_MODES = ("reuse", "recompute")
_BN_STATS = ("restore", "update")


class DampedOperator:
    """``A(d) = d + scale·H d``: the damped map, written once for every operator below.

    A subclass sets ``scale`` (= 1/(λ+δ)) and ``names`` (the tensors' names for error messages, or
    None) and implements :meth:`hvp`; :meth:`hvp_batched` and :meth:`release` have defaults.  Used as
    a context manager, the operator is released on exit.
    """

    scale: float
    names: list[str] | None = None

    def hvp(self, d: Sequence[Tensor]) -> Tensors:
        """``H d`` (no identity, no scaling)."""
        raise NotImplementedError

    def hvp_batched(self, D: Sequence[Tensor]) -> Tensors:
        """``H d_j`` for k directions stacked along a leading dimension k of every tensor of ``D``;
        by default one product per direction."""
        cols = [self.hvp(tuple(t[j] for t in D)) for j in range(D[0].shape[0])]
        return tuple(torch.stack(c) for c in zip(*cols))

    def __call__(self, d: Sequence[Tensor]) -> Tensors:
        hv = self.hvp(d)
        return tuple(di + hi * self.scale for di, hi in zip(d, hv))

    def release(self) -> None:
        """Free what the products hold on to (end of the stage)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --- one loss on one batch -------------------------------------------------------------------------

def _bn_modules(module: nn.Module | None) -> list[nn.Module]:
    if module is None:
        return []
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]


@contextmanager
def isolated_bn_buffers(module: nn.Module | None, keep_updates: bool):
    """Run train-mode forwards of ``module`` on private copies of its BatchNorm buffers.

    ``keep_updates=False`` discards the running-statistic updates (no drift); ``True`` copies them
    back (the official behaviour).  Copies rather than save/restore: autograd saves the buffers a
    BatchNorm forward used, so restoring them in place would break a later backward through that
    graph (a retained graph of ``reuse``, or the caller's own backward).
    """
    swapped = []
    for m in _bn_modules(module):
        for name, buf in m._buffers.items():
            if buf is not None:
                swapped.append((m, name, buf))
                m._buffers[name] = buf.clone()
    try:
        yield
    finally:
        with torch.no_grad():
            for m, name, original in swapped:
                if keep_updates:
                    original.copy_(m._buffers[name])
                m._buffers[name] = original


class HessianOperator(DampedOperator):
    r"""H, the Hessian of ``loss_fn(batch)`` w.r.t. ``params``; called, ``A(d) = d + H d / (λ + δ)``.

    Parameters
    ----------
    loss_fn : ``loss_fn(batch) -> scalar``; runs the pretext forward (for BYOL, with the EMA update
        disabled).  Parameters outside ``params`` (the pretext head φ_P) are treated as constants.
    params : the backbone parameters θ_P, as a sequence of tensors or a mapping name → tensor (the
        names then appear in error messages).
    batch : the Hessian batch, fixed for the whole stage.
    mode : ``"reuse"`` builds ``g = ∇_θ L_P`` with ``create_graph=True`` once, at construction, and
        answers each product ``H d = ∇_θ ⟨g, d⟩`` with one double backward through the retained graph,
        across all CG iterations and all upper steps of the stage, until :meth:`release`.  The
        parameters must not change meanwhile (a product then raises ``RuntimeError``).  ``"recompute"``
        is the official product: forward, create-graph backward and double backward on every call.
    lam, damping : λ and δ; ``scale = 1/(λ+δ)``.
    bn_stats, module : what happens to the BatchNorm buffers of ``module`` (see the module docstring):
        ``"restore"`` keeps them bit-identical, ``"update"`` lets each pretext forward update them.
        Pass the module that owns the BatchNorm layers (the backbone, or the whole pretext model);
        without ``module`` the forward runs on the live buffers: they drift as with ``"update"`` and
        a train-mode forward of the caller may invalidate a ``"reuse"`` graph.

    Counters: ``n_products`` (double backwards), ``n_loss_calls`` (calls of ``loss_fn``, i.e. pretext
    forwards) and ``n_graph_builds`` (create-graph backwards).  Per stage of N_U upper steps with K
    products each, ``recompute`` gives N_U·K of all three, ``reuse`` gives N_U·K products and one of
    the others (spec §6.1).
    """

    def __init__(self, loss_fn: Callable[[object], Tensor], params: Sequence[Tensor] | Mapping[str, Tensor],
                 batch: object, *, mode: str = "reuse", lam: float = OFFICIAL_LAMBDA,
                 damping: float = OFFICIAL_DAMPING, bn_stats: str = "restore", module: nn.Module | None = None):
        if mode not in _HVP_MODES:
            raise ValueError(f"mode must be one of {_HVP_MODES}, got {mode!r}")
        if bn_stats not in _BN_STATS:
            raise ValueError(f"bn_stats must be one of {_BN_STATS}, got {bn_stats!r}")
        if not (lam + damping > 0 and math.isfinite(lam + damping)):
            raise ValueError(f"lam + damping must be finite and > 0, got {lam} + {damping}")
        if isinstance(params, Mapping):
            self.names: list[str] | None = list(params.keys())
            params = list(params.values())
        else:
            self.names = None
        self.params = tuple(params)
        if not self.params:
            raise ValueError("params must contain at least one tensor")
        for i, p in enumerate(self.params):
            if not p.requires_grad:
                raise ValueError(f"params[{i}] does not require grad")
        self.loss_fn, self.batch, self.mode = loss_fn, batch, mode
        self.lam, self.damping = lam, damping
        self.scale = 1.0 / (lam + damping)
        self.bn_stats, self.module = bn_stats, module
        self.n_products = self.n_loss_calls = self.n_graph_builds = 0
        self._grads: Tensors | None = None
        self._released = False
        if mode == "reuse":
            self._grads = self._first_order()
        # autograd's own version check misses parameters that the retained graph did not save
        # (e.g. a first-layer weight), so a stale graph would go unnoticed without this
        self._versions = [p._version for p in self.params]

    # The forward runs on private copies of the BatchNorm buffers, for two reasons: "restore" leaves
    # the module's own buffers untouched, and the retained graph (reuse) must never hold a buffer that
    # a later train-mode forward of the caller updates in place, or autograd's version check fails.
    def _loss(self) -> Tensor:
        with isolated_bn_buffers(self.module, keep_updates=self.bn_stats == "update"):
            loss = self.loss_fn(self.batch)
        self.n_loss_calls += 1
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        return loss

    def _first_order(self) -> Tensors:
        grads = torch.autograd.grad(self._loss(), self.params, create_graph=True, allow_unused=True)
        self.n_graph_builds += 1
        return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads))

    def _second_order(self, grads: Tensors, d: Sequence[Tensor], *, batched: bool, official: bool) -> Tensors:
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        out = [torch.zeros_like(di) for di in d]
        if not live:  # loss linear in params: H = 0
            return tuple(out)
        if official:
            # the official form: differentiate the scalar Σ⟨g, d⟩
            s = torch.stack([torch.sum(grads[i] * d[i]) for i in live]).sum()
            hv = torch.autograd.grad(s, self.params, allow_unused=True)
        else:
            hv = torch.autograd.grad([grads[i] for i in live], self.params,
                                     grad_outputs=[d[i] for i in live], retain_graph=True,
                                     allow_unused=True, is_grads_batched=batched)
        return tuple(o if h is None else h for o, h in zip(out, hv))

    def _check_d(self, d: Sequence[Tensor], batched: bool) -> Tensors:
        if self._released:
            raise RuntimeError("HessianOperator was released; build a new one for the next stage")
        if self.mode == "reuse":
            for i, (p, ver) in enumerate(zip(self.params, self._versions)):
                if p._version != ver:
                    name = f" ('{self.names[i]}')" if self.names is not None else ""
                    raise RuntimeError(f"params[{i}]{name} was modified in place after the gradient graph "
                                       "was built; mode='reuse' needs θ_P fixed for the whole stage")
        d = tuple(d)
        if len(d) != len(self.params):
            raise ValueError(f"got {len(d)} tensors, expected {len(self.params)} (one per parameter)")
        for i, (di, p) in enumerate(zip(d, self.params)):
            shape = tuple(di.shape[1:]) if batched else tuple(di.shape)
            if shape != tuple(p.shape):
                raise ValueError(f"tensor {i} has shape {tuple(di.shape)}, expected "
                                 f"{('(k, ) + ' if batched else '')}{tuple(p.shape)}")
        return d

    def hvp(self, d: Sequence[Tensor]) -> Tensors:
        """``H d`` (no identity, no scaling)."""
        d = self._check_d(d, batched=False)
        if self.mode == "reuse":
            hv = self._second_order(self._grads, d, batched=False, official=False)
        else:
            hv = self._second_order(self._first_order(), d, batched=False, official=True)
        self.n_products += 1
        return tuple(h.detach() for h in hv)

    def hvp_batched(self, D: Sequence[Tensor]) -> Tensors:
        """``H d_j`` for k directions at once; each tensor of ``D`` has a leading dimension k.

        Uses ``is_grads_batched`` (vmap over the double backward); counts k products.
        """
        D = self._check_d(D, batched=True)
        grads = self._grads if self.mode == "reuse" else self._first_order()
        hv = self._second_order(grads, D, batched=True, official=False)
        self.n_products += D[0].shape[0]
        return tuple(h.detach() for h in hv)

    def release(self) -> None:
        """Free the retained gradient graph (end of the stage).  Later products raise."""
        self._grads = None
        self._released = True


# --- several batches, several ranks ----------------------------------------------------------------

class AveragedOperator(DampedOperator):
    """``H̄ d = (1/n) Σ H_i d`` over the n operators ``ops`` (one per Hessian batch), which share λ+δ."""

    def __init__(self, ops: Sequence[DampedOperator]):
        self.ops = list(ops)
        if not self.ops:
            raise ValueError("ops must contain at least one operator")
        scales = {op.scale for op in self.ops}
        if len(scales) != 1:
            raise ValueError(f"the operators must share scale = 1/(λ+δ), got {sorted(scales)}")
        self.scale = self.ops[0].scale
        self.names = getattr(self.ops[0], "names", None)

    def _mean(self, products: list[Tensors]) -> Tensors:
        return tuple(sum(h[i] for h in products) / len(products) for i in range(len(products[0])))

    def hvp(self, d: Sequence[Tensor]) -> Tensors:
        return self._mean([op.hvp(d) for op in self.ops])

    def hvp_batched(self, D: Sequence[Tensor]) -> Tensors:
        return self._mean([op.hvp_batched(D) for op in self.ops])

    def release(self) -> None:
        for op in self.ops:
            op.release()


class RankMeanOperator(DampedOperator):
    """``H̄ d``: the mean over torchrun ranks of the per-rank products of ``op`` (an operator whose
    loss is the rank's part of the global loss, see :mod:`bissl_kit.distributed`): the product of
    the global batch, the same on every rank, so every dot product of the solver, and the solution,
    are the same on all ranks too.

    Other attributes (``batch``, ``n_products``, ...) are the wrapped operator's; the products are
    not forwarded, since the wrapped operator's would be rank-local.
    """

    def __init__(self, op: DampedOperator):
        self.op = op
        self.scale = op.scale
        self.names = getattr(op, "names", None)

    def hvp(self, d: Sequence[Tensor]) -> Tensors:
        return reduce_mean(self.op.hvp(d))

    def hvp_batched(self, D: Sequence[Tensor]) -> Tensors:
        """One product per direction, then one collective: the wrapped operator's vmap
        (``is_grads_batched``) has no batching rule for the collectives in the graph of a gathered
        loss (SimCLR's NT-Xent)."""
        cols = [self.op.hvp(tuple(t[j] for t in D)) for j in range(D[0].shape[0])]
        return reduce_mean(tuple(torch.stack(c) for c in zip(*cols)))

    def release(self) -> None:
        self.op.release()

    def __getattr__(self, name):
        if name == "op":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.op, name)


def rank_mean(op: DampedOperator) -> DampedOperator:
    """``op`` wrapped in :class:`RankMeanOperator` under torchrun, else ``op`` itself."""
    return RankMeanOperator(op) if is_distributed() else op
