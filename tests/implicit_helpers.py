"""What the implicit-engine tests share: tuples of tensors as flat vectors, random systems, a tiny
network with its dense Hessian, and the official layerwise recursion written out plainly."""
import math

import torch
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

DT = torch.float64

SHAPES = [(3, 4), (5,), (2, 2, 2)]

#: random block structures for the property tests: 1-4 tensors of 1-3 dimensions of size 1-3
block_shapes = st.lists(st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4)


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
