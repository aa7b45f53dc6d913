"""Paper mode is the official algorithm: the BiSSL stage against a re-implementation written from the spec.

``reference_run`` below follows spec §1.4–§1.7, §2.1, §2.3 and §2.5 one operation per line, in float64:
the head warm-up, then per stage N_L lower LARS steps, the Hessian batch of a fresh lower iterator, N_U
upper SGD steps with the layerwise recursion on recomputed Hessian-vector products. On BatchNorm models
it also follows the official side effects: one forward per SimCLR view (each view normalised by its own
batch statistics), and every train-mode forward, Hessian products included, updating the running
buffers. Its batches are those of a DataLoader without ``drop_last`` (a partial last batch is kept and
counted), re-created with ``set_epoch(stage)`` when fewer than the stage's N batches remain; a
downstream loader shorter than N_U batches runs as each version runs it (C9).

The data contract it shares with the kit is the documented seeding only: the permutation of pass e of a
level is ``randperm(n, generator(seed, tag, e))`` and the augmentations are seeded by the tags below.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bissl_kit.bissl import PAPER_MODE, BilevelData, BisslConfig, BisslTrainer
from bissl_kit.config import ConfigError
from bissl_kit.losses import nt_xent
from bissl_kit.rng import generator
from test_bissl import CLASSES, D_IN, FEAT, make_problem

# every test here runs in float64 (conftest.float64_default restores the default afterwards)
pytestmark = pytest.mark.usefixtures("float64_default")

# sizes that leave a partial last batch at both levels: 22 = 5·4 + 2 pretext items, 17 = 3·5 + 2 downstream
N_PRE, N_DOWN, B_P, B_D = 22, 17, 4, 5


class BNBackbone(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(D_IN, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, FEAT), nn.Tanh())
        self.feat_dim = FEAT


class BNSimCLR(nn.Module):
    """A SimCLR model with BatchNorm in the backbone and the projector, as the real ResNet and Projector."""

    def __init__(self):
        super().__init__()
        self.backbone = BNBackbone()
        self.head = nn.Sequential(nn.Linear(FEAT, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 4, bias=False))
        self.pretext_forward = "joint"  # the stage sets it from its config

    def loss(self, v1, v2):
        if self.pretext_forward == "per_view":
            return nt_xent(self.head(self.backbone(v1)), self.head(self.backbone(v2)), temperature=0.5)
        return nt_xent(*self.head(self.backbone(torch.cat([v1, v2]))).chunk(2), temperature=0.5)

    def update_target(self):
        pass


def bn_problem(seed=0):
    torch.manual_seed(seed)
    lower = BNSimCLR()
    with torch.no_grad():  # BatchNorm affine parameters away from their (1, 0) initialisation
        for m in lower.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    upper = BNBackbone()
    upper.load_state_dict(lower.backbone.state_dict())
    with torch.no_grad():
        for p in upper.parameters():
            p.add_(0.1 * torch.randn_like(p))
    head = nn.Linear(FEAT, CLASSES)
    xp = torch.randn(N_PRE, D_IN)
    xd, yd = torch.randn(N_DOWN, D_IN), torch.randint(0, CLASSES, (N_DOWN,))

    def views(idx, tag):
        g = generator(99, *tag)
        return (xp[idx] + 0.1 * torch.randn(len(idx), D_IN, generator=g),
                xp[idx] * (1 + 0.1 * torch.rand(len(idx), 1, generator=g)))

    def down(idx, tag):
        g = generator(98, *tag)
        return xd[idx] + 0.05 * torch.randn(len(idx), D_IN, generator=g), yd[idx]

    return lower, upper, head, BilevelData(N_PRE, N_DOWN, views, down, val=(xd, yd), num_classes=CLASSES)


def config(gamma, **kw):
    base = dict(PAPER_MODE, stages=3, lower_steps=3, upper_steps=2, head_warmup_epochs=2, lam=0.05, damping=0.5,
                gamma=gamma, lower_batch_size=B_P, upper_batch_size=B_D, lower_lr=0.7, lower_warmup=2,
                lower_clip=0.5, upper_lr=0.2, upper_weight_decay=0.01, upper_clip=0.3, progress=False, device="cpu")
    base.update(kw)
    return BisslConfig.embedded(paper_mode=True, **base)


# ---- the reference ---------------------------------------------------------------------------------------

def ref_lr(t, base, warmup, total):
    """The official scheduler: counter t of finished steps, the first step at the base lr (C13)."""
    if t == 0:
        return base
    if t < warmup:
        return base * t / warmup
    q = 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
    return base * q + 0.001 * base * (1 - q)


def ref_clip(grads, max_norm):
    total = torch.sqrt(sum((g ** 2).sum() for g in grads))
    coef = min(max_norm / (total.item() + 1e-6), 1.0)
    return [g * coef for g in grads]


def ref_lars(params, grads, mu, lr, wd, momentum):
    """VICReg LARS with no exclusions: trust ratio η‖p‖/‖g + wd·p‖, 1 where a norm is 0 (spec §1.7)."""
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g + wd * p
            q = 1e-3 * p.norm() / g.norm() if p.norm() > 0 and g.norm() > 0 else 1.0
            mu[i] = momentum * mu[i] + q * g
            p -= lr * mu[i]


def ref_sgd(params, grads, buf, lr, wd, momentum):
    """torch.optim.SGD with coupled weight decay: the first step's buffer is the gradient itself."""
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g + wd * p
            buf[i] = g.clone() if buf[i] is None else momentum * buf[i] + g
            p -= lr * buf[i]


