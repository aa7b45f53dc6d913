"""The BiSSL stage's options and records on a tiny BN-free SimCLR toy (float64); paper mode against the
spec's reference is tests/test_paper_mode.py."""

import pytest
import torch
from torch import nn

from bissl_kit.bissl import PAPER_MODE, BilevelData, BisslConfig, BisslTrainer, layer_groups
from bissl_kit.evaluate import accuracy_topk
from bissl_kit.config import ConfigError
from bissl_kit.losses import nt_xent
from bissl_kit.rng import generator

D_IN, FEAT, N_PRE, N_DOWN, CLASSES = 6, 5, 24, 18, 3


# every test here runs in float64 (conftest.float64_default restores the default afterwards)
pytestmark = pytest.mark.usefixtures("float64_default")


class TinyBackbone(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(D_IN, 7), nn.Tanh(), nn.Linear(7, FEAT), nn.Tanh())
        self.feat_dim = FEAT


class TinySimCLR(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = TinyBackbone()
        self.head = nn.Sequential(nn.Linear(FEAT, 4), nn.Tanh(), nn.Linear(4, 4, bias=False))
        self.pretext_forward = "joint"  # without BatchNorm per-view and joint forwards are the same function

    def loss(self, v1, v2):
        z = self.head(self.backbone(torch.cat([v1, v2])))
        return nt_xent(*z.chunk(2), temperature=0.5)

    def update_target(self):
        pass


def make_problem(seed=0):
    torch.manual_seed(seed)
    lower = TinySimCLR()
    upper = TinyBackbone()
    upper.load_state_dict(lower.backbone.state_dict())
    with torch.no_grad():  # θ_D ≠ θ_P, so the proximal term is active from the first step
        for p in upper.parameters():
            p.add_(0.1 * torch.randn_like(p))
    head = nn.Linear(FEAT, CLASSES)
    xp = torch.randn(N_PRE, D_IN)
    xd, yd = torch.randn(N_DOWN, D_IN), torch.randint(0, CLASSES, (N_DOWN,))

    def views(idx, tag):  # a deterministic "augmentation" seeded by the tag
        g = generator(99, *tag)
        return (xp[idx] + 0.1 * torch.randn(len(idx), D_IN, generator=g),
                xp[idx] * (1 + 0.1 * torch.rand(len(idx), 1, generator=g)))

    def down(idx, tag):
        return xd[idx], yd[idx]

    data = BilevelData(N_PRE, N_DOWN, views, down, val=(xd, yd), num_classes=CLASSES)
    return lower, upper, head, data


def cfg_for(gamma, **kw):
    base = dict(PAPER_MODE, stages=3, lower_steps=3, upper_steps=2, head_warmup_epochs=0, lam=0.05, damping=0.5,
                gamma=gamma, lower_batch_size=4, upper_batch_size=5, lower_lr=0.7, lower_warmup=2,
                lower_clip=0.5, upper_lr=0.2, upper_weight_decay=0.01, upper_clip=0.3, progress=False, device="cpu")
    base.update(kw)
    return BisslConfig.from_dict(base)


def flat_params(*modules):
    return [p for m in modules for p in m.parameters()]


def flat(*modules):
    return torch.cat([p.detach().reshape(-1) for m in modules for p in m.parameters()])


def test_graph_reuse_gives_the_parameters_of_recompute():
    results = []
    for hvp in ("recompute", "reuse"):
        lower, upper, head, data = make_problem()
        list(BisslTrainer(cfg_for(1.0, hvp=hvp), lower, upper, head, data).run(2))
        results.append(flat(lower, upper, head))
    assert (results[0] - results[1]).abs().max() < 1e-10


def test_true_cg_converges_where_layerwise_does_not_and_reports_residuals():
    lower, upper, head, data = make_problem()
    # δ = 10 as in the paper keeps A = I + H/(λ+δ) positive definite on this toy
    cfg = cfg_for(1.0, solver="cg", solver_iters=200, solver_rtol=1e-10, warm_start="none", nonfinite="raise", damping=10.0)
    recs = [r for r in BisslTrainer(cfg, lower, upper, head, data).run(1) if r["kind"] == "upper"]
    assert all(r["solver_converged"] and r["solver_iterations"] < 200 for r in recs)
    lower, upper, head, data = make_problem()
    cfg = cfg_for(1.0, solver="layerwise", solver_iters=200, damping=10.0)
    recs = [r for r in BisslTrainer(cfg, lower, upper, head, data).run(1) if r["kind"] == "upper"]
    assert all(r["solver_iterations"] == 200 and not r["solver_converged"] for r in recs)  # fixed count, no tolerance


def test_krylov_recycling_needs_fewer_products_than_cold_starts():
    warm_start = "recycle"
    iters = {}
    for ws in ("none", warm_start):
        lower, upper, head, data = make_problem()
        cfg = cfg_for(1.0, solver="cg", solver_iters=80, solver_rtol=1e-4, warm_start=ws, hvp="reuse", upper_steps=4,
                      nonfinite="raise", damping=10.0)
        iters[ws] = sum(r["solver_iterations"] for r in BisslTrainer(cfg, lower, upper, head, data).run(1)
                        if r["kind"] == "upper")
    assert iters[warm_start] < iters["none"]


def dense_operator(op, like):
    """The matrix of a tuple-to-tuple operator, column by column (the toy has 82 parameters)."""
    sizes = [t.numel() for t in like]
    cols = []
    for i in range(sum(sizes)):
        e = torch.zeros(sum(sizes))
        e[i] = 1.0
        parts = torch.split(e, sizes)
        cols.append(torch.cat([t.reshape(-1) for t in op(tuple(p.view_as(t) for p, t in zip(parts, like)))]))
    return torch.stack(cols, 1)


def test_minres_solves_every_stage_system_even_where_A_is_indefinite():
    lower, upper, head, data = make_problem()
    # λ + δ = 3.02 makes A = I + H/(λ+δ) indefinite on this toy (eigenvalues −15 … 41), as the official δ
    # does on the CPU ResNet
    cfg = cfg_for(1.0, solver="minres", solver_iters=400, solver_rtol=1e-12, warm_start="previous", hvp="reuse",
                  nonfinite="raise", lam=0.02, damping=3.0, upper_steps=3)
    trainer = BisslTrainer(cfg, lower, upper, head, data)
    seen = []
    trainer.solve_observer = lambda op, v, sol: seen.append(
        (dense_operator(op, v), torch.cat([t.reshape(-1) for t in v]), torch.cat([t.reshape(-1) for t in sol.x]),
         sol))
    list(trainer.run(1))
    with pytest.raises(ConfigError, match="warm_start='recycle' .deflated CG. needs solver='cg'"):
        cfg_for(1.0, solver="minres", warm_start="recycle")
    assert len(seen) == 3
    assert min(float(torch.linalg.eigvalsh((A + A.T) / 2).min()) for A, *_ in seen) < 0
    for A, v, x, sol in seen:
        assert torch.allclose(A, A.T, atol=1e-10)
        exact = torch.linalg.solve(A, v)
        assert sol.converged and float((x - exact).norm() / exact.norm()) < 1e-8


def test_averaged_hessian_batches_and_batch_choices_run_and_differ():
    finals = {}
    for choice, n in (("fresh", 1), ("fresh", 3), ("lower", 2), ("random", 1)):
        lower, upper, head, data = make_problem()
        list(BisslTrainer(cfg_for(1.0, hessian_batch=choice, hessian_batches=n), lower, upper, head, data).run(1))
        finals[(choice, n)] = flat(upper)
    values = list(finals.values())
    assert all(not torch.equal(values[0], v) for v in values[1:])


def test_resume_after_an_interrupted_stage_gives_the_same_parameters(tmp_path):
    lower, upper, head, data = make_problem()
    full = BisslTrainer(cfg_for(1.0), lower, upper, head, data, out_dir=tmp_path / "full")
    list(full.run())
    lower2, upper2, head2, data2 = make_problem()
    cut = BisslTrainer(cfg_for(1.0), lower2, upper2, head2, data2, out_dir=tmp_path / "cut")
    for rec in cut.run():
        if rec["kind"] == "upper" and rec["stage"] == 2 and rec["step"] == 1:
            break  # killed in the middle of stage 2; the checkpoint holds stage 1
    lower3, upper3, head3, data3 = make_problem()
    with torch.no_grad():  # scramble the weights: everything must come from the checkpoint
        for p in flat_params(lower3, upper3, head3):
            p.normal_()
    resumed = BisslTrainer(cfg_for(1.0), lower3, upper3, head3, data3, out_dir=tmp_path / "cut")
    assert resumed.resume() and resumed.stage == 1
    list(resumed.run())
    assert torch.equal(flat(lower, upper, head), flat(lower3, upper3, head3))


def test_bn_stats_restore_leaves_lower_buffers_untouched_in_the_upper_phase():
    class BNBackbone(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Linear(D_IN, FEAT), nn.BatchNorm1d(FEAT), nn.Tanh())
            self.feat_dim = FEAT

    for mode, should_change in (("restore", False), ("update", True)):
        lower, upper, head, data = make_problem()
        lower.backbone = BNBackbone()
        upper = BNBackbone()
        trainer = BisslTrainer(cfg_for(1.0, bn_stats=mode, lower_steps=0, hvp="recompute"), lower, upper, head, data)
        before = lower.backbone[1].running_mean.clone()
        list(trainer.upper_phase())
        assert torch.equal(before, lower.backbone[1].running_mean) != should_change


def test_evaluation_topk_and_layer_groups():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    acc = accuracy_topk(logits, torch.tensor([1, 1, 2]), ks=(1, 2))
    assert acc[1] == pytest.approx(2 / 3) and acc[2] == 1.0
    names = ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.1.bn2.bias", "layer2.0.conv1.weight"]
    assert layer_groups(names) == [("stem", [0, 1]), ("layer1.0", [2]), ("layer1.1", [3]), ("layer2.0", [4])]


@pytest.mark.parametrize("field,value,needle", [
    ("lam", 0.0, "lam=0.0 is out of range; lam must be > 0"),
    ("damping", -1.0, "damping=-1.0 is out of range"),
    ("solver_iters", 0, "solver_iters=0 is out of range; solver_iters must be >= 1"),
    ("lower_steps", -1, "lower_steps=-1 is out of range"),
    ("solver", "lbfgs", "solver='lbfgs' is not allowed"),
    ("warm_start", "previous", "warm_start='previous' needs solver='cg'"),
])
def test_bad_bissl_config_is_rejected(field, value, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        cfg_for(1.0, **{field: value})


def test_solver_iterations_default_to_each_solvers_own():
    # None means "the solver's default", so switching solver never inherits another solver's K
    assert (BisslConfig().solver, BisslConfig().resolved_solver_iters) == ("minres", 1)
    assert BisslConfig(solver="layerwise").resolved_solver_iters == 5
    assert BisslConfig().replace(solver="cg", warm_start="recycle").resolved_solver_iters == 5
    assert BisslConfig(solver="cg", solver_iters=3).resolved_solver_iters == 3
    assert BisslConfig.embedded().resolved_solver_iters == 1 and BisslConfig.embedded(paper_mode=True).resolved_solver_iters == 5


def test_presets_are_the_spec_defaults():
    iclr, neurips = BisslConfig.paper_iclr(), BisslConfig.paper_neurips()
    for c in (iclr, neurips):
        assert (c.stages, c.lower_steps, c.upper_steps, c.lam, c.damping, c.solver_iters) == (500, 20, 8, 1e-3, 10.0, 5)
        assert c.solver == "layerwise" and c.hvp == "recompute" and c.nonfinite == "zero" and c.bn_stats == "update"
        assert (c.lower_clip, c.upper_clip, c.lower_batch_size, c.upper_batch_size) == (10.0, 10.0, 1024, 256)
    assert iclr.gamma == 0.01 and neurips.gamma == 1.0
    assert BisslConfig.embedded(paper_mode=True).solver == "layerwise"
    assert BisslConfig.embedded().hvp == "reuse"


def test_no_solve_is_x_equals_v_and_the_upper_step_is_its_formula():
    # solver='none': x is v itself (no product, no Hessian built), and with γ = 0 the first upper step is
    # SGD's first step on v: θ_D ← θ_D − lr (v + wd θ_D) (the momentum buffer starts as the gradient)
    lower, upper, head, data = make_problem()
    cfg = cfg_for(0.0, solver="none", solver_iters=None, upper_clip=None, upper_steps=1, stages=1)
    seen = {}

    def observe(op, v, sol):
        seen.update(op=op, v=[t.clone() for t in v], same=all(torch.equal(a, b) for a, b in zip(sol.x, v)),
                    theta_d=[p.detach().clone() for p in upper.parameters()], products=sol.n_products)

    trainer = BisslTrainer(cfg, lower, upper, head, data)
    trainer.solve_observer = observe
    rec = next(r for r in trainer.run(1) if r["kind"] == "upper")
    assert seen["op"] is None and seen["same"] and seen["products"] == 0 and rec["solver_iterations"] == 0
    for before, v, after in zip(seen["theta_d"], seen["v"], upper.parameters()):
        expected = before - rec["lr"] * (v + cfg.upper_weight_decay * before)
        torch.testing.assert_close(after.detach(), expected, rtol=1e-12, atol=1e-14)
    assert cfg.resolved_solver_iters == 0 and cfg.replace(solver_iters=5).identity() == cfg.identity()
    with pytest.raises(ConfigError, match="solver='none'"):
        cfg.replace(warm_start="previous")
