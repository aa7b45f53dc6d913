r"""Implicit-gradient engine of BiSSL: Hessian-vector products and the linear solve.

The upper level of BiSSL needs the hypergradient (spec §1.4)

.. math::

    x = A^{-1} v, \qquad A = I + \frac{H}{\lambda + \delta}, \qquad
    H = \nabla^2_{\theta_P} L_P, \qquad v = \nabla_{\theta_P} L_D(\theta_P, \phi_D),

where H is the Hessian of the pretext loss with respect to the backbone only, on one fixed pretext
batch (the "Hessian batch"), λ = 1e-3 is the proximal weight and δ = 10 the damping that the official
code adds to λ inside the hypergradient only.  Nothing guarantees that A is positive definite (H may
be indefinite, spec C3), and on the CPU backbone at the official δ it is not (README, "Benchmarks").

Modules, in the order a solve uses them:

* :mod:`~bissl_kit.implicit.operators`: A itself.  :class:`HessianOperator` (one loss on one batch:
  the official product recomputed each time, or the gradient graph built once per stage and
  reused; BatchNorm buffers restored or updated), :class:`AveragedOperator` (several Hessian
  batches) and :class:`RankMeanOperator` (several torchrun ranks), all sharing the damped map of
  :class:`DampedOperator`.
* :mod:`~bissl_kit.implicit.solvers`: :func:`layerwise` (the official recursion, bit for bit; not
  CG), :func:`cg` and :func:`minres`, one function each, one :class:`SolveResult`.
* :mod:`~bissl_kit.implicit.recycling`: :class:`KrylovMemory`, the products of a stage kept for
  deflated CG in the later upper steps (A is fixed within a stage).
* :mod:`~bissl_kit.implicit.hypergradient`: :func:`hypergradient` (one solve, timed; ``solver="none"`` is
  :func:`no_solve`, x = v, the first-order approximation) and
  :class:`HypergradientSolver` (the N_U solves of a stage, with warm start or recycling), with the
  presets :data:`PAPER_SOLVER` and :data:`RECOMMENDED_SOLVER`.
"""
from .hypergradient import (
    DEFAULT_ITERS, OFFICIAL_CG_ITERS, PAPER_SOLVER, RECOMMENDED_SOLVER, SOLVERS, HypergradientSolver, HypergradResult,
    hypergradient, no_solve,
)
from .operators import (
    OFFICIAL_DAMPING, OFFICIAL_LAMBDA, AveragedOperator, DampedOperator, HessianOperator, RankMeanOperator,
    isolated_bn_buffers, rank_mean,
)
from .recycling import KrylovMemory
from .solvers import OFFICIAL_CG_EPS, NonFiniteError, SolveResult, cg, layerwise, minres

__all__ = [
    "OFFICIAL_CG_EPS", "OFFICIAL_CG_ITERS", "OFFICIAL_LAMBDA", "OFFICIAL_DAMPING",
    "NonFiniteError", "SolveResult", "layerwise", "cg", "minres",
    "DampedOperator", "HessianOperator", "AveragedOperator", "RankMeanOperator", "rank_mean", "isolated_bn_buffers",
    "KrylovMemory",
    "SOLVERS", "DEFAULT_ITERS", "HypergradResult", "hypergradient", "HypergradientSolver", "no_solve",
    "PAPER_SOLVER", "RECOMMENDED_SOLVER",
]
