"""Tests of the implicit-gradient engine (bissl_kit.implicit), float64 on CPU."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.func import functional_call

from bissl_kit.implicit import (
    OFFICIAL_CG_EPS, OFFICIAL_DAMPING, OFFICIAL_LAMBDA, PAPER_SOLVER, RECOMMENDED_SOLVER,
    HessianOperator, HypergradientSolver, KrylovMemory, NonFiniteError, cg_solve, hypergradient,
)

DT = torch.float64


# --- helpers ----------------------------------------------------------------------------------------

def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def unflat(v, like):
    out, i = [], 0
    for t in like:
        out.append(v[i:i + t.numel()].view_as(t))
        i += t.numel()
    return tuple(out)


def dense_matvec(A, like):
    """A dense matrix acting on tuples shaped like ``like``."""
    return lambda d: unflat(A @ flat(d), like)


def random_spd(n, gen, cond=50.0):
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    eig = torch.logspace(0, math.log10(cond), n, dtype=DT)
    return Q @ torch.diag(eig) @ Q.T


def random_tuple(shapes, gen):
    return tuple(torch.randn(s, generator=gen, dtype=DT) for s in shapes)


def rel_err(x, y):
    return float(torch.linalg.vector_norm(flat(x) - flat(y)) / torch.linalg.vector_norm(flat(y)))


class TinyNet(nn.Module):
    """A 'backbone' (Linear-Tanh-Linear) and a head outside the Hessian's parameter subset."""

    def __init__(self, bn=False):
        super().__init__()
        layers = [nn.Linear(3, 4)] + ([nn.BatchNorm1d(4)] if bn else []) + [nn.Tanh(), nn.Linear(4, 3)]
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.backbone(x)))


def tiny_setup(seed=0, bn=False):
    torch.manual_seed(seed)
    net = TinyNet(bn).to(DT)
    x = torch.randn(8, 3, dtype=DT)
    y = torch.randint(0, 2, (8,))
    params = dict(net.backbone.named_parameters())

    def loss_fn(batch):
        xb, yb = batch
        return nn.functional.cross_entropy(net(xb), yb)

    return net, params, (x, y), loss_fn


def dense_hessian(net, params, batch, loss_fn):
    names = list(params)
    like = tuple(params.values())

    def f(v):
        p = dict(zip(names, unflat(v, like)))
        xb, yb = batch
        feats = torch.tanh(functional_call(net.backbone, p, (xb,)))
        return nn.functional.cross_entropy(net.head(feats), yb)

    return torch.autograd.functional.hessian(f, flat(like).detach())


# --- global CG --------------------------------------------------------------------------------------

SHAPES = [(3, 4), (5,), (2, 2, 2)]


def test_global_cg_matches_linalg_solve_on_spd():
    gen = torch.Generator().manual_seed(1)
    b = random_tuple(SHAPES, gen)
    n = flat(b).numel()
    A = random_spd(n, gen, cond=1e3)
    res = cg_solve(dense_matvec(A, b), b, max_iter=10 * n, rtol=1e-13)
    exact = torch.linalg.solve(A, flat(b))
    assert res.converged
    assert rel_err(res.x, unflat(exact, b)) < 1e-8
    assert len(res.residual_norms) == res.iterations == res.n_matvec
    true_res = torch.linalg.vector_norm(flat(b) - A @ flat(res.x))
    assert true_res <= 1e-12 * torch.linalg.vector_norm(flat(b)) * 10


def test_global_cg_without_tolerance_runs_exactly_max_iter():
    gen = torch.Generator().manual_seed(2)
    b = random_tuple(SHAPES, gen)
    A = random_spd(flat(b).numel(), gen)
    res = cg_solve(dense_matvec(A, b), b, max_iter=4)
    assert res.iterations == 4 and res.n_matvec == 4 and not res.converged


def test_global_cg_on_tiny_network_system():
    net, params, batch, loss_fn = tiny_setup()
    Hd = dense_hessian(net, params, batch, loss_fn)
    for lam, damping in [(OFFICIAL_LAMBDA, OFFICIAL_DAMPING), (0.5, 0.0)]:
        op = HessianOperator(loss_fn, params, batch, lam=lam, damping=damping)
        A = torch.eye(Hd.shape[0], dtype=DT) + Hd / (lam + damping)
        assert torch.linalg.eigvalsh(A).min() > 0  # SPD, so CG applies
        v = random_tuple([p.shape for p in params.values()], torch.Generator().manual_seed(3))
        res = hypergradient(v, op, max_iter=200, rtol=1e-13)
        exact = unflat(torch.linalg.solve(A, flat(v)), v)
        assert res.converged
        assert rel_err(res.x, exact) < 1e-8
        assert res.n_products == op.n_products == res.iterations


