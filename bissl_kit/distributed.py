r"""Several processes, GPUs and nodes with ``torchrun``, and one plain process without it.

Every stage calls :func:`init` first. Under ``torchrun`` (the environment holds ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) it joins the process group (NCCL when
CUDA is available, gloo otherwise) and selects the GPU ``LOCAL_RANK``; in one plain process it does
nothing, and every function below is then the identity (no copy, no rounding), so single-process
numbers are bit-identical with or without this module.

The convention: one global batch, split into equal shards
------------------------------------------------------------
A config's batch sizes are **global**; each of the W ranks takes a contiguous shard of size
B/W of the global batch (:func:`shard`), so the union of the shards is exactly the single-process
batch, with the same seeded augmentation per sample (the trainers augment the global batch and keep
the shard: augmentation draws its random parameters for the whole batch from one generator, so the
shard alone would draw different ones; it costs W× the augmentation of the shard, which is small
next to the backbone). B must be divisible by W.

Each rank computes the **loss of its shard on the scale of the global loss**: for a mean over
samples (cross-entropy, BYOL) that is the mean over its own samples; for NT-Xent it is the mean,
over its own anchors, of their cross-entropy against *all* 2B candidates of the gathered batch
(:func:`bissl_kit.losses.nt_xent`). The global loss is then the mean of the per-rank losses, and
(because the gathers below send each rank the gradient of all ranks' losses) the global gradient
is the **mean of the per-rank gradients**: what DistributedDataParallel computes, and what
:func:`all_reduce_mean_` computes by hand.

The exact hypergradient (spec §1.8, C6, C7)
-------------------------------------------
Summed over ranks, the per-rank losses are W·L, a function of the one replicated parameter vector θ.
Rank r's autograd graph computes the part of ∇(W·L) that flows through its own copy of θ. The same
holds one order higher, provided every collective in the graph has a differentiable backward: rank
r's double backward then gives the part of ∇⟨∇(W·L), d⟩ through its copy, and the mean over ranks
is the global H d. :func:`gather_cat` and :func:`all_reduce_sum` are such collectives: all-gather
and reduce-scatter are each other's adjoints (the backward of one is the other, written as an
autograd Function again), and all-reduce-sum is self-adjoint. The official ``FullGatherLayer``
instead runs an in-place ``all_reduce`` in its backward that autograd does not record; its double
backward drops the cross-rank terms of H d (40–65 % error, spec §1.8; ``tests/test_distributed.py``
measures it). :class:`bissl_kit.implicit.RankMeanOperator` averages every Hessian-vector product
across ranks with :func:`reduce_mean`, so v, every product, hence every dot product of CG, and the
solution x are the same on all ranks, and the upper gradients are averaged too (C6).

(``torch.distributed.nn.functional.all_gather`` also differentiates twice on torch 2.14 with gloo,
but it is deprecated there in favour of a private module, and on gloo its backward goes through
all-to-all; the two small Functions below use all-gather and all-reduce only.)

BatchNorm
---------
By default BatchNorm normalises each rank's shard with the shard's statistics, as the official code
does in BiSSL (spec §1.8); results then differ from one process with the global batch, and the
trainers average the running buffers across ranks (:func:`average_buffers`) so the replicas stay
identical. :func:`convert_sync_batchnorm` replaces every BatchNorm layer by :class:`SyncBatchNorm`,
which normalises with the statistics of the global batch through :func:`all_reduce_sum`: exact
against one process, on CPU (gloo) and GPU, and differentiable twice (``torch.nn.SyncBatchNorm``
is CUDA-only and its backward is not differentiable, so it cannot serve the Hessian).
"""

from __future__ import annotations

import datetime
import os
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["init", "is_distributed", "world_size", "rank", "local_rank", "is_main", "barrier",
           "check_divisible", "shard", "split", "eval_slice", "union_metrics",
           "gather_cat", "all_reduce_sum", "all_reduce_mean_", "reduce_mean", "mean_value", "sum_tensor",
           "broadcast_module", "average_buffers",
           "SyncBatchNorm", "convert_sync_batchnorm", "data_parallel", "loss_module", "NullLog"]


# ---- the process group -------------------------------------------------------------------------------

