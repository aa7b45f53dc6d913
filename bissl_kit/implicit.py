r"""Implicit-gradient engine of BiSSL: Hessian-vector products and the linear solve.

The upper level of BiSSL needs the hypergradient (spec §1.4)

.. math::

    x = A^{-1} v, \qquad A = I + \frac{H}{\lambda + \delta}, \qquad
    H = \nabla^2_{\theta_P} L_P, \qquad v = \nabla_{\theta_P} L_D(\theta_P, \phi_D),

where H is the Hessian of the pretext loss with respect to the backbone only, on one fixed pretext
batch (the "Hessian batch"), λ = 1e-3 is the proximal weight and δ = 10 the damping that the official
code adds to λ inside the hypergradient only.  Nothing guarantees that A is positive definite (H may
be indefinite, spec C3), and A is not close to I on a real backbone: on the narrow CPU ResNet-18 after
100 SimCLR steps, Lanczos started from v finds H's eigenvalues from −28 to 1167, so A (δ = 10) has
eigenvalues from −1.8 to 118 with some near 0; v itself has a Rayleigh quotient vᵀHv/vᵀv ≈ 360.
CG is only valid for positive definite A; :class:`CGResult` flags ``negative_curvature`` when it
meets pᵀAp ≤ 0.

Building blocks
---------------
* :func:`cg_solve` solves ``A x = b`` for ``b`` a tuple of parameter-shaped tensors, either with the
  official per-tensor recursion (``mode="layerwise"``, spec §1.5, reproduced bit for bit; *not* CG and
  not convergent) or with textbook conjugate gradient on the concatenated vector (``mode="global"``,
  with tolerance, warm start and deflation).
* :class:`HessianOperator` is ``A`` for a loss over a subset of parameters.  ``mode="recompute"`` is
  the official product (forward + create-graph backward + double backward per product);
  ``mode="reuse"`` builds the first-order gradient graph once and answers every product of the stage
  with one double backward.
* :class:`KrylovMemory` keeps the pairs ``(p, A p)`` that CG computed during a stage.  Since A is fixed
  within a stage (θ_P, φ_P and the Hessian batch do not change during the upper phase), later solves
  reuse them without new products (Krylov subspace recycling): deflated CG starts from the Galerkin
  solution on their span and searches only A-orthogonally to it.
* :func:`hypergradient` runs one solve with diagnostics; :class:`HypergradientSolver` runs the N_U
  solves of a stage with warm start or recycling.

Presets: :data:`PAPER_SOLVER` reproduces the official scheme, :data:`RECOMMENDED_SOLVER` is the
default measured in ``benchmarks/hypergradient.py``.

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
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "OFFICIAL_CG_EPS", "OFFICIAL_CG_ITERS", "OFFICIAL_LAMBDA", "OFFICIAL_DAMPING",
    "CGResult", "NonFiniteError", "cg_solve",
    "HessianOperator", "KrylovMemory",
    "HypergradResult", "hypergradient", "HypergradientSolver",
    "PAPER_SOLVER", "RECOMMENDED_SOLVER",
]

# --- constants of the official code (spec §1.2-§1.5, §6.3) --------------------------------------
#: Added to both denominators of the layerwise recursion (α and β), as in the official code.
OFFICIAL_CG_EPS = 1e-12
#: CG iterations per upper step (K); the official code never stops early.
OFFICIAL_CG_ITERS = 5
#: Proximal weight λ of the lower problem.
OFFICIAL_LAMBDA = 1e-3
#: Damping δ added to λ inside the hypergradient only: A = I + H/(λ + δ).
OFFICIAL_DAMPING = 10.0

Tensors = tuple[Tensor, ...]
MatVec = Callable[[Tensors], Sequence[Tensor]]

_CG_MODES = ("global", "layerwise", "minres")
_NONFINITE = ("raise", "zero")
_HVP_MODES = ("reuse", "recompute")
_BN_STATS = ("restore", "update")
_WARM_STARTS = ("none", "previous", "recycle")


class NonFiniteError(FloatingPointError):
    """A NaN or Inf appeared in the solve; the message names the iteration and the tensor."""


@dataclass
class CGResult:
    """Outcome of :func:`cg_solve`.

    ``residual_norms[k]`` is ‖r_{k+1}‖ after iteration k+1 (one entry per iteration), where r is the
    residual the recursion carries.  For ``"global"`` that is b − A x up to rounding; for
    ``"layerwise"`` it is *not* b − A x (per-tensor step sizes break the identity), which is why the
    official recursion can look converged while x is not.  ``initial_residual_norm`` is ‖r_0‖.
    ``negative_curvature``: CG met pᵀAp ≤ 0 (its step is then invalid); MINRES met a Lanczos vector
    with vᵀAv ≤ 0 (a proof that A is not positive definite, but not every indefinite A shows one).
    """

    x: Tensors
    residual_norms: list[float]
    converged: bool
    iterations: int
    n_matvec: int
    initial_residual_norm: float
    n_nonfinite: int = 0
    negative_curvature: bool = False


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return torch.stack([torch.sum(ai * bi) for ai, bi in zip(a, b)]).sum()


def _describe(i: int, t: Tensor, names: Sequence[str] | None) -> str:
    label = f"tensor {i}" + (f" ('{names[i]}')" if names is not None else "")
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    return f"{label} of shape {tuple(t.shape)}: {n_nan} NaN, {n_inf} Inf"


def _raise_nonfinite(iteration: int, groups: Sequence[tuple[str, Sequence[Tensor]]],
                     names: Sequence[str] | None) -> None:
    """Raise for the first non-finite tensor among the labelled ``groups`` (checked in order)."""
    for where, group in groups:
        for i, t in enumerate(group):
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(
                    f"non-finite value in {where} at CG iteration {iteration}: {_describe(i, t, names)}")
    where = ", ".join(w for w, _ in groups)
    raise NonFiniteError(f"non-finite step size at CG iteration {iteration} (0/0 or overflow; {where} "
                         "are finite)")


def _check_matvec_output(out: Sequence[Tensor], b: Sequence[Tensor]) -> Tensors:
    out = tuple(out)
    if len(out) != len(b):
        raise ValueError(f"matvec returned {len(out)} tensors, expected {len(b)} (one per tensor of b)")
    for i, (o, bi) in enumerate(zip(out, b)):
        if o.shape != bi.shape:
            raise ValueError(f"matvec output tensor {i} has shape {tuple(o.shape)}, expected {tuple(bi.shape)}")
    return out


def _validate_tensors(name: str, ts: Sequence[Tensor], like: Sequence[Tensor] | None = None) -> Tensors:
    ts = tuple(ts)
    if len(ts) == 0:
        raise ValueError(f"{name} must contain at least one tensor")
    if like is not None:
        if len(ts) != len(like):
            raise ValueError(f"{name} has {len(ts)} tensors, expected {len(like)} (one per tensor of b)")
        for i, (t, l) in enumerate(zip(ts, like)):
            if t.shape != l.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, expected {tuple(l.shape)}")
    return ts


def _finalize_nonfinite(x: list[Tensor]) -> tuple[list[Tensor], int]:
    n_bad = sum(int((~torch.isfinite(t)).sum()) for t in x)
    if n_bad:
        warnings.warn(f"cg_solve: {n_bad} non-finite entries in the solution replaced by torch.nan_to_num "
                      "(official behaviour: NaN -> 0, ±Inf -> ±largest finite)", RuntimeWarning, stacklevel=3)
        x = [torch.nan_to_num(t) for t in x]
    return x, n_bad


def cg_solve(matvec: MatVec, b: Sequence[Tensor], *, max_iter: int, mode: str = "global",
             rtol: float | None = None, atol: float | None = None, x0: Sequence[Tensor] | None = None,
             r0: Sequence[Tensor] | None = None, nonfinite: str = "raise",
             names: Sequence[str] | None = None,
             on_product: Callable[[Tensors, Tensors], None] | None = None,
             deflation: "KrylovMemory | None" = None) -> CGResult:
    r"""Solve ``A x = b`` where ``A = matvec`` acts on tuples of tensors.

    ``mode="global"``: textbook conjugate gradient on the concatenated vector,

    .. math::
        r_0 = b - A x_0,\ p_0 = r_0;\quad
        \alpha_k = \frac{r_k^\top r_k}{p_k^\top A p_k},\ x_{k+1} = x_k + \alpha_k p_k,\
        r_{k+1} = r_k - \alpha_k A p_k,\ p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}{r_k^\top r_k} p_k,

    stopping once ‖r_k‖ ≤ max(rtol·‖b‖, atol) (never early when both are ``None``) or after
    ``max_iter`` iterations.  ``x0`` warm-starts it (one extra product for r_0 unless ``r0``, the
    residual ``b − A x0``, is given too).  If some pᵀAp ≤ 0 (A is not positive definite along p), CG
    goes on but ``negative_curvature`` is set.

    ``mode="layerwise"``: the official recursion (spec §1.5), bit for bit.  x_0 = 0, r_0 = d_0 = b, and
    for exactly ``max_iter`` iterations, with ``Ad = A(d)`` the full coupled operator and, per tensor i,

    .. math::
        \alpha_i = \frac{\|r_i\|^2}{d_i\cdot(Ad)_i + \varepsilon},\ x_i \mathrel{+}= \alpha_i d_i,\
        r_i' = r_i - \alpha_i (Ad)_i,\ \beta_i = \frac{\|r_i'\|^2}{\|r_i\|^2 + \varepsilon},\
        d_i = r_i' + \beta_i d_i,

    with ε = :data:`OFFICIAL_CG_EPS`.  This is not CG (one step size per tensor) and does not converge
    in general; ``converged`` is always ``False`` and tolerances / warm start are refused.

    Non-finite values: ``nonfinite="raise"`` raises :class:`NonFiniteError` naming the iteration and
    the tensor (``names`` gives tensor names for the message).  ``nonfinite="zero"`` is the official
    behaviour: the recursion runs unchecked and the solution goes through ``torch.nan_to_num``
    (NaN → 0, ±Inf → ±largest finite) with a ``RuntimeWarning``; ``n_nonfinite`` counts the entries.

    ``mode="minres"``: MINRES on the concatenated vector, with the same tolerance and warm-start
    arguments as ``"global"``.  It needs only a symmetric A: where A = I + H/(λ+δ) is indefinite
    (as it is on the CPU backbone at the official δ, see the module docstring) CG has no valid step
    (pᵀAp ≤ 0) and its residual can grow, while MINRES minimises ‖b − A x‖ over the Krylov space, so
    the residual never grows.  Same cost: one product per iteration.

    ``on_product(p, Ap)`` is called after every product (used by :class:`KrylovMemory`).

    ``deflation`` (global only): a :class:`KrylovMemory` holding W = Q and AW from earlier solves with
    the same A.  The solve is then deflated CG (Saad, Yeung, Erhel & Guyomarc'h, SISC 2000): the
    start gets the Galerkin correction x₀ ← x₀ + W G⁻¹ Wᵀ r₀ (G = WᵀAW) and every search direction
    is made A-orthogonal to W, z = r − W G⁻¹ (AW)ᵀ r, so CG only works on the part of the spectrum
    that W has not captured yet.  Because the stored AW carries the rounding of the products, the
    start's residual comes from one real product, the step is α = pᵀr/pᵀAp and each direction is
    A-orthogonalised explicitly against the previous one (p = z − (zᵀAp/pᵀAp) p); in exact arithmetic
    these equal the textbook forms.  The memory is read as it was when the solve started; new
    products go to ``on_product``.
    """
    if mode not in _CG_MODES:
        raise ValueError(f"mode must be one of {_CG_MODES}, got {mode!r}")
    if nonfinite not in _NONFINITE:
        raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0 (>= 1 for layerwise), got {max_iter!r}")
    for tol_name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is not None and not (tol >= 0 and math.isfinite(tol)):
            raise ValueError(f"{tol_name} must be a finite number >= 0 or None, got {tol!r}")
    b = _validate_tensors("b", b)
    if names is not None and len(names) != len(b):
        raise ValueError(f"names has {len(names)} entries, expected {len(b)}")
    if x0 is not None:
        x0 = _validate_tensors("x0", x0, b)
    if r0 is not None:
        if x0 is None:
            raise ValueError("r0 (the residual b - A x0) requires x0")
        r0 = _validate_tensors("r0", r0, b)
    if mode == "layerwise":
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1 for layerwise, got {max_iter}")
        if rtol is not None or atol is not None or x0 is not None or deflation is not None:
            raise ValueError("layerwise reproduces the official recursion: it has no tolerance and starts at "
                             "x0 = 0; rtol, atol, x0 and deflation must be None")
        return _layerwise(matvec, b, max_iter, nonfinite, names, on_product)
    if mode == "minres":
        if deflation is not None:
            raise ValueError("deflation (Krylov recycling) is implemented for mode='global' only")
        return _minres(matvec, b, max_iter, rtol, atol, x0, r0, nonfinite, names, on_product)
    return _global(matvec, b, max_iter, rtol, atol, x0, r0, nonfinite, names, on_product, deflation)


def _layerwise(matvec, b, max_iter, nonfinite, names, on_product) -> CGResult:
    check = nonfinite == "raise"
    if check and not all(bool(torch.isfinite(t).all()) for t in b):
        _raise_nonfinite(0, [("the right-hand side b", b)], names)
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    d = [t.clone() for t in b]
    initial = float(torch.sqrt(_dot(r, r)))
    residual_norms = []
    for it in range(1, max_iter + 1):
        Ad = _check_matvec_output(matvec(tuple(d)), b)
        if on_product is not None:
            on_product(tuple(d), Ad)
        rr_new_all = []
        for i in range(len(b)):
            rr = torch.sum(r[i] * r[i])
            alpha = rr / (torch.sum(d[i] * Ad[i]) + OFFICIAL_CG_EPS)
            x[i] = x[i] + alpha * d[i]
            r[i] = r[i] - alpha * Ad[i]
            rr_new = torch.sum(r[i] * r[i])
            beta = rr_new / (rr + OFFICIAL_CG_EPS)
            d[i] = r[i] + beta * d[i]
            rr_new_all.append(rr_new)
        rr_total = torch.stack(rr_new_all).sum()
        if check and not bool(torch.isfinite(rr_total)):
            _raise_nonfinite(it, [("A(d)", Ad), ("x", x), ("d", d)], names)
        residual_norms.append(float(torch.sqrt(rr_total)))
    n_bad = 0
    if nonfinite == "zero":
        x, n_bad = _finalize_nonfinite(x)
    return CGResult(tuple(x), residual_norms, False, max_iter, max_iter, initial, n_bad)


class _CountedProducts:
    """``matvec`` with its output checked against b's shapes, counted, and reported to ``on_product``."""

    def __init__(self, matvec: MatVec, b: Sequence[Tensor], on_product):
        self.matvec, self.b, self.on_product, self.count = matvec, b, on_product, 0

    def __call__(self, d: Tensors) -> Tensors:
        Ad = _check_matvec_output(self.matvec(d), self.b)
        self.count += 1
        if self.on_product is not None:
            self.on_product(d, Ad)
        return Ad


def _tolerance(b: Sequence[Tensor], rtol: float | None, atol: float | None) -> float | None:
    """max(rtol·‖b‖, atol) over the tolerances given; None = never stop early."""
    tols = []
    if rtol is not None:
        tols.append(rtol * float(torch.sqrt(_dot(b, b))))
    if atol is not None:
        tols.append(atol)
    return max(tols) if tols else None


def _global(matvec, b, max_iter, rtol, atol, x0, r0, nonfinite, names, on_product, deflation) -> CGResult:
    check = nonfinite == "raise"
    if check and not all(bool(torch.isfinite(t).all()) for t in b):
        _raise_nonfinite(0, [("the right-hand side b", b)], names)
    apply = _CountedProducts(matvec, b, on_product)

    k_defl = deflation.size if deflation is not None else 0
    x = [torch.zeros_like(t) for t in b] if x0 is None else [t.clone() for t in x0]
    if k_defl:
        # Galerkin start on span(W); r0 comes from a real product, so that the recursion stays
        # consistent with b - A x whatever the rounding in the stored AW
        r_start = b if x0 is None else (r0 if r0 is not None else _sub(b, apply(tuple(x))))
        dx, dAx = deflation.galerkin(r_start, k_defl, with_product=True)
        torch._foreach_add_(x, dx)
        # exact_start: r from one real product, consistent with b - A x whatever the rounding in
        # the stored AW; otherwise r = r_start - AW y for free (consistent to that rounding)
        r = _sub(b, apply(tuple(x))) if deflation.exact_start else _sub(r_start, dAx)
    elif x0 is None:
        r = [t.clone() for t in b]
    else:
        r = [t.clone() for t in r0] if r0 is not None else _sub(b, apply(tuple(x)))
    rs = _dot(r, r)
    if check and not bool(torch.isfinite(rs)):
        _raise_nonfinite(0, [("the initial residual b - A x0", r), ("x0", x)], names)
    initial = float(torch.sqrt(rs))
    tol = _tolerance(b, rtol, atol)

    converged = initial == 0.0 or (tol is not None and initial <= tol)
    residual_norms: list[float] = []
    negative_curvature = False
    p = _sub(r, deflation.deflate(r, k_defl)) if k_defl else [t.clone() for t in r]
    it = 0
    while not converged and it < max_iter:
        it += 1
        Ap = apply(tuple(p))
        pAp = _dot(p, Ap)
        if check and not bool(torch.isfinite(pAp)):
            _raise_nonfinite(it, [("A(p)", Ap), ("p", p)], names)
        if pAp <= 0:
            negative_curvature = True
        # deflated directions are only approximately A-orthogonal to W (AW is stored in the working
        # precision), so the deflated path uses the forms that stay exact line searches for any p:
        # α = pᵀr/pᵀAp and an explicit A-orthogonalisation against the previous direction
        alpha = (_dot(p, r) if k_defl else rs) / pAp
        if check and not bool(torch.isfinite(alpha)):
            _raise_nonfinite(it, [("A(p)", Ap), ("p", p)], names)
        torch._foreach_add_(x, torch._foreach_mul(p, alpha))
        torch._foreach_sub_(r, torch._foreach_mul(Ap, alpha))
        rs_new = _dot(r, r)
        norm = float(torch.sqrt(rs_new))
        residual_norms.append(norm)
        # an exactly zero residual ends CG whatever the tolerance (the next step would be 0/0)
        if norm == 0.0 or (tol is not None and norm <= tol):
            converged = True
            break
        if k_defl:
            z = _sub(r, deflation.deflate(r, k_defl))
            p = torch._foreach_add(z, torch._foreach_mul(p, -_dot(z, Ap) / pAp))
        else:
            p = torch._foreach_add(r, torch._foreach_mul(p, rs_new / rs))
        rs = rs_new
    n_bad = 0
    if nonfinite == "zero":
        x, n_bad = _finalize_nonfinite(x)
    return CGResult(tuple(x), residual_norms, converged, it, apply.count, initial, n_bad, negative_curvature)


def _minres(matvec, b, max_iter, rtol, atol, x0, r0, nonfinite, names, on_product) -> CGResult:
    """MINRES (Paige & Saunders 1975) in the Lanczos form of Choi, Paige & Saunders (SISC 2011).

    Valid for any symmetric A, definite or not: x_k minimises ‖b − A x‖ over x_0 + K_k(A, r_0), so
    the residual never grows.  The Lanczos vectors are kept three at a time; the residual norm φ_k
    comes out of the Givens rotations for free.
    """
    check = nonfinite == "raise"
    if check and not all(bool(torch.isfinite(t).all()) for t in b):
        _raise_nonfinite(0, [("the right-hand side b", b)], names)
    apply = _CountedProducts(matvec, b, on_product)

    x = [torch.zeros_like(t) for t in b] if x0 is None else [t.clone() for t in x0]
    if x0 is None:
        r = [t.clone() for t in b]
    else:
        r = [t.clone() for t in r0] if r0 is not None else _sub(b, apply(tuple(x)))
    beta = float(torch.sqrt(_dot(r, r)))
    if check and not math.isfinite(beta):
        _raise_nonfinite(0, [("the initial residual b - A x0", r), ("x0", x)], names)
    initial = beta
    tol = _tolerance(b, rtol, atol)
    converged = beta == 0.0 or (tol is not None and beta <= tol)
    residual_norms: list[float] = []
    negative_curvature = False
    it = 0
    if not converged:
        v = [t / beta for t in r]
        v_prev = [torch.zeros_like(t) for t in b]
        d_prev = [torch.zeros_like(t) for t in b]    # d_{k-1}
        d_prev2 = [torch.zeros_like(t) for t in b]   # d_{k-2}
        phi = beta
        c, s = -1.0, 0.0          # previous rotation
        delta1, eps = 0.0, 0.0    # δ_k^(1), ε_k carried from the previous step
        while it < max_iter:
            it += 1
            p = list(apply(tuple(v)))
            alpha = float(_dot(v, p))
            if check and not math.isfinite(alpha):
                _raise_nonfinite(it, [("A(v)", p), ("v", v)], names)
            if alpha <= 0:
                negative_curvature = True  # the Rayleigh quotient vᵀAv ≤ 0: A is not positive definite
            torch._foreach_sub_(p, torch._foreach_mul(v, alpha))
            torch._foreach_sub_(p, torch._foreach_mul(v_prev, beta))
            beta_next = float(torch.sqrt(_dot(p, p)))
            # the previous rotation on column k of the tridiagonal matrix, then a new one
            delta2 = c * delta1 + s * alpha
            gamma1 = s * delta1 - c * alpha
            eps_next = s * beta_next
            delta1 = -c * beta_next
            gamma2 = math.hypot(gamma1, beta_next)
            if gamma2 == 0.0:  # A singular on the Krylov space: no further progress is possible
                break
            c, s = gamma1 / gamma2, beta_next / gamma2
            tau, phi = c * phi, s * phi
            d = [(vi - delta2 * dp - eps * dp2) / gamma2 for vi, dp, dp2 in zip(v, d_prev, d_prev2)]
            torch._foreach_add_(x, torch._foreach_mul(d, tau))
            residual_norms.append(phi)
            if check and not all(bool(torch.isfinite(t).all()) for t in x):
                _raise_nonfinite(it, [("x", x), ("A(v)", p)], names)
            if phi == 0.0 or beta_next == 0.0 or (tol is not None and phi <= tol):
                converged = True
                break
            d_prev2, d_prev = d_prev, d
            v_prev, v = v, [t / beta_next for t in p]
            beta, eps = beta_next, eps_next
    n_bad = 0
    if nonfinite == "zero":
        x, n_bad = _finalize_nonfinite(x)
    return CGResult(tuple(x), residual_norms, converged, it, apply.count, initial, n_bad, negative_curvature)


def _sub(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    return list(torch._foreach_sub(list(a), list(b)))


# --- Hessian-vector products -----------------------------------------------------------------------

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


class HessianOperator:
    r"""``A(d) = d + H d / (λ + δ)`` with H the Hessian of ``loss_fn(batch)`` w.r.t. ``params``.

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

    def __call__(self, d: Sequence[Tensor]) -> Tensors:
        hv = self.hvp(d)
        return tuple(di + hi * self.scale for di, hi in zip(d, hv))

    def release(self) -> None:
        """Free the retained gradient graph (end of the stage).  Later products raise."""
        self._grads = None
        self._released = True

    def __enter__(self) -> "HessianOperator":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --- recycling the Krylov subspace of a stage ------------------------------------------------------

class KrylovMemory:
    r"""The directions W (k × n) that A has been applied to during a stage, with AW, for recycling.

    Every product ``(p, A p)`` handed to :meth:`add` is stored as is (normalised), if p has at least a
    fraction ``DROP_TOL`` of its norm outside span(W); the k × k matrices G = Wᵀ A W (symmetrised) and
    M = Wᵀ W are kept up to date in float64.  Storing the raw pairs matters: orthonormalising them
    (Gram–Schmidt on p and the same combination on A p) divides by the remaining norm at every
    step, so the rounding of earlier products compounds geometrically; float32 CG directions are
    nearly dependent, and on the benchmark backbone the stored A q of the 20th direction was off by
    700 %.  Raw pairs carry only their own product's rounding.

    Since A is fixed within a stage (θ_P, φ_P and the Hessian batch do not change during the upper
    phase), the products of one upper step serve all later ones:

    * :meth:`galerkin` gives the Galerkin correction of a residual r on span(W), Δx = W G⁺ Wᵀ r
      (the new residual then has no component along W);
    * :meth:`deflate` gives W G⁺ (AW)ᵀ r, the part of r that deflated CG removes from each search
      direction (see :func:`cg_solve`).

    G⁺ is the pseudo-inverse with eigenvalues below √ε·max|eig| (ε of the vectors' dtype) dropped
    as rounding noise.  Memory: 2·``max_size``·n numbers (n = number of backbone parameters); when
    full, further directions are ignored.

    ``exact_start``: a deflated solve computes its starting residual b − A x₀ with one real product
    (True: exact whatever the rounding of AW), or as b − (AW) y from the stored products (False:
    free, exact up to that rounding, ~1e-4 relative in float32; then a step whose Galerkin start
    already meets the tolerance costs no product at all).
    """

    #: A direction with less than this fraction of its norm outside span(W) adds nothing reliable
    #: (and would make G ill-conditioned); it is skipped.
    DROP_TOL = 1e-2

    def __init__(self, max_size: int = 32, *, exact_start: bool = True):
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be an int >= 1, got {max_size!r}")
        self.max_size = max_size
        self.exact_start = exact_start
        self.clear()

    def clear(self) -> None:
        self._W: Tensor | None = None
        self._AW: Tensor | None = None
        self._G: Tensor | None = None
        self._M: Tensor | None = None
        self._Ginv: tuple[int, Tensor] | None = None
        self._shapes: list[torch.Size] | None = None
        self.size = 0

    @staticmethod
    def _flat(ts: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in ts])

    def _unflat(self, v: Tensor) -> Tensors:
        out, i = [], 0
        for s in self._shapes:
            n = math.prod(s)
            out.append(v[i:i + n].view(s))
            i += n
        return tuple(out)

    def record(self, like: Sequence[Tensor]) -> Callable[[Tensors, Tensors], None]:
        """Bind the tensor shapes of ``like`` and return :meth:`add` (an ``on_product`` callback)."""
        self._shapes = [t.shape for t in like]
        return self.add

    def add(self, p: Sequence[Tensor], Ap: Sequence[Tensor]) -> None:
        if self.size >= self.max_size:
            return
        if self._shapes is None:
            self._shapes = [t.shape for t in p]
        p, Ap = self._flat(p), self._flat(Ap)
        norm = torch.linalg.vector_norm(p)
        if not (bool(torch.isfinite(norm)) and norm > 0 and bool(torch.isfinite(Ap).all())):
            return
        p, Ap = p / norm, Ap / norm
        if self._W is None:
            self._W = p.new_zeros(self.max_size, p.numel())
            self._AW = p.new_zeros(self.max_size, p.numel())
            self._G = torch.zeros(self.max_size, self.max_size, dtype=torch.float64, device=p.device)
            self._M = torch.zeros_like(self._G)
        k = self.size
        c = (self._W[:k] @ p).double()
        if k:
            # squared norm of p's part inside span(W): cᵀ M⁻¹ c, with M = WᵀW
            inside = float(c @ torch.linalg.pinv(self._M[:k, :k], hermitian=True) @ c)
            if 1.0 - inside < self.DROP_TOL ** 2:
                return
        self._W[k], self._AW[k] = p, Ap
        m = torch.cat([c, c.new_ones(1)])
        g = 0.5 * (self._W[:k + 1] @ Ap + self._AW[:k + 1] @ p).double()
        self._M[k, :k + 1], self._M[:k + 1, k] = m, m
        self._G[k, :k + 1], self._G[:k + 1, k] = g, g
        self.size = k + 1

    def _G_pinv(self, k: int) -> Tensor:
        if self._Ginv is None or self._Ginv[0] != k:
            eps = torch.finfo(self._W.dtype).eps
            self._Ginv = (k, torch.linalg.pinv(self._G[:k, :k], hermitian=True, rtol=math.sqrt(eps)))
        return self._Ginv[1]

    def galerkin(self, r: Sequence[Tensor], k: int | None = None, *,
                 with_product: bool = False) -> Tensors | tuple[Tensors, Tensors]:
        """``Δx = W G⁺ Wᵀ r`` from the first k directions (all by default); with ``with_product``
        also ``A Δx = (AW) G⁺ Wᵀ r`` from the stored products."""
        k = self.size if k is None else k
        self._shapes = [t.shape for t in r]
        y = (self._G_pinv(k) @ (self._W[:k] @ self._flat(r)).double()).to(self._W.dtype)
        dx = self._unflat(y @ self._W[:k])
        return (dx, self._unflat(y @ self._AW[:k])) if with_product else dx

    def deflate(self, r: Sequence[Tensor], k: int | None = None) -> Tensors:
        """``W G⁺ (AW)ᵀ r`` over the first k directions."""
        k = self.size if k is None else k
        self._shapes = [t.shape for t in r]
        y = self._G_pinv(k) @ (self._AW[:k] @ self._flat(r)).double()
        return self._unflat(y.to(self._W.dtype) @ self._W[:k])

    def initial_guess(self, b: Sequence[Tensor]) -> Tensors | None:
        """The Galerkin solution of ``A x = b`` on span(W), or ``None`` while the memory is empty."""
        if self.size == 0:
            return None
        return self.galerkin(b)


# --- the hypergradient ------------------------------------------------------------------------------

@dataclass
class HypergradResult:
    """``x ≈ A⁻¹ v`` and how it was obtained: ``n_products`` counts the products of this solve."""

    x: Tensors
    residual_norms: list[float]
    iterations: int
    seconds: float
    converged: bool
    n_products: int
    initial_residual_norm: float = float("nan")
    n_nonfinite: int = 0
    negative_curvature: bool = False


def hypergradient(v: Sequence[Tensor], operator: MatVec, *, mode: str = "global",
                  max_iter: int = OFFICIAL_CG_ITERS, rtol: float | None = None, atol: float | None = None,
                  x0: Sequence[Tensor] | None = None, memory: KrylovMemory | None = None,
                  nonfinite: str = "raise") -> HypergradResult:
    """Solve ``(I + H/(λ+δ)) x = v`` for ``v = ∇_θP L_D`` (spec §1.4 step 3).

    ``x0`` warm-starts global CG (e.g. the previous upper step's x; costs one product).  ``memory``
    (global only), a :class:`KrylovMemory` shared by the upper steps of a stage, makes the solve
    deflated CG on the directions recorded so far and records this solve's products into it.
    """
    v = tuple(t.detach() for t in v)
    names = getattr(operator, "names", None)
    on_product = None
    if memory is not None:
        if mode != "global":
            raise ValueError(f"memory (Krylov recycling) needs mode='global', got mode={mode!r}")
        on_product = memory.record(v)
    sync = v[0].device.type == "cuda"
    if sync:
        torch.cuda.synchronize(v[0].device)
    t0 = time.perf_counter()
    res = cg_solve(operator, v, max_iter=max_iter, mode=mode, rtol=rtol, atol=atol, x0=x0,
                   nonfinite=nonfinite, names=names, on_product=on_product,
                   deflation=memory if memory is not None and memory.size else None)
    if sync:
        torch.cuda.synchronize(v[0].device)
    seconds = time.perf_counter() - t0
    return HypergradResult(res.x, res.residual_norms, res.iterations, seconds, res.converged, res.n_matvec,
                           res.initial_residual_norm, res.n_nonfinite, res.negative_curvature)


#: The official scheme (spec §1.5): layerwise recursion, K = 5, no warm start, NaNs zeroed.  Pair it
#: with ``HessianOperator(mode="recompute", bn_stats="update")`` for the official side effects.
PAPER_SOLVER = dict(mode="layerwise", max_iter=OFFICIAL_CG_ITERS, rtol=None, atol=None,
                    warm_start="none", nonfinite="zero")

#: The recommended default (``benchmarks/stage.py``, ``benchmarks/hypergradient.py``): one MINRES
#: iteration, i.e. x = α v with the α that minimises ‖v − A α v‖ (never worse than x = 0, which at
#: the official δ = 10 the official five layerwise iterations are: their residual is about 8‖v‖).
#: Measured on the CPU default stage (README, "Speed"): the upper phase 4.4× faster than the official
#: scheme, error against a MINRES reference 0.98 vs the official 2.2.  More iterations buy little
#: here (2: 0.89, 5: 0.81) because A is indefinite and badly conditioned; raise ``max_iter`` where a
#: closer solve matters more than speed.  Pair it with ``HessianOperator(mode="reuse")``.
RECOMMENDED_SOLVER = dict(mode="minres", max_iter=1, rtol=1e-2, atol=None,
                          warm_start="none", nonfinite="raise")


class HypergradientSolver:
    """The N_U hypergradient solves of one stage against one fixed operator A.

    ``warm_start``: ``"none"`` (each solve from 0, as the official code), ``"previous"`` (from the last
    solution; one extra product) or ``"recycle"`` (deflated CG on a :class:`KrylovMemory` of the
    stage's products: Galerkin start and deflated search directions, no extra product).  Build one per stage; :meth:`release` frees the memory
    and releases the operator.  ``HypergradientSolver(op, **RECOMMENDED_SOLVER)`` is the default.
    """

    def __init__(self, operator: MatVec, *, mode: str = "global", max_iter: int = OFFICIAL_CG_ITERS,
                 rtol: float | None = None, atol: float | None = None, warm_start: str = "none",
                 nonfinite: str = "raise", memory_size: int = 32, exact_start: bool = True):
        if warm_start not in _WARM_STARTS:
            raise ValueError(f"warm_start must be one of {_WARM_STARTS}, got {warm_start!r}")
        if mode == "layerwise" and warm_start != "none":
            raise ValueError("layerwise has no warm start (official recursion starts at 0); use warm_start='none'")
        if mode == "minres" and warm_start == "recycle":
            raise ValueError("warm_start='recycle' (deflated CG) needs mode='global'; minres takes 'none' or 'previous'")
        self.operator = operator
        self.options = dict(mode=mode, max_iter=max_iter, rtol=rtol, atol=atol, nonfinite=nonfinite)
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