def test_warm_start_reduces_iterations():
    gen = torch.Generator().manual_seed(4)
    b1 = random_tuple(SHAPES, gen)
    n = flat(b1).numel()
    A = random_spd(n, gen, cond=1e3)
    b2 = tuple(t + 1e-3 * torch.randn(t.shape, generator=gen, dtype=DT) for t in b1)
    mv = dense_matvec(A, b1)
    first = cg_solve(mv, b1, max_iter=10 * n, rtol=1e-10)
    cold = cg_solve(mv, b2, max_iter=10 * n, rtol=1e-10)
    warm = cg_solve(mv, b2, max_iter=10 * n, rtol=1e-10, x0=first.x)
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
    res = cg_solve(dense_matvec(A, b), b, max_iter=5, rtol=1e-8, x0=x)
    assert res.converged and res.iterations == 0 and res.residual_norms == []


# --- layerwise (official) ---------------------------------------------------------------------------

def reference_layerwise(A_of, v, K):
    """Spec §1.5 written out plainly, one tensor at a time, then nan_to_num."""
    xs = [torch.zeros_like(t) for t in v]
    rs = [t.clone() for t in v]
    ds = [t.clone() for t in v]
    for _ in range(K):
        Ads = A_of(tuple(ds))
        for i in range(len(v)):
            r_sq = (rs[i] * rs[i]).sum()
            a = r_sq / ((ds[i] * Ads[i]).sum() + 1e-12)
            xs[i] = xs[i] + a * ds[i]
            rs[i] = rs[i] - a * Ads[i]
            bt = (rs[i] * rs[i]).sum() / (r_sq + 1e-12)
            ds[i] = rs[i] + bt * ds[i]
    return [torch.nan_to_num(t) for t in xs]


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
        ours = cg_solve(mv, v, max_iter=K, mode="layerwise", nonfinite="zero")
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
    # (1.2 after 1 iteration, 2.0 after 5, 92 after 400), while global CG solves the same 4x4 system
    # to rounding in 4 iterations.
    A, v = coupled_two_block_system()
    assert torch.linalg.eigvalsh(A).min() > 0
    exact = unflat(torch.linalg.solve(A, flat(v)), v)
    mv = dense_matvec(A, v)
    errors = [rel_err(cg_solve(mv, v, max_iter=k, mode="layerwise").x, exact) for k in (5, 60, 400)]
    assert min(errors) > 1e-2, errors
    cg = cg_solve(mv, v, max_iter=4)
    assert rel_err(cg.x, exact) < 1e-10


def test_layerwise_on_tiny_network_stalls_above_cg_error():
    # the spec's observation on its toy (δ = 10: stalls; λ+δ small: error grows), on our tiny network
    net, params, batch, loss_fn = tiny_setup()
    Hd = dense_hessian(net, params, batch, loss_fn)
    v = random_tuple([p.shape for p in params.values()], torch.Generator().manual_seed(7))
    op = HessianOperator(loss_fn, params, batch, lam=0.0, damping=0.2)
    A = torch.eye(Hd.shape[0], dtype=DT) + Hd / 0.2
    exact = unflat(torch.linalg.solve(A, flat(v)), v)
    lw = [rel_err(cg_solve(op, v, max_iter=k, mode="layerwise").x, exact) for k in (5, 60)]
    cg = rel_err(cg_solve(op, v, max_iter=60).x, exact)
    assert cg < 1e-8
    assert min(lw) > 1e3 * cg, (lw, cg)


def test_layerwise_on_block_diagonal_system_is_blockwise_cg():
    # without coupling, per-tensor steps are exact CG per block: it converges (why it looks plausible)
    gen = torch.Generator().manual_seed(8)
    v = random_tuple([(3,), (4,)], gen)
    A = torch.block_diag(random_spd(3, gen, 10), random_spd(4, gen, 10))
    exact = unflat(torch.linalg.solve(A, flat(v)), v)
    assert rel_err(cg_solve(dense_matvec(A, v), v, max_iter=4, mode="layerwise").x, exact) < 1e-8


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