def ref_layerwise_cg(A, v, iters):
    x = [torch.zeros_like(t) for t in v]
    r = [t.clone() for t in v]
    d = [t.clone() for t in v]
    for _ in range(iters):
        Ad = A(d)
        for i in range(len(v)):
            rr = (r[i] * r[i]).sum()
            alpha = rr / ((d[i] * Ad[i]).sum() + 1e-12)
            x[i] = x[i] + alpha * d[i]
            r_new = r[i] - alpha * Ad[i]
            beta = (r_new * r_new).sum() / (rr + 1e-12)
            d[i] = r_new + beta * d[i]
            r[i] = r_new
    return [torch.nan_to_num(t) for t in x]


def official_simclr(lower, v1, v2):
    """The official SimCLR loss: one backbone + projector forward per view (spec §2.3)."""
    return nt_xent(lower.head(lower.backbone(v1)), lower.head(lower.backbone(v2)), temperature=0.5)


def loader_pass(n, batch, seed, tag, epoch):
    """The batches of one pass of a DataLoader without drop_last over pass ``epoch``'s permutation."""
    order = torch.randperm(n, generator=generator(seed, tag, epoch))
    return [order[i:i + batch] for i in range(0, n, batch)]


class RefLevel:
    """One level's iterator: a fresh one (after set_epoch(stage)) when a stage starts with fewer than the
    stage's N batches left; a pass that runs out within a stage goes on with the next pass (V3)."""

    def __init__(self, n, batch, seed, tag):
        self.args = (n, batch, seed, tag)
        self.epoch, self.batches, self.used = 0, loader_pass(*self.args, 0), 0
        self.partial_taken = 0

    def start_stage(self, stage, need):
        if len(self.batches) - self.used < need:
            self.epoch, self.batches, self.used = stage, loader_pass(*self.args, stage), 0

    def take(self):
        if self.used == len(self.batches):
            self.epoch, self.batches, self.used = self.epoch + 1, loader_pass(*self.args, self.epoch + 1), 0
        self.used += 1
        self.partial_taken += len(self.batches[self.used - 1]) < self.args[1]
        return self.batches[self.used - 1]


