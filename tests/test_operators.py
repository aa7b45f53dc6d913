"""bissl_kit.implicit.operators: Hessian-vector products against autograd's Hessian, and BatchNorm side
effects; float64 on CPU."""
import copy

import pytest
import torch

from bissl_kit.implicit import OFFICIAL_DAMPING, OFFICIAL_LAMBDA, HessianOperator
from implicit_helpers import DT, TinyNet, dense_hessian, flat, random_tuple, tiny_setup


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

