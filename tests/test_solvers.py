"""The three solvers of bissl_kit.implicit.solvers on small dense systems, float64 on CPU."""
import math
from functools import partial

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bissl_kit.implicit import OFFICIAL_CG_EPS, HessianOperator, KrylovMemory, NonFiniteError, cg, layerwise, minres
from implicit_helpers import (DT, SHAPES, block_shapes, dense_hessian, dense_matvec, flat, random_spd, random_tuple,
                              reference_layerwise, rel_err, tiny_setup, unflat)


# --- CG -----------------------------------------------------------------------------------------------

def test_cg_matches_linalg_solve_on_spd():
    gen = torch.Generator().manual_seed(1)
    b = random_tuple(SHAPES, gen)
    n = flat(b).numel()
    A = random_spd(n, gen, cond=1e3)
    res = cg(dense_matvec(A, b), b, max_iter=10 * n, rtol=1e-13)
    exact = torch.linalg.solve(A, flat(b))
    assert res.converged
    assert rel_err(res.x, unflat(exact, b)) < 1e-8
    assert len(res.residual_norms) == res.iterations == res.n_matvec
    true_res = torch.linalg.vector_norm(flat(b) - A @ flat(res.x))
    assert true_res <= 1e-12 * torch.linalg.vector_norm(flat(b)) * 10


def test_cg_without_tolerance_runs_exactly_max_iter():
    gen = torch.Generator().manual_seed(2)
    b = random_tuple(SHAPES, gen)
    A = random_spd(flat(b).numel(), gen)
    res = cg(dense_matvec(A, b), b, max_iter=4)
    assert res.iterations == 4 and res.n_matvec == 4 and not res.converged


def test_warm_start_reduces_iterations():
    gen = torch.Generator().manual_seed(4)
    b1 = random_tuple(SHAPES, gen)
    n = flat(b1).numel()
    A = random_spd(n, gen, cond=1e3)
    b2 = tuple(t + 1e-3 * torch.randn(t.shape, generator=gen, dtype=DT) for t in b1)
    mv = dense_matvec(A, b1)
    first = cg(mv, b1, max_iter=10 * n, rtol=1e-10)
    cold = cg(mv, b2, max_iter=10 * n, rtol=1e-10)
    warm = cg(mv, b2, max_iter=10 * n, rtol=1e-10, x0=first.x)
    assert warm.converged and cold.converged
    assert warm.iterations < cold.iterations
    assert warm.n_matvec == warm.iterations + 1  # one product for r0 = b - A x0
    exact = unflat(torch.linalg.solve(A, flat(b2)), b2)
    assert rel_err(warm.x, exact) < 1e-8


def test_warm_start_at_solution_takes_no_iteration():
    gen = torch.Generator().manual_seed(5)
    b = random_tuple(SHAPES, gen)
    A = random_spd(flat(b).numel(), gen)
    x = unflat(torch.linalg.solve(A, flat(b)), b)
    res = cg(dense_matvec(A, b), b, max_iter=5, rtol=1e-8, x0=x)
    assert res.converged and res.iterations == 0 and res.residual_norms == []


# --- layerwise (official) ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layerwise_is_bit_for_bit_the_official_recursion(dtype):
    assert OFFICIAL_CG_EPS == 1e-12
    net, params, batch, loss_fn = tiny_setup(seed=6)
    op = HessianOperator(loss_fn, params, batch)
    gen = torch.Generator().manual_seed(6)
    v = random_tuple([p.shape for p in params.values()], gen)
    mv = op
    if dtype == torch.float32:
        A = random_spd(flat(v).numel(), gen).float()
        v = tuple(t.float() for t in v)
        mv = dense_matvec(A, v)
    for K in (1, 5, 12):
        ours = layerwise(mv, v, iters=K, nonfinite="zero")
        ref = reference_layerwise(mv, v, K)
        assert ours.iterations == K and ours.n_matvec == K and not ours.converged
        assert all(torch.equal(a, b) for a, b in zip(ours.x, ref))


def coupled_two_block_system():
    """A small SPD system (eigenvalues 0.27 ... 3.3) whose two blocks are strongly coupled."""
    A = torch.tensor([[2.0, 0.5, 0.9, 0.0],
                      [0.5, 1.0, 0.0, 0.6],
                      [0.9, 0.0, 1.0, 0.3],
                      [0.0, 0.6, 0.3, 3.0]], dtype=DT)
    v = (torch.tensor([1.0, -2.0], dtype=DT), torch.tensor([0.5, 3.0], dtype=DT))
    return A, v