@pytest.mark.parametrize("mode", ["global", "layerwise"])
def test_nonfinite_raises_with_iteration_and_tensor(mode):
    gen = torch.Generator().manual_seed(9)
    b = random_tuple(SHAPES, gen)
    A = random_spd(flat(b).numel(), gen)
    with pytest.raises(NonFiniteError, match=r"iteration 3.*tensor 1 \('blockB'\).*1 NaN"):
        cg_solve(poisoned(A, b, 3, 1), b, max_iter=5, mode=mode, names=["blockA", "blockB", "blockC"])


@pytest.mark.parametrize("mode", ["global", "layerwise"])
def test_nonfinite_zero_mode_is_official_nan_to_num(mode):
    gen = torch.Generator().manual_seed(10)
    b = random_tuple(SHAPES, gen)
    A = random_spd(flat(b).numel(), gen)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        res = cg_solve(poisoned(A, b, 2, 0), b, max_iter=5, mode=mode, nonfinite="zero")
    assert res.n_nonfinite > 0
    assert all(bool(torch.isfinite(t).all()) for t in res.x)
    if mode == "layerwise":
        ref = reference_layerwise(poisoned(A, b, 2, 0), b, 5)
        assert all(torch.equal(a, r) for a, r in zip(res.x, ref))


def test_nonfinite_rhs_is_reported():
    b = (torch.ones(2, dtype=DT), torch.tensor([1.0, float("inf")], dtype=DT))
    with pytest.raises(NonFiniteError, match="right-hand side.*tensor 1.*1 Inf"):
        cg_solve(lambda d: d, b, max_iter=2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_iter=0, mode="layerwise"), "max_iter must be >= 1"),
    (dict(max_iter=-1), "max_iter must be an int >= 0"),
    (dict(max_iter=2.5), "max_iter must be an int"),
    (dict(max_iter=3, rtol=-1e-3), "rtol must be a finite number >= 0"),
    (dict(max_iter=3, atol=float("nan")), "atol must be a finite number >= 0"),
    (dict(max_iter=3, mode="lw"), "mode must be one of"),
    (dict(max_iter=3, nonfinite="ignore"), "nonfinite must be one of"),
    (dict(max_iter=3, mode="layerwise", rtol=1e-3), "no tolerance"),
    (dict(max_iter=3, x0=(torch.zeros(3, dtype=DT),)), r"x0\[0\] has shape \(3,\), expected \(2,\)"),
])
def test_cg_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cg_solve(lambda d: d, (torch.ones(2, dtype=DT),), **kwargs)


def test_cg_rejects_matvec_with_wrong_shape():
    with pytest.raises(ValueError, match=r"matvec output tensor 0 has shape \(3,\), expected \(2,\)"):
        cg_solve(lambda d: (torch.ones(3, dtype=DT),), (torch.ones(2, dtype=DT),), max_iter=2)


# --- Hessian-vector products ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["reuse", "recompute"])
def test_hvp_matches_autograd_hessian(mode):
    net, params, batch, loss_fn = tiny_setup(seed=11)
    Hd = dense_hessian(net, params, batch, loss_fn)
    assert not torch.allclose(Hd, torch.zeros_like(Hd))
    op = HessianOperator(loss_fn, params, batch, mode=mode)
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        d = random_tuple([p.shape for p in params.values()], gen)
        assert torch.allclose(flat(op.hvp(d)), Hd @ flat(d), rtol=1e-10, atol=1e-12)
        Ad = op(d)
        assert torch.allclose(flat(Ad), flat(d) + Hd @ flat(d) / (OFFICIAL_LAMBDA + OFFICIAL_DAMPING),
                              rtol=1e-10, atol=1e-12)


def test_reuse_equals_recompute_for_many_products_and_counts_passes():
    net, params, batch, loss_fn = tiny_setup(seed=12)
    reuse = HessianOperator(loss_fn, params, batch, mode="reuse")
    recompute = HessianOperator(loss_fn, params, batch, mode="recompute")
    gen = torch.Generator().manual_seed(12)
    N = 40  # N_U = 8 upper steps x K = 5 products
    for _ in range(N):
        d = random_tuple([p.shape for p in params.values()], gen)
        assert torch.allclose(flat(reuse(d)), flat(recompute(d)), rtol=1e-12, atol=1e-14)
    assert (reuse.n_products, reuse.n_loss_calls, reuse.n_graph_builds) == (N, 1, 1)
    assert (recompute.n_products, recompute.n_loss_calls, recompute.n_graph_builds) == (N, N, N)


