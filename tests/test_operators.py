"""The operators of bissl_kit.implicit.operators: Hessian-vector products against autograd's Hessian,
BatchNorm side effects, and the damped map they share; float64 on CPU."""
import copy

import pytest
import torch

from bissl_kit.implicit import (OFFICIAL_DAMPING, OFFICIAL_LAMBDA, AveragedOperator, DampedOperator, HessianOperator,
                                RankMeanOperator, rank_mean)
from implicit_helpers import DT, TinyNet, dense_hessian, flat, random_tuple, tiny_setup, unflat


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


# --- the damped map, shared by every operator -------------------------------------------------------

class DenseOperator(DampedOperator):
    """H a dense matrix: the damped map, the batched products and the context manager are the base's."""

    def __init__(self, H, like, scale):
        self.H, self.like, self.scale, self.released = H, like, scale, False

    def hvp(self, d):
        return unflat(self.H @ flat(d), self.like)

    def release(self):
        self.released = True


def test_the_base_class_gives_the_damped_map_and_batched_products():
    gen = torch.Generator().manual_seed(21)
    like = random_tuple([(2, 3), (4,)], gen)
    H = torch.randn(10, 10, generator=gen, dtype=DT)
    H = H + H.T
    with DenseOperator(H, like, 0.25) as op:
        d = random_tuple([(2, 3), (4,)], gen)
        assert torch.allclose(flat(op(d)), flat(d) + 0.25 * (H @ flat(d)), rtol=1e-14, atol=1e-14)
        D = tuple(torch.randn((3,) + t.shape, generator=gen, dtype=DT) for t in like)
        batched = op.hvp_batched(D)
        for j in range(3):
            assert all(torch.equal(b[j], s) for b, s in zip(batched, op.hvp(tuple(t[j] for t in D))))
    assert op.released


def three_batches(seed):
    net, params, batch, loss_fn = tiny_setup(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    batches = [batch] + [(torch.randn(8, 3, generator=gen, dtype=DT), torch.randint(0, 2, (8,), generator=gen))
                         for _ in range(2)]
    return net, params, batches, loss_fn


def test_averaged_operator_is_the_mean_hessian_of_its_batches():
    net, params, batches, loss_fn = three_batches(22)
    H_mean = sum(dense_hessian(net, params, b, loss_fn) for b in batches) / 3
    ops = [HessianOperator(loss_fn, params, b) for b in batches]
    avg = AveragedOperator(ops)
    assert avg.names == list(params) and avg.scale == ops[0].scale
    gen = torch.Generator().manual_seed(22)
    d = random_tuple([p.shape for p in params.values()], gen)
    assert torch.allclose(flat(avg.hvp(d)), H_mean @ flat(d), rtol=1e-10, atol=1e-12)
    assert torch.allclose(flat(avg(d)), flat(d) + H_mean @ flat(d) / (OFFICIAL_LAMBDA + OFFICIAL_DAMPING),
                          rtol=1e-10, atol=1e-12)
    D = tuple(torch.randn((2,) + p.shape, generator=gen, dtype=DT) for p in params.values())
    batched = avg.hvp_batched(D)
    for j in range(2):
        single = avg.hvp(tuple(t[j] for t in D))
        assert torch.allclose(flat(tuple(t[j] for t in batched)), flat(single), rtol=1e-12, atol=1e-14)
    avg.release()
    for op in ops:
        with pytest.raises(RuntimeError, match="released"):
            op.hvp(d)


def test_averaged_operator_rejects_operators_of_different_damping():
    net, params, batches, loss_fn = three_batches(23)
    with pytest.raises(ValueError, match="must share scale"):
        AveragedOperator([HessianOperator(loss_fn, params, batches[0], damping=d) for d in (1.0, 2.0)])
    with pytest.raises(ValueError, match="at least one operator"):
        AveragedOperator([])


def test_rank_mean_operator_in_one_process_is_the_wrapped_operator():
    # without torchrun reduce_mean is the identity, so the wrapper changes no bit; under torchrun
    # tests/test_distributed.py compares it with the full-batch operator
    net, params, batch, loss_fn = tiny_setup(seed=24)
    op = HessianOperator(loss_fn, params, batch)
    assert rank_mean(op) is op
    wrapped = RankMeanOperator(op)
    assert (wrapped.names, wrapped.scale, wrapped.batch) == (op.names, op.scale, op.batch)
    gen = torch.Generator().manual_seed(24)
    d = random_tuple([p.shape for p in params.values()], gen)
    assert all(torch.equal(a, b) for a, b in zip(wrapped(d), op(d)))
    D = tuple(torch.randn((2,) + p.shape, generator=gen, dtype=DT) for p in params.values())
    batched = wrapped.hvp_batched(D)  # one product per direction
    assert wrapped.n_products == op.n_products == 4
    for j in range(2):
        assert all(torch.equal(b[j], s) for b, s in zip(batched, op.hvp(tuple(t[j] for t in D))))
    wrapped.release()
    with pytest.raises(RuntimeError, match="released"):
        op.hvp(d)