def test_layerwise_does_not_converge_where_true_cg_does():
    # spec §1.5/C2: per-tensor step sizes break CG.  Here the error stays above 100 % and then grows
    # (1.2 after 1 iteration, 2.0 after 5, 92 after 400), while true CG solves the same 4x4 system
    # to rounding in 4 iterations.
    A, v = coupled_two_block_system()
    assert torch.linalg.eigvalsh(A).min() > 0
    exact = unflat(torch.linalg.solve(A, flat(v)), v)
    mv = dense_matvec(A, v)
    errors = [rel_err(layerwise(mv, v, iters=k).x, exact) for k in (5, 60, 400)]
    assert min(errors) > 1e-2, errors
    true_cg = cg(mv, v, max_iter=4)
    assert rel_err(true_cg.x, exact) < 1e-10


def test_layerwise_on_tiny_network_stalls_above_cg_error():
    # the spec's observation on its toy (δ = 10: stalls; λ+δ small: error grows), on our tiny network
    net, params, batch, loss_fn = tiny_setup()
    Hd = dense_hessian(net, params, batch, loss_fn)
    v = random_tuple([p.shape for p in params.values()], torch.Generator().manual_seed(7))
    op = HessianOperator(loss_fn, params, batch, lam=0.0, damping=0.2)
    A = torch.eye(Hd.shape[0], dtype=DT) + Hd / 0.2
    exact = unflat(torch.linalg.solve(A, flat(v)), v)
    lw = [rel_err(layerwise(op, v, iters=k).x, exact) for k in (5, 60)]
    cg_err = rel_err(cg(op, v, max_iter=60).x, exact)
    assert cg_err < 1e-8
    assert min(lw) > 1e3 * cg_err, (lw, cg_err)


def test_layerwise_on_block_diagonal_system_is_blockwise_cg():
    # without coupling, per-tensor steps are exact CG per block: it converges (why it looks plausible)
    gen = torch.Generator().manual_seed(8)
    v = random_tuple([(3,), (4,)], gen)
    A = torch.block_diag(random_spd(3, gen, 10), random_spd(4, gen, 10))
    exact = unflat(torch.linalg.solve(A, flat(v)), v)
    assert rel_err(layerwise(dense_matvec(A, v), v, iters=4).x, exact) < 1e-8


# --- non-finite values and input validation ---------------------------------------------------------

def poisoned(A, like, at_call, tensor):
    calls = {"n": 0}

    def mv(d):
        calls["n"] += 1
        out = list(unflat(A @ flat(d), like))
        if calls["n"] == at_call:
            out[tensor] = out[tensor].clone()
            out[tensor].view(-1)[0] = float("nan")
        return tuple(out)

    return mv


# each solver with five iterations (layerwise: exactly five; cg and minres: at most five)
FIVE = {"cg": partial(cg, max_iter=5), "minres": partial(minres, max_iter=5), "layerwise": partial(layerwise, iters=5)}


@pytest.mark.parametrize("solver", ["cg", "minres", "layerwise"])
def test_nonfinite_raises_with_iteration_and_tensor(solver):
    gen = torch.Generator().manual_seed(9)
    b = random_tuple(SHAPES, gen)
    A = random_spd(flat(b).numel(), gen)
    with pytest.raises(NonFiniteError, match=rf"{solver} iteration 3.*tensor 1 \('blockB'\).*1 NaN"):
        FIVE[solver](poisoned(A, b, 3, 1), b, names=["blockA", "blockB", "blockC"])


@pytest.mark.parametrize("solver", ["cg", "minres", "layerwise"])
def test_nonfinite_zero_mode_is_official_nan_to_num(solver):
    gen = torch.Generator().manual_seed(10)
    b = random_tuple(SHAPES, gen)
    A = random_spd(flat(b).numel(), gen)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        res = FIVE[solver](poisoned(A, b, 2, 0), b, nonfinite="zero")
    assert res.n_nonfinite > 0
    assert all(bool(torch.isfinite(t).all()) for t in res.x)
    if solver == "layerwise":
        ref = reference_layerwise(poisoned(A, b, 2, 0), b, 5)
        assert all(torch.equal(a, r) for a, r in zip(res.x, ref))