def test_batched_products_equal_single_products():
    net, params, batch, loss_fn = tiny_setup(seed=13)
    for mode in ("reuse", "recompute"):
        op = HessianOperator(loss_fn, params, batch, mode=mode)
        gen = torch.Generator().manual_seed(13)
        D = tuple(torch.randn((4,) + p.shape, generator=gen, dtype=DT) for p in params.values())
        batched = op.hvp_batched(D)
        for j in range(4):
            single = op.hvp(tuple(t[j] for t in D))
            assert torch.allclose(flat(tuple(t[j] for t in batched)), flat(single), rtol=1e-12, atol=1e-14)
        assert op.n_products == 8


def test_release_frees_graph_and_later_products_raise():
    net, params, batch, loss_fn = tiny_setup()
    d = tuple(torch.ones_like(p) for p in params.values())
    with HessianOperator(loss_fn, params, batch) as op:
        op(d)
    assert op._grads is None
    with pytest.raises(RuntimeError, match="released"):
        op(d)


def test_reuse_detects_in_place_parameter_change():
    net, params, batch, loss_fn = tiny_setup()
    op = HessianOperator(loss_fn, params, batch)
    with torch.no_grad():
        next(iter(params.values())).add_(1.0)
    with pytest.raises(RuntimeError, match=r"params\[0\] \('0.weight'\) was modified in place"):
        op.hvp(tuple(torch.ones_like(p) for p in params.values()))


def test_operator_rejects_bad_input():
    net, params, batch, loss_fn = tiny_setup()
    with pytest.raises(ValueError, match="mode must be one of"):
        HessianOperator(loss_fn, params, batch, mode="fast")
    with pytest.raises(ValueError, match="bn_stats must be one of"):
        HessianOperator(loss_fn, params, batch, bn_stats="freeze")
    with pytest.raises(ValueError, match="lam \\+ damping must be finite and > 0"):
        HessianOperator(loss_fn, params, batch, lam=0.0, damping=0.0)
    op = HessianOperator(loss_fn, params, batch)
    with pytest.raises(ValueError, match=r"tensor 1 has shape \(3,\), expected \(4,\)"):
        op.hvp(tuple(torch.zeros(3, dtype=DT) if i == 1 else torch.zeros_like(p)
                     for i, p in enumerate(params.values())))


# --- BatchNorm side effects -------------------------------------------------------------------------

def bn_setup():
    torch.manual_seed(14)
    net = TinyNet(bn=True).to(DT).train()
    v1, v2 = torch.randn(8, 3, dtype=DT), torch.randn(8, 3, dtype=DT)
    params = dict(net.backbone.named_parameters())

    def loss_fn(batch):  # two views through the backbone, like SimCLR: two BN forwards per call
        a, b = batch
        return ((net(a) - net(b)) ** 2).mean()

    return net, params, (v1, v2), loss_fn


def bn_state(net):
    bn = net.backbone[1]
    return bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)


def bn_state_after_forwards(net, batch, n_loss_calls):
    """Independent expectation: run loss_fn's forwards on a copy, n_loss_calls times."""
    import copy
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for _ in range(n_loss_calls):
            a, b = batch
            ref(a), ref(b)
    return bn_state(ref)


@pytest.mark.parametrize("mode", ["reuse", "recompute"])
def test_bn_restore_keeps_running_stats_bit_identical(mode):
    net, params, batch, loss_fn = bn_setup()
    before = bn_state(net)
    op = HessianOperator(loss_fn, params, batch, mode=mode, bn_stats="restore", module=net)
    for _ in range(5):
        op(tuple(torch.randn_like(p) for p in params.values()))
    after = bn_state(net)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]) and before[2] == after[2]


@pytest.mark.parametrize("mode, expected_calls", [("recompute", 5), ("reuse", 1)])
def test_bn_update_drifts_once_per_loss_call(mode, expected_calls):
    net, params, batch, loss_fn = bn_setup()
    expected = bn_state_after_forwards(net, batch, expected_calls)
    op = HessianOperator(loss_fn, params, batch, mode=mode, bn_stats="update")
    for _ in range(5):
        op(tuple(torch.randn_like(p) for p in params.values()))
    after = bn_state(net)
    assert op.n_loss_calls == expected_calls
    assert after[2] == expected[2] == 2 * expected_calls  # two BN forwards per loss call
    assert torch.allclose(after[0], expected[0], rtol=0, atol=1e-14)
    assert torch.allclose(after[1], expected[1], rtol=0, atol=1e-14)