def reference_run(c, lower, upper, head, data):
    tp, phi_p = list(lower.backbone.parameters()), list(lower.head.parameters())
    td, phi_d = list(upper.parameters()), list(head.parameters())
    lower.train(), upper.train(), head.train()
    # linear head warm-up on the frozen θ_D, in train mode (its BN statistics adapt), SGD without schedule
    buf_head = [None] * len(phi_d)
    for epoch in range(c.head_warmup_epochs):
        for b, idx in enumerate(loader_pass(data.n_downstream, c.upper_batch_size, c.seed, "bissl-head-warmup", epoch)):
            x, y = data.downstream_batch(idx, ("head", epoch, b))
            with torch.no_grad():
                feats = upper(x)
            g = torch.autograd.grad(F.cross_entropy(head(feats), y), phi_d)
            ref_sgd(phi_d, g, buf_head, c.upper_lr, c.upper_weight_decay, c.upper_momentum)

    low = RefLevel(data.n_pretext, c.lower_batch_size, c.seed, "bissl-lower")
    up = RefLevel(data.n_downstream, c.upper_batch_size, c.seed, "bissl-upper")
    loader_len = len(up.batches)
    if loader_len >= c.upper_steps or c.upper_short_loader == "cycle":  # V3
        n_upper = c.upper_steps
    elif c.upper_short_loader == "truncate":  # V1: N_U // len epochs, run as that many steps (C9)
        n_upper = c.upper_steps // loader_len
    else:  # V2: whole passes
        n_upper = c.upper_steps // loader_len * loader_len
    warmup = c.lower_warmup if c.lower_warmup is not None else c.lower_warmup_passes * len(low.batches)
    mu = [torch.zeros_like(p) for p in tp + phi_p]
    buf = [None] * len(td + phi_d)
    t_low = t_up = 0
    for stage in range(c.stages):
        low.start_stage(stage, c.lower_steps)
        up.start_stage(stage, n_upper)
        # lower phase: LARS on L_P + (λ/2)‖θ_P − θ_D‖², clip, warm-up + cosine over T·N_L
        for _ in range(c.lower_steps):
            v1, v2 = data.pretext_views(low.take(), ("lower", t_low))
            loss = official_simclr(lower, v1, v2) + c.lam / 2 * sum(((p - d.detach()) ** 2).sum() for p, d in zip(tp, td))
            grads = ref_clip(torch.autograd.grad(loss, tp + phi_p), c.lower_clip)
            ref_lars(tp + phi_p, grads, mu, ref_lr(t_low, c.lower_lr, warmup, c.stages * c.lower_steps),
                     c.lower_weight_decay, c.lower_momentum)
            t_low += 1
        # the Hessian batch: the first batch of a fresh iterator over the current pass, new augmentations
        hb = data.pretext_views(low.batches[0], ("hessian", stage, 0))

        def A(d):  # every product from scratch: both view forwards (two BN updates), graph, double backward
            g = torch.autograd.grad(official_simclr(lower, *hb), tp, create_graph=True)
            hd = torch.autograd.grad(sum((gi * di).sum() for gi, di in zip(g, d)), tp)
            return [di + hi / (c.lam + c.damping) for di, hi in zip(d, hd)]

        # upper phase: x from the layerwise recursion, + γ·classic; clip; SGD; cosine over T·N_U
        for _ in range(n_upper):
            x, y = data.downstream_batch(up.take(), ("upper", t_up))
            g_imp = torch.autograd.grad(F.cross_entropy(head(lower.backbone(x)), y), tp + phi_d)
            hyper = ref_layerwise_cg(A, list(g_imp[:len(tp)]), c.resolved_solver_iters)
            g_cls = torch.autograd.grad(F.cross_entropy(head(upper(x)), y), td + phi_d)
            g = ref_clip([h + c.gamma * k for h, k in zip(hyper + list(g_imp[len(tp):]), g_cls)], c.upper_clip)
            ref_sgd(td + phi_d, g, buf, ref_lr(t_up, c.upper_lr, 0, c.stages * c.upper_steps),
                    c.upper_weight_decay, c.upper_momentum)
            t_up += 1
    return {"lower_steps": t_low, "upper_steps": t_up, "partial_lower": low.partial_taken, "partial_upper": up.partial_taken}