def launched() -> bool:
    """True in a process that torchrun (or another launcher setting WORLD_SIZE > 1) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(backend: str | None = None, *, device: str | None = None, timeout_s: float = 1800) -> bool:
    """Join the process group described by torchrun's environment; no-op in one process.

    Idempotent. ``backend`` defaults to NCCL when CUDA is available and ``device`` (a config's
    'auto', 'cpu', 'cuda') is not 'cpu', else gloo; with NCCL, 'cuda' then means GPU ``LOCAL_RANK``
    (so pass 'cuda' or 'auto' under torchrun, not 'cuda:N'). Returns whether this process is one
    of several."""
    if not dist.is_available():
        return False
    if not dist.is_initialized() and launched():
        if backend is None:
            on_cpu = device is not None and str(device).startswith("cpu")
            backend = "nccl" if torch.cuda.is_available() and not on_cpu else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())  # "cuda" / "auto" then mean this rank's GPU
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return is_distributed()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the only process that logs, writes checkpoints and draws figures."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ---- batches -------------------------------------------------------------------------------------------

def check_divisible(batch_size: int, what: str) -> None:
    """Raise ``ValueError`` unless the global ``batch_size`` splits into equal per-rank shards."""
    w = world_size()
    if batch_size % w:
        raise ValueError(f"{what}={batch_size} is the global batch; it must be divisible by the world "
                         f"size {w} (per-rank batch = global batch / world size)")


def shard(x: Tensor) -> Tensor:
    """This rank's contiguous 1/W of the global batch ``x`` (dim 0); ``x`` itself in one process."""
    w = world_size()
    if w == 1:
        return x
    if len(x) % w:
        raise ValueError(f"a global batch of {len(x)} does not split into {w} equal shards")
    n = len(x) // w
    return x[rank() * n:(rank() + 1) * n]