@pytest.mark.parametrize("bn_stats", ["restore", "update"])
def test_reuse_graph_survives_callers_train_mode_forwards(bn_stats):
    # the upper step runs θ_P forward in train mode between products (v = ∇_θP L_D); that updates
    # the BN buffers in place, which must not invalidate the retained graph
    net, params, batch, loss_fn = bn_setup()
    op = HessianOperator(loss_fn, params, batch, mode="reuse", bn_stats=bn_stats, module=net)
    d = tuple(torch.randn_like(p) for p in params.values())
    first = op.hvp(d)
    net(torch.randn(8, 3, dtype=DT))  # in-place running-stat update
    again = op.hvp(d)
    fresh = HessianOperator(loss_fn, params, batch, mode="recompute", module=net).hvp(d)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.allclose(flat(again), flat(fresh), rtol=1e-12, atol=1e-14)


def test_bn_mode_does_not_change_the_hessian():
    net, params, batch, loss_fn = bn_setup()
    d = tuple(torch.randn_like(p) for p in params.values())
    hv = [HessianOperator(loss_fn, params, batch, mode="recompute", bn_stats=s, module=net).hvp(d)
          for s in ("restore", "update", "restore")]
    assert all(torch.equal(a, b) for a, b in zip(hv[0], hv[1]))
    assert all(torch.equal(a, b) for a, b in zip(hv[0], hv[2]))


# --- closed-form bilevel toy ------------------------------------------------------------------------

@pytest.mark.parametrize("damping", [0.0, OFFICIAL_DAMPING])
def test_closed_form_bilevel_toy(damping):
    r"""Lower: L_P(θ) = ½θᵀPθ − cᵀθ + (λ/2)‖θ − θ_D‖²  ⇒  θ*(θ_D) = (P + λI)⁻¹(c + λθ_D).
    Upper: F(θ_D) = L_D(θ*(θ_D)) with L_D(θ) = ½‖Mθ − y‖².  With v = ∇L_D(θ*),
    dF/dθ_D = λ(P + λI)⁻¹ v, which is what the engine's x = (I + P/λ)⁻¹ v must equal (δ = 0).
    With δ > 0 the engine gives the hypergradient of the same toy with proximal weight λ + δ."""
    gen = torch.Generator().manual_seed(15)
    shapes = [(2, 3), (4,)]
    n = 10
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    P = Q @ torch.diag(torch.linspace(-0.5, 3.0, n, dtype=DT)) @ Q.T  # indefinite pretext Hessian
    c = torch.randn(n, generator=gen, dtype=DT)
    M = torch.randn(6, n, generator=gen, dtype=DT)
    y = torch.randn(6, generator=gen, dtype=DT)
    theta_D = torch.randn(n, generator=gen, dtype=DT)
    lam = 0.7
    lam_eff = lam + damping

    def theta_star(tD):
        return torch.linalg.solve(P + lam_eff * torch.eye(n, dtype=DT), c + lam_eff * tD)

    # analytic and autograd-through-the-closed-form hypergradients
    tD = theta_D.clone().requires_grad_(True)
    F = 0.5 * ((M @ theta_star(tD) - y) ** 2).sum()
    (autograd_hg,) = torch.autograd.grad(F, tD)
    ts = theta_star(theta_D)
    v_flat = M.T @ (M @ ts - y)
    analytic = lam_eff * torch.linalg.solve(P + lam_eff * torch.eye(n, dtype=DT), v_flat)
    assert torch.allclose(analytic, autograd_hg, rtol=1e-12, atol=1e-12)

    # the engine: θ_P as two parameter tensors at θ*, H from the pretext loss by autograd
    theta_P = tuple(t.clone().requires_grad_(True) for t in unflat(ts, [torch.empty(s) for s in shapes]))

    def pretext_loss(_batch):
        th = flat(theta_P)
        return 0.5 * th @ P @ th - c @ th

    op = HessianOperator(pretext_loss, theta_P, None, lam=lam, damping=damping)
    v = unflat(v_flat, theta_P)
    res = hypergradient(v, op, max_iter=50, rtol=1e-14)
    assert res.converged or rel_err(res.x, unflat(analytic, v)) < 1e-10
    assert rel_err(res.x, unflat(analytic, v)) < 1e-10
    assert res.negative_curvature is False  # A = I + P/λ' is still SPD here
    # and the official scheme is visibly less exact on the same system
    paper = hypergradient(v, op, **{k: PAPER_SOLVER[k] for k in ("mode", "max_iter", "nonfinite")})
    assert rel_err(paper.x, unflat(analytic, v)) > 10 * rel_err(res.x, unflat(analytic, v))


