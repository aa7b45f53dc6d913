"""The hypergradient driver (bissl_kit.implicit.hypergradient): one solve, a stage's solves, the presets,
and a closed-form bilevel toy; float64 on CPU."""
import dataclasses

import pytest
import torch

from bissl_kit.bissl import BisslConfig
from bissl_kit.implicit import (OFFICIAL_DAMPING, OFFICIAL_LAMBDA, PAPER_SOLVER, RECOMMENDED_SOLVER, SOLVERS,
                                HessianOperator, HypergradientSolver, KrylovMemory, cg, hypergradient, layerwise,
                                minres)
from implicit_helpers import (DT, dense_hessian, flat, random_tuple, reference_layerwise, rel_err, tiny_setup,
                              unflat)


def test_cg_on_tiny_network_system():
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
    paper = hypergradient(v, op, **{k: PAPER_SOLVER[k] for k in ("solver", "max_iter", "nonfinite")})
    assert rel_err(paper.x, unflat(analytic, v)) > 10 * rel_err(res.x, unflat(analytic, v))


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
        HypergradientSolver(lambda d: d, solver="layerwise", warm_start="recycle")
    with pytest.raises(ValueError, match="max_size must be an int >= 1"):
        KrylovMemory(0)
    with pytest.raises(ValueError, match=r"solver must be one of \('layerwise', 'cg', 'minres', 'none'\), got 'global'"):
        HypergradientSolver(lambda d: d, solver="global")
    with pytest.raises(ValueError, match="layerwise .* has no tolerance"):
        HypergradientSolver(lambda d: d, solver="layerwise", rtol=1e-2)
    v = (torch.ones(2, dtype=DT),)
    with pytest.raises(ValueError, match="layerwise .* x0 must be None"):
        hypergradient(v, lambda d: d, solver="layerwise", x0=v)
    with pytest.raises(ValueError, match="memory .* needs solver='cg', got solver='minres'"):
        hypergradient(v, lambda d: d, solver="minres", memory=KrylovMemory(2))


def test_solver_names_are_the_bissl_configs():
    field = next(f for f in dataclasses.fields(BisslConfig) if f.name == "solver")
    assert set(SOLVERS) == set(field.metadata["choices"])


@pytest.mark.parametrize("solver", ["layerwise", "cg", "minres"])
def test_the_driver_adds_nothing_to_the_solver(solver):
    # hypergradient() times and records; x, residuals and counts are the solver function's, bit for bit
    net, params, batch, loss_fn = tiny_setup(seed=20)
    op = HessianOperator(loss_fn, params, batch, damping=0.3)
    v = random_tuple([p.shape for p in params.values()], torch.Generator().manual_seed(20))
    if solver == "layerwise":
        direct = layerwise(op, v, iters=4, nonfinite="zero", names=op.names)
        ours = hypergradient(v, op, solver=solver, max_iter=4, nonfinite="zero")
    else:
        direct = {"cg": cg, "minres": minres}[solver](op, v, max_iter=4, rtol=1e-3, names=op.names)
        ours = hypergradient(v, op, solver=solver, max_iter=4, rtol=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(ours.x, direct.x))
    assert ours.residual_norms == direct.residual_norms and ours.n_products == direct.n_matvec
    assert (ours.iterations, ours.converged, ours.initial_residual_norm, ours.negative_curvature) == \
        (direct.iterations, direct.converged, direct.initial_residual_norm, direct.negative_curvature)


def test_minres_hypergradient_on_tiny_network():
    net, params, batch, loss_fn = tiny_setup()
    Hd = dense_hessian(net, params, batch, loss_fn)
    lam, damping = 0.05, 0.0
    A = torch.eye(Hd.shape[0], dtype=DT) + Hd / (lam + damping)
    op = HessianOperator(loss_fn, params, batch, lam=lam, damping=damping)
    v = random_tuple([p.shape for p in params.values()], torch.Generator().manual_seed(3))
    solver = HypergradientSolver(op, solver="minres", max_iter=500, rtol=1e-12, warm_start="previous")
    res = solver.solve(v)
    assert res.converged and rel_err(res.x, unflat(torch.linalg.solve(A, flat(v)), v)) < 1e-8
    with pytest.raises(ValueError, match="recycle"):
        HypergradientSolver(op, solver="minres", warm_start="recycle")
    solver.release()
