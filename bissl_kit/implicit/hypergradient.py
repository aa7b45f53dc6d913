r"""The hypergradient: x ≈ A⁻¹ v for v = ∇_θP L_D (spec §1.4 step 3), one solve or a stage's N_U.

:func:`hypergradient` runs one solve with timing and diagnostics; :class:`HypergradientSolver` runs
the N_U solves of a stage against one fixed operator, with warm start or Krylov recycling.  The
solver is named as in the BiSSL config: ``"layerwise"`` (official), ``"cg"`` or ``"minres"``
(:mod:`bissl_kit.implicit.solvers`), or ``"none"``: no solve, x = v (:func:`no_solve`), the first-order
approximation of the implicit term that the ablations set beside the solvers.  Presets: :data:`PAPER_SOLVER` reproduces the
official scheme, :data:`RECOMMENDED_SOLVER` is the kit's default.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .recycling import KrylovMemory
from .solvers import SolveResult, cg, layerwise, minres

__all__ = ["OFFICIAL_CG_ITERS", "SOLVERS", "DEFAULT_ITERS", "HypergradResult", "hypergradient", "HypergradientSolver", "no_solve",
           "PAPER_SOLVER", "RECOMMENDED_SOLVER"]

#: Solver iterations per upper step (K); the official code never stops early.
OFFICIAL_CG_ITERS = 5

def no_solve(operator, b, **_unused) -> SolveResult:
    """x = b itself, with no product: A⁻¹ ≈ I, the first-order approximation (the implicit term becomes the
    downstream gradient at θ_P). It asks whether the solve matters at all: beside MINRES-1 (x = α v, a
    rescaled v) it isolates the step size α, beside MINRES-5 or layerwise-5 the direction the solve adds."""
    b = tuple(b)
    return SolveResult(x=b, residual_norms=[], converged=False, iterations=0, n_matvec=0,
                       initial_residual_norm=float("nan"))


#: The solvers by their BiSSL config name.
SOLVERS = {"layerwise": layerwise, "cg": cg, "minres": minres, "none": no_solve}
_WARM_STARTS = ("none", "previous", "recycle")

Tensors = tuple[Tensor, ...]
MatVec = Callable[[Tensors], Sequence[Tensor]]


@dataclass
class HypergradResult:
    """``x ≈ A⁻¹ v`` and how it was obtained: ``n_products`` counts the products of this solve,
    ``seconds`` its wall time; the rest as :class:`~bissl_kit.implicit.solvers.SolveResult`."""

    x: Tensors
    residual_norms: list[float]
    iterations: int
    seconds: float
    converged: bool
    n_products: int
    initial_residual_norm: float = float("nan")
    n_nonfinite: int = 0
    negative_curvature: bool = False


def _check_solver(solver: str, rtol: float | None, atol: float | None) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {tuple(SOLVERS)}, got {solver!r}")
    if solver == "layerwise" and (rtol is not None or atol is not None):
        raise ValueError("layerwise reproduces the official recursion: it has no tolerance; rtol and atol "
                         "must be None")


def hypergradient(v: Sequence[Tensor], operator: MatVec, *, solver: str = "cg",
                  max_iter: int = OFFICIAL_CG_ITERS, rtol: float | None = None, atol: float | None = None,
                  x0: Sequence[Tensor] | None = None, memory: KrylovMemory | None = None,
                  nonfinite: str = "raise") -> HypergradResult:
    """Solve ``(I + H/(λ+δ)) x = v`` for ``v = ∇_θP L_D`` with ``solver``.

    ``max_iter`` is the iteration cap of ``"cg"`` and ``"minres"`` and the exact count of
    ``"layerwise"``.  ``x0`` warm-starts CG or MINRES (e.g. the previous upper step's x; costs one
    product).  ``memory`` (``"cg"`` only), a :class:`KrylovMemory` shared by the upper steps of a
    stage, makes the solve deflated CG on the directions recorded so far and records this solve's
    products into it.
    """
    _check_solver(solver, rtol, atol)
    if solver in ("layerwise", "none") and x0 is not None:
        raise ValueError(f"{solver} has no start to warm: x0 must be None")
    if memory is not None and solver != "cg":
        raise ValueError(f"memory (Krylov recycling) needs solver='cg', got solver={solver!r}")
    v = tuple(t.detach() for t in v)
    common = dict(nonfinite=nonfinite, names=getattr(operator, "names", None),
                  on_product=memory.record(v) if memory is not None else None)
    sync = v[0].device.type == "cuda"
    if sync:
        torch.cuda.synchronize(v[0].device)
    t0 = time.perf_counter()
    if solver == "none":
        res = no_solve(operator, v)
    elif solver == "layerwise":
        res = layerwise(operator, v, iters=max_iter, **common)
    elif solver == "minres":
        res = minres(operator, v, max_iter=max_iter, rtol=rtol, atol=atol, x0=x0, **common)
    else:
        res = cg(operator, v, max_iter=max_iter, rtol=rtol, atol=atol, x0=x0, **common,
                 deflation=memory if memory is not None and memory.size else None)
    if sync:
        torch.cuda.synchronize(v[0].device)
    return _result(res, time.perf_counter() - t0)


def _result(res: SolveResult, seconds: float) -> HypergradResult:
    return HypergradResult(res.x, res.residual_norms, res.iterations, seconds, res.converged, res.n_matvec,
                           res.initial_residual_norm, res.n_nonfinite, res.negative_curvature)


#: The official scheme (spec §1.5): layerwise recursion, K = 5, no warm start, NaNs zeroed.  Pair it
#: with ``HessianOperator(mode="recompute", bn_stats="update")`` for the official side effects.
PAPER_SOLVER = dict(solver="layerwise", max_iter=OFFICIAL_CG_ITERS, rtol=None, atol=None,
                    warm_start="none", nonfinite="zero")

#: The kit's default: one MINRES iteration, i.e. x = α v with the α that minimises ‖v − A α v‖
#: (never farther from solving the system than x = 0, which the official five layerwise iterations
#: can be where A is indefinite).  Its speed and error against the official scheme and against more
#: iterations are measured by ``benchmarks/stage.py`` and ``benchmarks/hypergradient.py``
#: (docs/benchmarks.md); raise ``max_iter`` where a closer solve matters more than speed.  Pair it with
#: ``HessianOperator(mode="reuse")``.
RECOMMENDED_SOLVER = dict(solver="minres", max_iter=1, rtol=1e-2, atol=None,
                          warm_start="none", nonfinite="raise")

#: Each solver's K where a config leaves it to the solver: the official count for the official-style
#: solvers, the recommended one for MINRES (so switching solver never inherits another's K).
DEFAULT_ITERS = {"layerwise": OFFICIAL_CG_ITERS, "cg": OFFICIAL_CG_ITERS, "minres": RECOMMENDED_SOLVER["max_iter"],
                 "none": 0}


class HypergradientSolver:
    """The N_U hypergradient solves of one stage against one fixed operator A.

    ``warm_start``: ``"none"`` (each solve from 0, as the official code), ``"previous"`` (from the last
    solution; one extra product; ``"cg"`` or ``"minres"``) or ``"recycle"`` (``"cg"`` only: deflated
    CG on a :class:`KrylovMemory` of the stage's products: Galerkin start and deflated search
    directions, no extra product).  Build one per stage; :meth:`release` frees the memory and
    releases the operator.  ``HypergradientSolver(op, **RECOMMENDED_SOLVER)`` is the default.
    """

    def __init__(self, operator: MatVec, *, solver: str = "cg", max_iter: int = OFFICIAL_CG_ITERS,
                 rtol: float | None = None, atol: float | None = None, warm_start: str = "none",
                 nonfinite: str = "raise", memory_size: int = 32, exact_start: bool = True):
        if warm_start not in _WARM_STARTS:
            raise ValueError(f"warm_start must be one of {_WARM_STARTS}, got {warm_start!r}")
        _check_solver(solver, rtol, atol)
        if solver in ("layerwise", "none") and warm_start != "none":
            raise ValueError(f"{solver} has no warm start; use warm_start='none'")
        if solver == "minres" and warm_start == "recycle":
            raise ValueError("warm_start='recycle' (deflated CG) needs solver='cg'; minres takes 'none' or 'previous'")
        self.operator = operator
        self.options = dict(solver=solver, max_iter=max_iter, rtol=rtol, atol=atol, nonfinite=nonfinite)
        self.warm_start = warm_start
        self.memory = KrylovMemory(memory_size, exact_start=exact_start) if warm_start == "recycle" else None
        self.previous: Tensors | None = None
        self.history: list[HypergradResult] = []

    def solve(self, v: Sequence[Tensor]) -> HypergradResult:
        x0 = self.previous if self.warm_start == "previous" else None
        res = hypergradient(v, self.operator, x0=x0, memory=self.memory, **self.options)
        self.previous = res.x
        self.history.append(res)
        return res

    __call__ = solve

    def release(self) -> None:
        if self.memory is not None:
            self.memory.clear()
        self.previous = None
        release = getattr(self.operator, "release", None)
        if release is not None:
            release()
