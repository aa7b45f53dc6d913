"""Krylov recycling (bissl_kit.implicit.recycling) and deflated CG, float64 on CPU."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from bissl_kit.implicit import HessianOperator, HypergradientSolver, KrylovMemory, cg, layerwise, minres
from implicit_helpers import (DT, SHAPES, block_shapes, dense_hessian, dense_matvec, flat, random_spd, random_tuple,
                              rel_err, tiny_setup, unflat)


def test_krylov_memory_guess_is_galerkin():
    gen = torch.Generator().manual_seed(16)
    b = random_tuple(SHAPES, gen)
    n = flat(b).numel()
    A = random_spd(n, gen, cond=100)
    mem = KrylovMemory(max_size=n)
    mv = dense_matvec(A, b)
    assert mem.initial_guess(b) is None
    cg(mv, b, max_iter=8, on_product=mem.record(b))
    assert mem.size == 8
    Q = mem._W[:8]
    assert torch.allclose(Q.norm(dim=1), torch.ones(8, dtype=DT))
    assert torch.allclose(mem._AW[:8], Q @ A, atol=1e-10)  # stored A w consistent with w
    # exact when the solution lies in the recorded span
    x_true = torch.randn(8, generator=gen, dtype=DT) @ Q
    x0 = mem.initial_guess(unflat(A @ x_true, b))
    assert torch.allclose(flat(x0), x_true, rtol=1e-10, atol=1e-12)
    # otherwise Galerkin: the residual has no component along the span
    b2 = random_tuple(SHAPES, gen)
    x0 = mem.initial_guess(b2)
    assert torch.allclose(Q @ (flat(b2) - A @ flat(x0)), torch.zeros(8, dtype=DT), atol=1e-10)


def test_krylov_memory_stops_at_max_size_and_skips_known_directions():
    gen = torch.Generator().manual_seed(19)
    b = random_tuple(SHAPES, gen)
    A = random_spd(flat(b).numel(), gen)
    mem = KrylovMemory(max_size=3)
    add = mem.record(b)
    p = random_tuple(SHAPES, gen)
    add(p, unflat(A @ flat(p), b))
    add(tuple(2 * t for t in p), unflat(A @ (2 * flat(p)), b))  # same direction: skipped
    assert mem.size == 1
    for _ in range(5):
        p = random_tuple(SHAPES, gen)
        add(p, unflat(A @ flat(p), b))
    assert mem.size == 3


def test_deflated_cg_is_exact_faster_and_searches_A_orthogonally_to_memory():
    gen = torch.Generator().manual_seed(20)
    b1 = random_tuple(SHAPES, gen)
    n = flat(b1).numel()
    A = random_spd(n, gen, cond=1e3)
    mv = dense_matvec(A, b1)
    mem = KrylovMemory(max_size=12)
    cg(mv, b1, max_iter=12, on_product=mem.record(b1))
    k = mem.size
    b2 = random_tuple(SHAPES, gen)
    plain = cg(mv, b2, max_iter=10 * n, rtol=1e-11)
    seen = []
    defl = cg(mv, b2, max_iter=10 * n, rtol=1e-11, deflation=mem, on_product=lambda p, Ap: seen.append(flat(p)))
    exact = unflat(torch.linalg.solve(A, flat(b2)), b2)
    assert defl.converged and rel_err(defl.x, exact) < 1e-8
    assert defl.iterations < plain.iterations
    assert defl.n_matvec == defl.iterations + 1  # the start's residual costs one real product
    mem.exact_start = False
    free = cg(mv, b2, max_iter=10 * n, rtol=1e-11, deflation=mem)
    assert free.converged and free.n_matvec == free.iterations and rel_err(free.x, exact) < 1e-8
    mem.exact_start = True
    AW = mem._AW[:k]
    for p in seen[1:]:  # Wᵀ A p = (AW)ᵀ p = 0 for every deflated search direction
        assert float((AW @ p).abs().max()) < 1e-8 * float(p.norm()) * float(AW.norm())
    # deflation is CG's alone: the other solvers have no such argument
    with pytest.raises(TypeError, match="unexpected keyword argument 'deflation'"):
        layerwise(mv, b2, iters=3, deflation=mem)
    with pytest.raises(TypeError, match="unexpected keyword argument 'deflation'"):
        minres(mv, b2, max_iter=3, deflation=mem)


def test_recycling_saves_products_across_upper_steps_at_equal_accuracy():
    net, params, batch, loss_fn = tiny_setup(seed=17)
    Hd = dense_hessian(net, params, batch, loss_fn)
    A = torch.eye(Hd.shape[0], dtype=DT) + Hd / 0.3
    gen = torch.Generator().manual_seed(17)
    common = random_tuple([p.shape for p in params.values()], gen)
    rhs = [tuple(c + 0.3 * torch.randn(c.shape, generator=gen, dtype=DT) for c in common) for _ in range(8)]
    counts = {}
    for warm in ("none", "previous", "recycle"):
        op = HessianOperator(loss_fn, params, batch, lam=0.0, damping=0.3)
        solver = HypergradientSolver(op, max_iter=100, rtol=1e-10, warm_start=warm)
        for v in rhs:
            res = solver(v)
            assert res.converged
            assert rel_err(res.x, unflat(torch.linalg.solve(A, flat(v)), v)) < 1e-8
        counts[warm] = op.n_products
        solver.release()
        with pytest.raises(RuntimeError, match="released"):
            op(v)
    # "previous" pays one product per solve for r0 and gains little when the right-hand sides differ
    # this much; recycling pays nothing for its guess
    assert counts["recycle"] < 0.5 * min(counts["previous"], counts["none"]), counts


@settings(max_examples=20, deadline=None)
@given(shapes=block_shapes, seed=st.integers(0, 2**31 - 1), k=st.integers(1, 8))
def test_property_deflated_cg_solves_with_any_memory(shapes, seed, k):
    gen = torch.Generator().manual_seed(seed)
    b = random_tuple(shapes, gen)
    n = flat(b).numel()
    A = random_spd(n, gen, cond=100)
    mv = dense_matvec(A, b)
    mem = KrylovMemory(max_size=k)
    for _ in range(k):  # arbitrary recorded directions, not only Krylov ones
        p = random_tuple(shapes, gen)
        mem.add(p, mv(p))
    res = cg(mv, b, max_iter=20 * n, rtol=1e-12, deflation=mem)
    assert res.converged
    assert rel_err(res.x, unflat(torch.linalg.solve(A, flat(b)), b)) < 1e-8