# --- recycling across the upper steps of a stage -----------------------------------------------------

def test_krylov_memory_guess_is_galerkin():
    gen = torch.Generator().manual_seed(16)
    b = random_tuple(SHAPES, gen)
    n = flat(b).numel()
    A = random_spd(n, gen, cond=100)
    mem = KrylovMemory(max_size=n)
    mv = dense_matvec(A, b)
    assert mem.initial_guess(b) is None
    cg_solve(mv, b, max_iter=8, on_product=mem.record(b))
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
    cg_solve(mv, b1, max_iter=12, on_product=mem.record(b1))
    k = mem.size
    b2 = random_tuple(SHAPES, gen)
    plain = cg_solve(mv, b2, max_iter=10 * n, rtol=1e-11)
    seen = []
    defl = cg_solve(mv, b2, max_iter=10 * n, rtol=1e-11, deflation=mem,
                    on_product=lambda p, Ap: seen.append(flat(p)))
    exact = unflat(torch.linalg.solve(A, flat(b2)), b2)
    assert defl.converged and rel_err(defl.x, exact) < 1e-8
    assert defl.iterations < plain.iterations
    assert defl.n_matvec == defl.iterations + 1  # the start's residual costs one real product
    mem.exact_start = False
    free = cg_solve(mv, b2, max_iter=10 * n, rtol=1e-11, deflation=mem)
    assert free.converged and free.n_matvec == free.iterations and rel_err(free.x, exact) < 1e-8
    mem.exact_start = True
    AW = mem._AW[:k]
    for p in seen[1:]:  # Wᵀ A p = (AW)ᵀ p = 0 for every deflated search direction
        assert float((AW @ p).abs().max()) < 1e-8 * float(p.norm()) * float(AW.norm())
    with pytest.raises(ValueError, match="deflation must be None"):
        cg_solve(mv, b2, max_iter=3, mode="layerwise", deflation=mem)


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
        solver = HypergradientSolver(op, mode="global", max_iter=100, rtol=1e-10, warm_start=warm)
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


def test_paper_preset_is_official_layerwise():
    net, params, batch, loss_fn = tiny_setup(seed=18)
    op = HessianOperator(loss_fn, params, batch, mode="recompute", bn_stats="update")
    v = random_tuple([p.shape for p in params.values()], torch.Generator().manual_seed(18))
    solver = HypergradientSolver(op, **PAPER_SOLVER)
    res = solver(v)
    ref = reference_layerwise(op, v, 5)
    assert all(torch.equal(a, b) for a, b in zip(res.x, ref))
    assert res.n_products == 5 and res.iterations == 5 and res.seconds > 0


def test_recommended_solver_is_the_best_multiple_of_v():
    """One MINRES iteration minimises ‖v − A·αv‖ over α: x = (vᵀAv / ‖Av‖²) v, one product."""
    net, params, batch, loss_fn = tiny_setup(seed=19)
    op = HessianOperator(loss_fn, params, batch, mode="reuse", damping=0.05)
    v = random_tuple([p.shape for p in params.values()], torch.Generator().manual_seed(19))
    res = HypergradientSolver(op, **{**RECOMMENDED_SOLVER, "rtol": None})(v)
    av = flat(op(v))
    alpha = flat(v) @ av / (av @ av)
    assert rel_err(res.x, unflat(alpha * flat(v), v)) < 1e-10
    assert res.n_products == 1 and res.iterations == 1
    # never farther from v than x = 0, whatever the sign of vᵀAv
    assert float(torch.linalg.vector_norm(flat(v) - alpha * av)) <= float(torch.linalg.vector_norm(flat(v)))