def state_of(*modules):
    """Every parameter and buffer (BN running mean, variance and batch counter), by name."""
    return {f"{i}.{k}": v for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def assert_same_state(ours, ref, tol=1e-10):
    a, b = state_of(*ours), state_of(*ref)
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype == torch.long:  # num_batches_tracked
            assert torch.equal(a[k], b[k]), (k, a[k], b[k])
        else:
            assert float((a[k] - b[k]).abs().max()) < tol, (k, float((a[k] - b[k]).abs().max()))


def run_both(cfg, problem=bn_problem):
    models = problem()
    records = list(BisslTrainer(cfg, *models).run())
    ref_models = problem()
    counts = reference_run(cfg, *ref_models)
    assert_same_state(models[:3], ref_models[:3])
    return models, records, counts


# ---- paper mode against the reference ---------------------------------------------------------------------

@pytest.mark.parametrize("gamma,warmup", [(0.01, dict(lower_warmup=2)),
                                          (1.0, dict(lower_warmup=None, lower_warmup_passes=1))])
def test_three_paper_mode_stages_with_batchnorm_and_partial_batches_equal_the_reference(gamma, warmup):
    cfg = config(gamma, **warmup)
    (lower, upper, head, _), records, counts = run_both(cfg)
    kinds = [r["kind"] for r in records]
    assert kinds.count("lower") == counts["lower_steps"] == 9 and kinds.count("upper") == counts["upper_steps"] == 6
    # the partial batches were drawn: the 6th lower batch (2 pairs) and the 4th downstream one, in stage 2
    assert counts["partial_lower"] == 1 and counts["partial_upper"] == 1 and records[0]["kind"] == "head_warmup"
    assert lower.backbone[1].num_batches_tracked > 0 and upper[1].num_batches_tracked > 0
    start = bn_problem()
    assert float((state_of(upper)["0.0.weight"] - state_of(start[1])["0.0.weight"]).abs().max()) > 1e-3


@pytest.mark.parametrize("rule,steps", [("cycle", 5), ("truncate", 1), ("whole_passes", 4)])
def test_a_downstream_loader_shorter_than_n_u_runs_as_each_version_runs_it(rule, steps):
    # 17 images in batches of 5: a loader of 4 batches against N_U = 5 (spec §2.5, C9)
    cfg = config(1.0, upper_steps=5, upper_short_loader=rule, head_warmup_epochs=1)
    _, records, counts = run_both(cfg)
    assert counts["upper_steps"] == 3 * steps
    assert [r["step"] for r in records if r["kind"] == "upper" and r["stage"] == 2] == list(range(1, steps + 1))


def test_the_bn_free_toy_still_equals_the_reference_with_batches_that_divide():
    # test_bissl's toy (no BatchNorm, 24 and 18 items in batches of 4 and 6): per-view and joint forwards agree
    cfg = config(0.01, upper_batch_size=6, head_warmup_epochs=0)
    run_both(cfg, problem=make_problem)


def test_joint_forwards_and_dropped_batches_are_not_paper_mode():
    # each departure alone moves the BN model away from the official run
    for change in (dict(pretext_forward="joint"), dict(partial_batch="drop")):
        models = bn_problem()
        list(BisslTrainer(config(1.0, **change), *models).run())
        ref = bn_problem()
        reference_run(config(1.0), *ref)
        with pytest.raises(AssertionError):
            assert_same_state(models[:3], ref[:3], tol=1e-6)


def test_a_kept_batch_of_one_sample_is_refused_before_any_step():
    lower, upper, head, data = bn_problem()
    with pytest.raises(ConfigError, match=r"upper_batch_size=8 with partial_batch='keep' leaves a last batch of 1 "
                                          r"downstream item \(17 = 2·8 \+ 1\)"):
        BisslTrainer(config(1.0, upper_batch_size=8), lower, upper, head, data)
    assert upper[1].num_batches_tracked == 0  # nothing ran


# ---- presets derive what the official code derives -----------------------------------------------------------

def test_presets_derive_the_lower_warm_up_and_the_upper_lr_from_the_sizes_they_are_given():
    iclr = BisslConfig.paper_iclr(lower_batch_size=512)
    assert (iclr.lower_warmup, iclr.lower_warmup_passes, iclr.upper_short_loader) == (None, 10, "truncate")
    lower, upper, head, data = bn_problem()
    trainer = BisslTrainer(iclr.replace(lower_batch_size=B_P, upper_batch_size=B_D, progress=False, device="cpu"),
                           lower, upper, head, data)
    assert trainer.lower_warmup == 10 * 6  # 10 passes of ⌈22 / 4⌉ = 6 batches (V1: 10·len(loader))
    assert BisslConfig.paper_iclr(lower_warmup=7).lower_warmup_passes is None
    assert BisslConfig.paper_neurips(lower_steps=10).lower_warmup == 100  # V3: 10·N_L
    assert BisslConfig.paper_neurips().lower_warmup == 200
    neurips = BisslConfig.paper_neurips(downstream="flowers102")
    assert (neurips.upper_lr, neurips.upper_weight_decay, neurips.upper_short_loader) == (0.05, 5e-4, "cycle")
    byol = BisslConfig.paper_neurips(method="byol", downstream="dtd", upper_lr=0.02)
    assert (byol.upper_lr, byol.upper_weight_decay) == (0.02, 1e-4)
    with pytest.raises(ConfigError, match="for downstream='digits' pass upper_lr and upper_weight_decay"):
        BisslConfig.paper_neurips(downstream="digits")
    assert BisslConfig.paper_neurips(downstream="digits", upper_lr=0.1, upper_weight_decay=0.0).gamma == 1.0
    with pytest.raises(ConfigError, match="exactly one of the two must be set"):
        BisslConfig.embedded(lower_warmup=3, lower_warmup_passes=2)
    for preset in (iclr, neurips, BisslConfig.embedded(paper_mode=True)):
        assert (preset.pretext_forward, preset.partial_batch, preset.nonfinite_loss) == ("per_view", "keep", "continue")


def test_a_nan_loss_stops_at_once_or_runs_on_as_the_official_code_never_saving_the_nan_state(tmp_path):
    def poisoned():
        lower, upper, head, data = bn_problem()
        views = data.pretext_views

        def nan_views(idx, tag):  # the second lower step's views are NaN
            v1, v2 = views(idx, tag)
            return (v1 * float("nan"), v2) if tag == ("lower", 1) else (v1, v2)
        data.pretext_views = nan_views
        return lower, upper, head, data

    with pytest.raises(FloatingPointError, match="lower pretext loss is nan at stage 1, step 2"):
        list(BisslTrainer(config(1.0, nonfinite_loss="raise", head_warmup_epochs=0), *poisoned(),
                          out_dir=tmp_path / "raise").run())
    trainer = BisslTrainer(config(1.0, head_warmup_epochs=0), *poisoned(), out_dir=tmp_path / "continue")
    records = []
    with pytest.raises(FloatingPointError, match="bissl checkpoint at stage 1 not written: non-finite values"), \
            pytest.warns(RuntimeWarning, match="non-finite entries in the solution replaced by torch.nan_to_num"):
        for rec in trainer.run():
            records.append(rec)
    # it trained on through the NaN (all 3 lower and 2 upper steps of stage 1), and wrote no NaN checkpoint
    assert [r["kind"] for r in records] == ["lower"] * 3 + ["upper"] * 2
    assert math.isnan(records[1]["pretext_loss"]) and not (tmp_path / "continue" / "checkpoint.pt").exists()
