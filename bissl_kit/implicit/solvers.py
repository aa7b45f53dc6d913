r"""The three linear solvers of the hypergradient, ``A x = b`` for ``b`` a tuple of parameter-shaped tensors.

``A`` is any ``matvec`` taking and returning such tuples (in BiSSL, a
:class:`~bissl_kit.implicit.operators.DampedOperator`, A = I + H/(λ+δ)).  Each solver is a plain
function with its own arguments, and all three return a :class:`SolveResult`:

* :func:`layerwise`: the official per-tensor recursion (spec §1.5), bit for bit: a fixed number of
  iterations from x = 0, no tolerance.  It is *not* CG and does not converge in general.
* :func:`cg`: textbook conjugate gradient on the concatenated vector, with tolerance, warm start and
  deflation (Krylov recycling, :mod:`bissl_kit.implicit.recycling`).  Valid for positive definite A
  only; it flags ``negative_curvature`` when it meets pᵀAp ≤ 0.
* :func:`minres`: MINRES, for any symmetric A.  A = I + H/(λ+δ) need not be positive definite (H may
  be indefinite, spec C3), and at the official δ = 10 it is not on the CPU backbone (README,
  "Benchmarks"); there CG has no valid step while MINRES still minimises ‖b − A x‖.

Non-finite values: ``nonfinite="raise"`` raises :class:`NonFiniteError` naming the iteration and
the tensor (``names`` gives the tensors' names for the message).  ``nonfinite="zero"`` is the
official behaviour: the recursion runs unchecked and the solution goes through ``torch.nan_to_num``
(NaN → 0, ±Inf → ±largest finite) with a ``RuntimeWarning``; ``n_nonfinite`` counts the entries.

``on_product(p, Ap)`` is called after every product (this is how a
:class:`~bissl_kit.implicit.recycling.KrylovMemory` records them).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .recycling import KrylovMemory

__all__ = ["OFFICIAL_CG_EPS", "NonFiniteError", "SolveResult", "layerwise", "cg", "minres"]

#: Added to both denominators of the layerwise recursion (α and β), as in the official code.
OFFICIAL_CG_EPS = 1e-12

Tensors = tuple[Tensor, ...]
MatVec = Callable[[Tensors], Sequence[Tensor]]
OnProduct = Callable[[Tensors, Tensors], None]

_NONFINITE = ("raise", "zero")


class NonFiniteError(FloatingPointError):
    """A NaN or Inf appeared in the solve; the message names the iteration and the tensor."""


@dataclass
class SolveResult:
    """Outcome of :func:`layerwise`, :func:`cg` or :func:`minres`.

    ``residual_norms[k]`` is ‖r_{k+1}‖ after iteration k+1 (one entry per iteration), where r is the
    residual the recursion carries.  For CG and MINRES that is b − A x up to rounding; for layerwise
    it is *not* b − A x (per-tensor step sizes break the identity), which is why the official
    recursion can look converged while x is not.  ``initial_residual_norm`` is ‖r_0‖.
    ``n_matvec`` counts the products of this solve (a warm start's r_0 = b − A x_0 included).
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


# --- argument checks -------------------------------------------------------------------------------

def _check_choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_tolerances(rtol: float | None, atol: float | None) -> None:
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol is not None and not (tol >= 0 and math.isfinite(tol)):
            raise ValueError(f"{name} must be a finite number >= 0 or None, got {tol!r}")


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


def _validate_system(b, names, x0=None, r0=None) -> tuple[Tensors, Tensors | None, Tensors | None]:
    b = _validate_tensors("b", b)
    if names is not None and len(names) != len(b):
        raise ValueError(f"names has {len(names)} entries, expected {len(b)}")
    if x0 is not None:
        x0 = _validate_tensors("x0", x0, b)
    if r0 is not None:
        if x0 is None:
            raise ValueError("r0 (the residual b - A x0) requires x0")
        r0 = _validate_tensors("r0", r0, b)
    return b, x0, r0


# --- shared pieces of the recursions ---------------------------------------------------------------

def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return torch.stack([torch.sum(ai * bi) for ai, bi in zip(a, b)]).sum()


def _sub(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    return list(torch._foreach_sub(list(a), list(b)))


def _describe(i: int, t: Tensor, names: Sequence[str] | None) -> str:
    label = f"tensor {i}" + (f" ('{names[i]}')" if names is not None else "")
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    return f"{label} of shape {tuple(t.shape)}: {n_nan} NaN, {n_inf} Inf"


def _raise_nonfinite(solver: str, iteration: int, groups: Sequence[tuple[str, Sequence[Tensor]]],
                     names: Sequence[str] | None) -> None:
    """Raise for the first non-finite tensor among the labelled ``groups`` (checked in order)."""
    for where, group in groups:
        for i, t in enumerate(group):
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(
                    f"non-finite value in {where} at {solver} iteration {iteration}: {_describe(i, t, names)}")
    where = ", ".join(w for w, _ in groups)
    raise NonFiniteError(f"non-finite step size at {solver} iteration {iteration} (0/0 or overflow; {where} "
                         "are finite)")


def _check_rhs(solver: str, b: Tensors, names) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in b):
        _raise_nonfinite(solver, 0, [("the right-hand side b", b)], names)


def _check_matvec_output(out: Sequence[Tensor], b: Sequence[Tensor]) -> Tensors:
    out = tuple(out)
    if len(out) != len(b):
        raise ValueError(f"matvec returned {len(out)} tensors, expected {len(b)} (one per tensor of b)")
    for i, (o, bi) in enumerate(zip(out, b)):
        if o.shape != bi.shape:
            raise ValueError(f"matvec output tensor {i} has shape {tuple(o.shape)}, expected {tuple(bi.shape)}")
    return out


class _CountedProducts:
    """``matvec`` with its output checked against b's shapes, counted, and reported to ``on_product``."""

    def __init__(self, matvec: MatVec, b: Sequence[Tensor], on_product: OnProduct | None):
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


def _start(b: Tensors, x0: Tensors | None, r0: Tensors | None, apply: _CountedProducts):
    """x_0 and r_0 = b − A x_0: zero and b without ``x0``; one product unless ``r0`` is given."""
    x = [torch.zeros_like(t) for t in b] if x0 is None else [t.clone() for t in x0]
    if x0 is None:
        r = [t.clone() for t in b]
    else:
        r = [t.clone() for t in r0] if r0 is not None else _sub(b, apply(tuple(x)))
    return x, r


def _finalize(x: list[Tensor], nonfinite: str, solver: str) -> tuple[Tensors, int]:
    """The official ``nan_to_num`` of the solution under ``nonfinite="zero"``, with the count."""
    if nonfinite != "zero":
        return tuple(x), 0
    n_bad = sum(int((~torch.isfinite(t)).sum()) for t in x)
    if n_bad:
        warnings.warn(f"{solver}: {n_bad} non-finite entries in the solution replaced by torch.nan_to_num "
                      "(official behaviour: NaN -> 0, ±Inf -> ±largest finite)", RuntimeWarning, stacklevel=3)
        x = [torch.nan_to_num(t) for t in x]
    return tuple(x), n_bad


# --- the solvers -----------------------------------------------------------------------------------

def layerwise(matvec: MatVec, b: Sequence[Tensor], *, iters: int, nonfinite: str = "raise",
              names: Sequence[str] | None = None, on_product: OnProduct | None = None) -> SolveResult:
    r"""The official recursion (spec §1.5), bit for bit: x_0 = 0, r_0 = d_0 = b, then for exactly
    ``iters`` iterations, with ``Ad = A(d)`` the full coupled operator and, per tensor i,

    .. math::
        \alpha_i = \frac{\|r_i\|^2}{d_i\cdot(Ad)_i + \varepsilon},\ x_i \mathrel{+}= \alpha_i d_i,\
        r_i' = r_i - \alpha_i (Ad)_i,\ \beta_i = \frac{\|r_i'\|^2}{\|r_i\|^2 + \varepsilon},\
        d_i = r_i' + \beta_i d_i,

    with ε = :data:`OFFICIAL_CG_EPS`.  One step size per tensor, so this is not CG and does not
    converge in general: ``converged`` is always ``False``.  The official code has no tolerance and
    no start other than 0, so neither is an argument here.
    """
    _check_choice("nonfinite", nonfinite, _NONFINITE)
    _check_count("iters", iters, 1)
    b, _, _ = _validate_system(b, names)
    check = nonfinite == "raise"
    if check:
        _check_rhs("layerwise", b, names)
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    d = [t.clone() for t in b]
    initial = float(torch.sqrt(_dot(r, r)))
    residual_norms = []
    for it in range(1, iters + 1):
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
            _raise_nonfinite("layerwise", it, [("A(d)", Ad), ("x", x), ("d", d)], names)
        residual_norms.append(float(torch.sqrt(rr_total)))
    x, n_bad = _finalize(x, nonfinite, "layerwise")
    return SolveResult(x, residual_norms, False, iters, iters, initial, n_bad)


def cg(matvec: MatVec, b: Sequence[Tensor], *, max_iter: int, rtol: float | None = None,
       atol: float | None = None, x0: Sequence[Tensor] | None = None, r0: Sequence[Tensor] | None = None,
       nonfinite: str = "raise", names: Sequence[str] | None = None, on_product: OnProduct | None = None,
       deflation: KrylovMemory | None = None) -> SolveResult:
    r"""Conjugate gradient on the concatenated vector,

    .. math::
        r_0 = b - A x_0,\ p_0 = r_0;\quad
        \alpha_k = \frac{r_k^\top r_k}{p_k^\top A p_k},\ x_{k+1} = x_k + \alpha_k p_k,\
        r_{k+1} = r_k - \alpha_k A p_k,\ p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}{r_k^\top r_k} p_k,

    stopping once ‖r_k‖ ≤ max(rtol·‖b‖, atol) (never early when both are ``None``) or after
    ``max_iter`` iterations.  ``x0`` warm-starts it (one extra product for r_0 unless ``r0``, the
    residual ``b − A x0``, is given too).  If some pᵀAp ≤ 0 (A is not positive definite along p), CG
    goes on but ``negative_curvature`` is set.

    ``deflation``: a :class:`~bissl_kit.implicit.recycling.KrylovMemory` holding W and AW from earlier
    solves with the same A.  The solve is then deflated CG (Saad, Yeung, Erhel & Guyomarc'h, SISC
    2000): the start gets the Galerkin correction x₀ ← x₀ + W G⁻¹ Wᵀ r₀ (G = WᵀAW) and every search
    direction is made A-orthogonal to W, z = r − W G⁻¹ (AW)ᵀ r, so CG only works on the part of the
    spectrum that W has not captured yet.  Because the stored AW carries the rounding of the
    products, the start's residual comes from one real product (unless the memory's
    ``exact_start`` is off), the step is α = pᵀr/pᵀAp and each direction is A-orthogonalised
    explicitly against the previous one (p = z − (zᵀAp/pᵀAp) p); in exact arithmetic these equal the
    textbook forms.  The memory is read as it was when the solve started; new products go to
    ``on_product``.
    """
    _check_choice("nonfinite", nonfinite, _NONFINITE)
    _check_count("max_iter", max_iter, 0)
    _check_tolerances(rtol, atol)
    b, x0, r0 = _validate_system(b, names, x0, r0)
    check = nonfinite == "raise"
    if check:
        _check_rhs("cg", b, names)
    apply = _CountedProducts(matvec, b, on_product)

    k_defl = deflation.size if deflation is not None else 0
    if k_defl:
        x = [torch.zeros_like(t) for t in b] if x0 is None else [t.clone() for t in x0]
        r_start = b if x0 is None else (r0 if r0 is not None else _sub(b, apply(tuple(x))))
        dx, dAx = deflation.galerkin(r_start, k_defl, with_product=True)
        torch._foreach_add_(x, dx)
        # exact_start: r from one real product, consistent with b - A x whatever the rounding in
        # the stored AW; otherwise r = r_start - AW y for free (consistent to that rounding)
        r = _sub(b, apply(tuple(x))) if deflation.exact_start else _sub(r_start, dAx)
    else:
        x, r = _start(b, x0, r0, apply)
    rs = _dot(r, r)
    if check and not bool(torch.isfinite(rs)):
        _raise_nonfinite("cg", 0, [("the initial residual b - A x0", r), ("x0", x)], names)
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
            _raise_nonfinite("cg", it, [("A(p)", Ap), ("p", p)], names)
        if pAp <= 0:
            negative_curvature = True
        # deflated directions are only approximately A-orthogonal to W (AW is stored in the working
        # precision), so the deflated path uses the forms that stay exact line searches for any p:
        # α = pᵀr/pᵀAp and an explicit A-orthogonalisation against the previous direction
        alpha = (_dot(p, r) if k_defl else rs) / pAp
        if check and not bool(torch.isfinite(alpha)):
            _raise_nonfinite("cg", it, [("A(p)", Ap), ("p", p)], names)
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
    x, n_bad = _finalize(x, nonfinite, "cg")
    return SolveResult(x, residual_norms, converged, it, apply.count, initial, n_bad, negative_curvature)


def minres(matvec: MatVec, b: Sequence[Tensor], *, max_iter: int, rtol: float | None = None,
           atol: float | None = None, x0: Sequence[Tensor] | None = None, r0: Sequence[Tensor] | None = None,
           nonfinite: str = "raise", names: Sequence[str] | None = None,
           on_product: OnProduct | None = None) -> SolveResult:
    """MINRES (Paige & Saunders 1975) in the Lanczos form of Choi, Paige & Saunders (SISC 2011).

    Valid for any symmetric A, definite or not: x_k minimises ‖b − A x‖ over x_0 + K_k(A, r_0), so
    the residual never grows; one product per iteration, as CG.  Tolerance and warm start as
    :func:`cg`.  The Lanczos vectors are kept three at a time; the residual norm φ_k comes out of
    the Givens rotations for free.
    """
    _check_choice("nonfinite", nonfinite, _NONFINITE)
    _check_count("max_iter", max_iter, 0)
    _check_tolerances(rtol, atol)
    b, x0, r0 = _validate_system(b, names, x0, r0)
    check = nonfinite == "raise"
    if check:
        _check_rhs("minres", b, names)
    apply = _CountedProducts(matvec, b, on_product)

    x, r = _start(b, x0, r0, apply)
    beta = float(torch.sqrt(_dot(r, r)))
    if check and not math.isfinite(beta):
        _raise_nonfinite("minres", 0, [("the initial residual b - A x0", r), ("x0", x)], names)
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
                _raise_nonfinite("minres", it, [("A(v)", p), ("v", v)], names)
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
                _raise_nonfinite("minres", it, [("x", x), ("A(v)", p)], names)
            if phi == 0.0 or beta_next == 0.0 or (tol is not None and phi <= tol):
                converged = True
                break
            d_prev2, d_prev = d_prev, d
            v_prev, v = v, [t / beta_next for t in p]
            beta, eps = beta_next, eps_next
    x, n_bad = _finalize(x, nonfinite, "minres")
    return SolveResult(x, residual_norms, converged, it, apply.count, initial, n_bad, negative_curvature)
