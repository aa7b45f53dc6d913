r"""Krylov subspace recycling across the upper steps of a stage.

A = I + H/(λ+δ) is fixed within a stage (θ_P, φ_P and the Hessian batch do not change during the
upper phase, spec §1.6), so the products that CG computed for one upper step serve all later ones.
:class:`KrylovMemory` keeps them; :func:`bissl_kit.implicit.solvers.cg` with ``deflation=memory``
starts from the Galerkin solution on their span and searches only A-orthogonally to it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["KrylovMemory"]

Tensors = tuple[Tensor, ...]


class KrylovMemory:
    r"""The directions W (k × n) that A has been applied to during a stage, with AW, for recycling.

    Every product ``(p, A p)`` handed to :meth:`add` is stored as is (normalised), if p has at least a
    fraction ``DROP_TOL`` of its norm outside span(W); the k × k matrices G = Wᵀ A W (symmetrised) and
    M = Wᵀ W are kept up to date in float64.  Storing the raw pairs matters: orthonormalising them
    (Gram–Schmidt on p and the same combination on A p) divides by the remaining norm at every
    step, so the rounding of earlier products compounds geometrically, and float32 CG directions
    are nearly dependent: the stored A q of late directions no longer matches q.  Raw pairs carry
    only their own product's rounding.

    What a deflated solve reads:

    * :meth:`galerkin` gives the Galerkin correction of a residual r on span(W), Δx = W G⁺ Wᵀ r
      (the new residual then has no component along W);
    * :meth:`deflate` gives W G⁺ (AW)ᵀ r, the part of r that deflated CG removes from each search
      direction (see :func:`bissl_kit.implicit.solvers.cg`).

    G⁺ is the pseudo-inverse with eigenvalues below √ε·max|eig| (ε of the vectors' dtype) dropped
    as rounding noise.  Memory: 2·``max_size``·n numbers (n = number of backbone parameters); when
    full, further directions are ignored.

    ``exact_start``: a deflated solve computes its starting residual b − A x₀ with one real product
    (True: exact whatever the rounding of AW), or as b − (AW) y from the stored products (False:
    free, exact up to that rounding; then a step whose Galerkin start already meets the tolerance
    costs no product at all).
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