def test_solver_rejects_bad_options():
    with pytest.raises(ValueError, match="warm_start must be one of"):
        HypergradientSolver(lambda d: d, warm_start="last")
    with pytest.raises(ValueError, match="layerwise has no warm start"):
        HypergradientSolver(lambda d: d, mode="layerwise", warm_start="recycle")
    with pytest.raises(ValueError, match="max_size must be an int >= 1"):
        KrylovMemory(0)


# --- property tests ---------------------------------------------------------------------------------

block_shapes = st.lists(st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4)


@settings(max_examples=25, deadline=None)
@given(shapes=block_shapes, seed=st.integers(0, 2**31 - 1), log_cond=st.floats(0.0, 3.0))
def test_property_global_cg_solves_random_spd_block_systems(shapes, seed, log_cond):
    gen = torch.Generator().manual_seed(seed)
    b = random_tuple(shapes, gen)
    n = flat(b).numel()
    A = random_spd(n, gen, cond=10 ** log_cond)
    res = cg_solve(dense_matvec(A, b), b, max_iter=20 * n, rtol=1e-13)
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
    assert a_err(cg_solve(mv, b, max_iter=k + 1).x) <= a_err(cg_solve(mv, b, max_iter=k).x) * (1 + 1e-9) + 1e-20
    ours = cg_solve(mv, b, max_iter=k, mode="layerwise")
    assert all(torch.equal(a, r) for a, r in zip(ours.x, reference_layerwise(mv, b, k)))


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
    res = cg_solve(mv, b, max_iter=20 * n, rtol=1e-12, deflation=mem)
    assert res.converged
    assert rel_err(res.x, unflat(torch.linalg.solve(A, flat(b)), b)) < 1e-8


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
    res = cg_solve(dense_matvec(A, b), b, max_iter=10 * n, rtol=1e-12, mode="minres")
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
    mr = cg_solve(mv, b, max_iter=30, mode="minres")
    cg = cg_solve(mv, b, max_iter=30, mode="global")
    norms = [float(torch.linalg.vector_norm(flat(b)))] + mr.residual_norms
    assert all(b_ <= a * (1 + 1e-12) for a, b_ in zip(norms, norms[1:]))
    assert cg.negative_curvature
    assert max(cg.residual_norms) > norms[0]  # CG's residual grows on this indefinite system
    # MINRES's iterate minimises the residual over the Krylov space, so it beats CG's at equal products
    true_mr = torch.linalg.vector_norm(flat(b) - A @ flat(mr.x))
    true_cg = torch.linalg.vector_norm(flat(b) - A @ flat(cg.x))
    assert true_mr <= true_cg


def test_minres_warm_start_and_tolerance():
    gen = torch.Generator().manual_seed(13)
    b = random_tuple(SHAPES, gen)
    n = flat(b).numel()
    A = random_symmetric_indefinite(n, gen)
    mv = dense_matvec(A, b)
    exact = unflat(torch.linalg.solve(A, flat(b)), b)
    cold = cg_solve(mv, b, max_iter=10 * n, rtol=1e-6, mode="minres")
    near = tuple(e + 1e-4 * torch.randn(e.shape, generator=gen, dtype=DT) for e in exact)
    warm = cg_solve(mv, b, max_iter=10 * n, rtol=1e-6, mode="minres", x0=near)
    assert cold.converged and warm.converged
    assert warm.iterations < cold.iterations and warm.n_matvec == warm.iterations + 1
    assert cold.residual_norms[-1] <= 1e-6 * float(torch.linalg.vector_norm(flat(b)))


def test_minres_hypergradient_on_tiny_network():
    net, params, batch, loss_fn = tiny_setup()
    Hd = dense_hessian(net, params, batch, loss_fn)
    lam, damping = 0.05, 0.0
    A = torch.eye(Hd.shape[0], dtype=DT) + Hd / (lam + damping)
    op = HessianOperator(loss_fn, params, batch, lam=lam, damping=damping)
    v = random_tuple([p.shape for p in params.values()], torch.Generator().manual_seed(3))
    solver = HypergradientSolver(op, mode="minres", max_iter=500, rtol=1e-12, warm_start="previous")
    res = solver.solve(v)
    assert res.converged and rel_err(res.x, unflat(torch.linalg.solve(A, flat(v)), v)) < 1e-8
    with pytest.raises(ValueError, match="recycle"):
        HypergradientSolver(op, mode="minres", warm_start="recycle")
    solver.release()