@pytest.mark.parametrize("solver", ["cg", "minres", "layerwise"])
def test_nonfinite_rhs_is_reported(solver):
    b = (torch.ones(2, dtype=DT), torch.tensor([1.0, float("inf")], dtype=DT))
    with pytest.raises(NonFiniteError, match="right-hand side.*tensor 1.*1 Inf"):
        FIVE[solver](lambda d: d, b)


@pytest.mark.parametrize("solve, kwargs, match", [
    (layerwise, dict(iters=0), "iters must be an int >= 1"),
    (layerwise, dict(iters=2.5), "iters must be an int"),
    (layerwise, dict(iters=3, nonfinite="ignore"), "nonfinite must be one of"),
    (layerwise, dict(iters=3, names=["a", "b"]), "names has 2 entries, expected 1"),
    (cg, dict(max_iter=-1), "max_iter must be an int >= 0"),
    (cg, dict(max_iter=2.5), "max_iter must be an int"),
    (cg, dict(max_iter=3, rtol=-1e-3), "rtol must be a finite number >= 0"),
    (cg, dict(max_iter=3, atol=float("nan")), "atol must be a finite number >= 0"),
    (cg, dict(max_iter=3, nonfinite="ignore"), "nonfinite must be one of"),
    (cg, dict(max_iter=3, x0=(torch.zeros(3, dtype=DT),)), r"x0\[0\] has shape \(3,\), expected \(2,\)"),
    (cg, dict(max_iter=3, r0=(torch.zeros(2, dtype=DT),)), "r0 .* requires x0"),
    (minres, dict(max_iter=True), "max_iter must be an int >= 0"),
    (minres, dict(max_iter=3, rtol=float("inf")), "rtol must be a finite number >= 0"),
    (minres, dict(max_iter=3, nonfinite="ignore"), "nonfinite must be one of"),
    (minres, dict(max_iter=3, x0=(torch.zeros(3, dtype=DT),)), r"x0\[0\] has shape \(3,\), expected \(2,\)"),
])
def test_solvers_reject_bad_input(solve, kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve(lambda d: d, (torch.ones(2, dtype=DT),), **kwargs)


@pytest.mark.parametrize("kwargs", [dict(rtol=1e-3), dict(atol=1e-3), dict(x0=(torch.zeros(2, dtype=DT),)),
                                    dict(deflation=KrylovMemory(2)), dict(max_iter=3)])
def test_layerwise_takes_no_tolerance_start_deflation_or_cap(kwargs):
    # the official recursion runs exactly `iters` iterations from x = 0; there is nothing to tune
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        layerwise(lambda d: d, (torch.ones(2, dtype=DT),), iters=3, **kwargs)


@pytest.mark.parametrize("solve", [cg, minres, layerwise])
def test_solvers_reject_matvec_with_wrong_shape(solve):
    count = dict(iters=2) if solve is layerwise else dict(max_iter=2)
    with pytest.raises(ValueError, match=r"matvec output tensor 0 has shape \(3,\), expected \(2,\)"):
        solve(lambda d: (torch.ones(3, dtype=DT),), (torch.ones(2, dtype=DT),), **count)


# --- property tests ---------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(shapes=block_shapes, seed=st.integers(0, 2**31 - 1), log_cond=st.floats(0.0, 3.0))
def test_property_cg_solves_random_spd_block_systems(shapes, seed, log_cond):
    gen = torch.Generator().manual_seed(seed)
    b = random_tuple(shapes, gen)
    n = flat(b).numel()
    A = random_spd(n, gen, cond=10 ** log_cond)
    res = cg(dense_matvec(A, b), b, max_iter=20 * n, rtol=1e-13)
    exact = torch.linalg.solve(A, flat(b))
    assert res.converged
    assert all(x.shape == t.shape for x, t in zip(res.x, b))
    assert rel_err(res.x, unflat(exact, b)) < 1e-8
    assert res.n_matvec == res.iterations == len(res.residual_norms)
    true_res = float(torch.linalg.vector_norm(flat(b) - A @ flat(res.x)))
    assert true_res <= 1e-11 * float(torch.linalg.vector_norm(flat(b))) * 10 ** log_cond


@settings(max_examples=25, deadline=None)
@given(shapes=block_shapes, seed=st.integers(0, 2**31 - 1), k=st.integers(1, 6))
def test_property_cg_error_decreases_in_A_norm_and_layerwise_matches_reference(shapes, seed, k):
    gen = torch.Generator().manual_seed(seed)
    b = random_tuple(shapes, gen)
    n = flat(b).numel()
    A = random_spd(n, gen, cond=30)
    mv = dense_matvec(A, b)
    exact = torch.linalg.solve(A, flat(b))

    def a_err(x):
        e = flat(x) - exact
        return float(e @ A @ e)

    # CG minimises the A-norm of the error over growing Krylov spaces: monotone in k
    assert a_err(cg(mv, b, max_iter=k + 1).x) <= a_err(cg(mv, b, max_iter=k).x) * (1 + 1e-9) + 1e-20
    ours = layerwise(mv, b, iters=k)
    assert all(torch.equal(a, r) for a, r in zip(ours.x, reference_layerwise(mv, b, k)))


# --- MINRES: the Krylov solver that stays valid when A = I + H/(λ+δ) is indefinite -------------------

def random_symmetric_indefinite(n, gen, n_negative=3):
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    eig = torch.logspace(-1, 2, n, dtype=DT)
    eig[:n_negative] *= -1  # a few negative eigenvalues, as I + H/(λ+δ) has on the CPU backbone
    return Q @ torch.diag(eig) @ Q.T


@pytest.mark.parametrize("indefinite", [False, True])
def test_minres_matches_linalg_solve(indefinite):
    gen = torch.Generator().manual_seed(11)
    b = random_tuple(SHAPES, gen)
    n = flat(b).numel()
    A = random_symmetric_indefinite(n, gen) if indefinite else random_spd(n, gen, cond=1e3)
    res = minres(dense_matvec(A, b), b, max_iter=10 * n, rtol=1e-12)
    exact = torch.linalg.solve(A, flat(b))
    assert res.converged and res.n_matvec == res.iterations
    assert rel_err(res.x, unflat(exact, b)) < 1e-8
    if not indefinite:
        assert not res.negative_curvature  # vᵀAv > 0 for every Lanczos vector of an SPD A
    # φ_k, the residual MINRES carries, is the true residual of its iterate
    true_res = float(torch.linalg.vector_norm(flat(b) - A @ flat(res.x)))
    assert math.isclose(true_res, res.residual_norms[-1], rel_tol=1e-4, abs_tol=1e-13)


def test_minres_residual_never_grows_where_cg_breaks_down():
    gen = torch.Generator().manual_seed(12)
    b = random_tuple(SHAPES, gen)
    n = flat(b).numel()
    A = random_symmetric_indefinite(n, gen, n_negative=5)
    mv = dense_matvec(A, b)
    mr = minres(mv, b, max_iter=30)
    cg_res = cg(mv, b, max_iter=30)
    norms = [float(torch.linalg.vector_norm(flat(b)))] + mr.residual_norms
    assert all(b_ <= a * (1 + 1e-12) for a, b_ in zip(norms, norms[1:]))
    assert cg_res.negative_curvature
    assert max(cg_res.residual_norms) > norms[0]  # CG's residual grows on this indefinite system
    # MINRES's iterate minimises the residual over the Krylov space, so it beats CG's at equal products
    true_mr = torch.linalg.vector_norm(flat(b) - A @ flat(mr.x))
    true_cg = torch.linalg.vector_norm(flat(b) - A @ flat(cg_res.x))
    assert true_mr <= true_cg


def test_minres_warm_start_and_tolerance():
    gen = torch.Generator().manual_seed(13)
    b = random_tuple(SHAPES, gen)
    n = flat(b).numel()
    A = random_symmetric_indefinite(n, gen)
    mv = dense_matvec(A, b)
    exact = unflat(torch.linalg.solve(A, flat(b)), b)
    cold = minres(mv, b, max_iter=10 * n, rtol=1e-6)
    near = tuple(e + 1e-4 * torch.randn(e.shape, generator=gen, dtype=DT) for e in exact)
    warm = minres(mv, b, max_iter=10 * n, rtol=1e-6, x0=near)
    assert cold.converged and warm.converged
    assert warm.iterations < cold.iterations and warm.n_matvec == warm.iterations + 1
    assert cold.residual_norms[-1] <= 1e-6 * float(torch.linalg.vector_norm(flat(b)))