def eval_slice(n: int) -> slice:
    """This rank's part of ``n`` evaluation samples: the parts are disjoint and cover all n (sizes
    differ by at most one; no padding, so no sample is counted twice, spec C12)."""
    w, r = world_size(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def split(*tensors: Tensor) -> tuple[tuple[Tensor, ...], float]:
    """This rank's part of a global batch of any size n ≥ W (parts as :func:`eval_slice`), and the
    weight w = W·n_r/n such that the mean over ranks of w·(mean loss over the part) is the mean loss
    over the global batch, and so the mean of the per-rank gradients its gradient. For a last,
    partial batch (fine-tuning without drop_last); full batches use :func:`shard` (weight 1).
    In one process: the tensors themselves and 1.0."""
    if not is_distributed():
        return tensors, 1.0
    n = len(tensors[0])
    if n < world_size():
        raise ValueError(f"a global batch of {n} cannot give each of the {world_size()} ranks a sample")
    part = eval_slice(n)
    return tuple(t[part] for t in tensors), world_size() * (part.stop - part.start) / n


def union_metrics(logits: Tensor, labels: Tensor, n: int) -> dict:
    """Top-1, top-5 and mean cross-entropy over the union of the ranks' parts of an evaluation set of
    ``n`` samples (each rank passes the logits of its :func:`eval_slice`): counts and loss sums are
    added across ranks, so every sample counts once (spec C12: no padding, no mean of per-rank
    means)."""
    hits = [(logits.topk(min(k, logits.shape[1]), dim=1).indices == labels[:, None]).any(1).sum() for k in (1, 5)]
    sums = torch.stack(hits + [F.cross_entropy(logits.double(), labels, reduction="sum")]).double()
    top1, top5, loss = (sum_tensor(sums) / n).tolist()
    return {"top1": top1, "top5": top5, "loss": loss}



def gather_parts(x: Tensor, n: int) -> Tensor:
    """The n rows of an evaluation set from every rank's part (:func:`eval_slice`, sizes differ by at most one),
    in order, on every rank: what a metric that is not a sum over samples (mAP) needs, so that it is the metric
    of the union (spec C12: V3 averaged per-rank mAPs). ``x`` itself in one process."""
    if not is_distributed():
        return x
    w = world_size()
    rows = -(-n // w)
    padded = torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded.contiguous())
    base, extra = divmod(n, w)
    return torch.cat([p[:base + (1 if r < extra else 0)] for r, p in enumerate(parts)])

# ---- collectives with a differentiable backward ---------------------------------------------------

class _GatherCat(torch.autograd.Function):
    """[x_0; …; x_{W-1}] on every rank. Backward: the reduce-scatter of the gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return _ReduceScatter.apply(grad)


class _ReduceScatter(torch.autograd.Function):
    """Σ_s y_s[rows of rank r] on rank r (y_s: rank s's full-size tensor). Backward: the all-gather.

    Written as all-reduce + slice so that gloo (no reduce-scatter on every build) runs it too; the
    tensors here are embeddings and gradients of embeddings, small next to a backbone."""

    @staticmethod
    def forward(ctx, y):
        y = y.contiguous().clone()
        dist.all_reduce(y)
        n = len(y) // dist.get_world_size()
        r = dist.get_rank()
        return y[r * n:(r + 1) * n].clone()

    @staticmethod
    def backward(ctx, grad):
        return _GatherCat.apply(grad)


class _AllReduceSum(torch.autograd.Function):
    """Σ_s x_s on every rank; self-adjoint, so its backward is itself (differentiable again)."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous().clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad)


def gather_cat(x: Tensor) -> Tensor:
    """The rows of every rank's ``x`` (equal shapes), concatenated in rank order; differentiable any
    number of times (the gradient reaching rank r's ``x`` is the sum over ranks of the gradients of
    its rows). ``x`` itself in one process."""
    return _GatherCat.apply(x) if is_distributed() else x


def all_reduce_sum(x: Tensor) -> Tensor:
    """Σ over ranks of ``x``, differentiable any number of times; ``x`` itself in one process."""
    return _AllReduceSum.apply(x) if is_distributed() else x


# ---- plain (non-differentiable) reductions -------------------------------------------------------

def _flat_reduce(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Mean over ranks of every tensor, with one collective per dtype (one flat buffer)."""
    w = world_size()
    out: list[Tensor | None] = [None] * len(tensors)
    by_dtype: dict = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault((t.dtype, t.device), []).append(i)
    for idx in by_dtype.values():
        buf = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.all_reduce(buf)
        buf /= w
        pos = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = buf[pos:pos + n].view_as(tensors[i])
            pos += n
    return out


def reduce_mean(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Mean over ranks of each tensor (new tensors, the same on every rank); the inputs themselves
    in one process."""
    if not is_distributed():
        return tuple(tensors)
    return tuple(_flat_reduce(list(tensors)))


def all_reduce_mean_(params: Sequence[Tensor]) -> None:
    """Replace every ``p.grad`` by its mean over ranks, in place (one collective); no-op in one
    process. Parameters without a gradient must be the same on every rank (they are skipped)."""
    if not is_distributed():
        return
    ps = [p for p in params if p.grad is not None]
    for p, g in zip(ps, _flat_reduce([p.grad for p in ps])):
        p.grad.copy_(g)


def mean_value(x: Tensor) -> Tensor:
    """The mean over ranks of a (detached) scalar or tensor; ``x`` itself in one process."""
    if not is_distributed():
        return x
    return _flat_reduce([x.detach()])[0]


def sum_tensor(x: Tensor) -> Tensor:
    """The sum over ranks of a (detached) tensor; ``x`` itself in one process."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def broadcast_module(*modules: nn.Module) -> None:
    """Parameters and buffers of rank 0 on every rank (the replicas start identical)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                dist.broadcast(t.data, 0)


def average_buffers(*modules: nn.Module) -> None:
    """BatchNorm running statistics (floating buffers) averaged across ranks, so replicas that
    normalised different shards stay identical; integer buffers (counters) are equal already."""
    if not is_distributed():
        return
    bufs = [b for m in modules for b in m.buffers() if b.is_floating_point()]
    if bufs:
        with torch.no_grad():
            for b, mean in zip(bufs, _flat_reduce(bufs)):
                b.copy_(mean)


# ---- BatchNorm over the global batch ----------------------------------------------------------------

class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose train-mode statistics are those of the global batch (all ranks).

    Two passes, each one :func:`all_reduce_sum`: the mean, then the mean squared deviation (the
    biased variance used to normalise; the running variance gets the unbiased one, as
    ``nn.BatchNorm``). The shards may differ in size (a partial last batch split by :func:`split`):
    the sample count is summed across ranks with the first pass. Differentiable any number of
    times; in eval mode, or in one process, it is ``nn.BatchNorm``'s own forward."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        # the channel sums and this shard's count in one collective (float32 at least: exact counts)
        acc = torch.promote_types(x.dtype, torch.float32)
        sums = all_reduce_sum(torch.cat([x.sum(dims).to(acc), x.new_full((1,), x.numel() // x.shape[1], dtype=acc)]))
        count = sums[-1].detach()  # values per channel in the global batch, a 0-d tensor
        mean = sums[:-1].to(x.dtype) / count
        centred = x - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1).clamp(min=1), alpha=m)
        return y


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` (in place) by :class:`SyncBatchNorm`, keeping its
    parameter tensors and buffers; returns ``module`` (or the converted layer if it is one)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new._buffers.update(module._buffers)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


# ---- first-order stages: DistributedDataParallel -------------------------------------------------------

class _LossModule(nn.Module):
    """``forward(*views) = model.loss(*views)``, so DDP (which hooks ``forward``) sees the loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model.loss(*args)


def data_parallel(model: nn.Module) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel under torchrun (gradients averaged across ranks in
    its backward), ``model`` itself in one process. For modules trained through their own
    ``forward`` (the fine-tuning classifier); first-order training only, see :func:`loss_module`."""
    if not is_distributed():
        return model
    device = next(model.parameters()).device
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def loss_module(model: nn.Module) -> Callable:
    """``model.loss`` in one process; under torchrun, the same loss through DistributedDataParallel,
    which averages the gradients across ranks during the backward (overlapping communication with
    it) and broadcasts rank 0's buffers at each forward. For first-order training only (pre-training,
    fine-tuning): DDP's gradient hooks do not see ``torch.autograd.grad`` nor double backward, which
    is why the BiSSL stage reduces its gradients by hand (:func:`all_reduce_mean_`)."""
    if not is_distributed():
        return model.loss
    return data_parallel(_LossModule(model))


class NullLog:
    """What the ranks other than 0 log: nothing (the interface of :class:`bissl_kit.rundir.MetricsLog`)."""

    def append(self, record: dict) -> None:
        pass

    def records(self) -> list[dict]:
        return []

    def repair(self, keep) -> None:
        pass

    def clear(self) -> None:
        pass
