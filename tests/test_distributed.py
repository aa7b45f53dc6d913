"""Two processes (gloo, float64) against one process with the global batch (issue 7, spec §1.8, C6, C7, C12).

One module-scoped run starts 2 ranks with ``torch.multiprocessing`` on a free port (killed after
``TIMEOUT_S``); each rank runs every check in ``CHECKS`` and saves what it found; the tests compare
that with the same computation in this (single) process. The models are test_bissl's tiny BN-free
SimCLR toy and a BatchNorm variant of it, and for pre-training (SimCLR and BYOL) and fine-tuning the
real narrow ResNet; one test launches the fine-tuning CLI with ``torchrun`` itself.
"""
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from bissl_kit import distributed
from bissl_kit.bissl import FAST_MODE, BisslTrainer
from bissl_kit.implicit import HessianOperator, cg, rank_mean
from bissl_kit.losses import nt_xent
from test_bissl import D_IN, FEAT, cfg_for, flat, make_problem

WORLD = 2
TIMEOUT_S = 150
LOWER_B, UPPER_B = 4, 6  # global batches (2 + 2 pairs, 3 + 3 images per rank)


# every test here runs in float64 (conftest.float64_default restores the default afterwards)
pytestmark = pytest.mark.usefixtures("float64_default")


def rel(a, b) -> float:
    a, b = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
    return float((a - b).norm() / b.norm())


# ---- what each rank computes -------------------------------------------------------------------------

def ntxent_inputs():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    torch.manual_seed(1)
    return x1, x2, nn.Linear(5, 4)


def check_ntxent(out):
    """Per rank: its shard through a replicated projector, NT-Xent over the gathered batch."""
    x1, x2, proj = ntxent_inputs()
    loss = nt_xent(proj(distributed.shard(x1)), proj(distributed.shard(x2)), 0.5)
    grads = distributed.reduce_mean(torch.autograd.grad(loss, list(proj.parameters())))
    return {"loss": distributed.mean_value(loss.detach()), "grads": grads}


def split_inputs():
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    return torch.randn(7, 5, generator=g), torch.randint(0, 3, (7,), generator=g), nn.Linear(5, 3)


def check_split(out):
    """A partial batch of 7 on 2 ranks (4 + 3 samples): weighted local means average to the global mean."""
    x, y, lin = split_inputs()
    (xr, yr), w = distributed.split(x, y)
    loss = w * F.cross_entropy(lin(xr), yr)
    grads = distributed.reduce_mean(torch.autograd.grad(loss, list(lin.parameters())))
    return {"loss": distributed.mean_value(loss.detach()), "grads": grads, "n": len(yr)}


class _OfficialGather(torch.autograd.Function):
    """The official scheme as spec §1.8 describes it (written from that description): forward
    all-gathers; backward stacks the gradients, runs an in-place all-reduce autograd does not
    record, and keeps this rank's slice. First order it is exact; its double backward is not."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def official_simclr_loss(lower, v1, v2):
    """Every rank: the full global NT-Xent over [all z1; all z2], built by the official gather."""
    z1, z2 = lower.head(lower.backbone(torch.cat([v1, v2]))).chunk(2)
    parts = _OfficialGather.apply(torch.cat([z1, z2]))
    n = z1.shape[0]
    return nt_xent(torch.cat([p[:n] for p in parts]), torch.cat([p[n:] for p in parts]), 0.5, gather=False)


def hessian_problem():
    lower, upper, head, data = make_problem()
    idx = torch.arange(8)
    batch = data.pretext_views(idx, ("hessian", 0, 0))
    xd, yd = data.downstream_batch(torch.arange(6), ("upper", 0))
    g = torch.Generator().manual_seed(5)
    d = tuple(torch.randn(p.shape, generator=g) for p in lower.backbone.parameters())
    return lower, head, batch, (xd, yd), d


def check_hypergradient(out):
    lower, head, batch, (xd, yd), d = hessian_problem()
    params = list(lower.backbone.parameters())
    shard = tuple(distributed.shard(b) for b in batch)
    res = {}
    for mode in ("recompute", "reuse"):
        op = rank_mean(HessianOperator(lambda b: lower.loss(*b), params, shard, mode=mode, lam=1e-3, damping=1.0))
        res[f"hvp_{mode}"] = op.hvp(d)
    v_local = torch.autograd.grad(F.cross_entropy(head(lower.backbone(distributed.shard(xd))),
                                                  distributed.shard(yd)), params)
    res["v"] = v = distributed.reduce_mean(v_local)
    res["v_local"] = v_local
    # δ = 10 keeps A = I + H/(λ+δ) positive definite on this toy, so CG converges to x = A⁻¹v
    op = rank_mean(HessianOperator(lambda b: lower.loss(*b), params, shard, mode="reuse", lam=1e-3, damping=10.0))
    res["x"] = cg(op, v, max_iter=60, rtol=1e-13).x
    # the official schemes: first-order gradient and the Hessian-vector product
    off = HessianOperator(lambda b: official_simclr_loss(lower, *b), params, shard, mode="recompute", lam=1e-3,
                          damping=1.0)
    res["official_grad_mean"] = distributed.reduce_mean(
        torch.autograd.grad(official_simclr_loss(lower, *shard), params))
    res["official_hvp_local"] = off.hvp(d)                               # V1/V2: rank-local
    res["official_hvp_mean"] = distributed.reduce_mean(res["official_hvp_local"])  # V3: averaged
    # k products at once through the rank-mean operator (averaged too), and the wrapped op's rank-local ones
    op = rank_mean(HessianOperator(lambda b: lower.loss(*b), params, shard, mode="reuse"))
    res["hvp_batched"] = op.hvp_batched(batched_directions(d))
    try:
        res["hvp_batched_local"] = op.op.hvp_batched(batched_directions(d))
    except RuntimeError as e:  # vmap through the gather's collective (torch 2.14: no batching rule)
        res["hvp_batched_local"] = str(e)
    return res


def batched_directions(d):
    return tuple(torch.stack([di, 1 - 2 * di]) for di in d)


def partial_problem():
    """The toy with 17 downstream items: in batches of 6 the kept last batch of 5 splits 3 + 2 on 2 ranks."""
    lower, upper, head, data = make_problem()
    data.n_downstream = 17
    return lower, upper, head, data


def stage_configs():
    """name → (config, tolerance on the parameters after two stages)."""
    fast = {**FAST_MODE, "solver_rtol": 1e-12, "damping": 10.0}
    return {"paper": (cfg_for(1.0, lower_batch_size=LOWER_B, upper_batch_size=UPPER_B), 1e-10),
            # paper mode keeps partial last batches: 24 = 2·10 + 4 pretext pairs (2 + 2 per rank) and
            # 17 = 2·6 + 5 downstream items (3 + 2, each rank's loss weighted by its part), both drawn in stage 1
            "paper-partial": (cfg_for(1.0, lower_batch_size=10, upper_batch_size=6, upper_steps=3), 1e-10),
            "fast-previous": (cfg_for(1.0, lower_batch_size=LOWER_B, upper_batch_size=UPPER_B,
                                      **{**fast, "warm_start": "previous"}), 1e-10),
            "fast": (cfg_for(1.0, lower_batch_size=LOWER_B, upper_batch_size=UPPER_B, **fast), 1e-10),
            # deflated CG solves with a pseudo-inverse cut at √ε (bissl_kit.implicit.KrylovMemory): which
            # Krylov directions survive the cut depends on rounding, so the two sides agree to ~1e-9
            "cg-recycle": (cfg_for(1.0, lower_batch_size=LOWER_B, upper_batch_size=UPPER_B,
                                   **{**fast, "solver": "cg", "solver_iters": 5, "warm_start": "recycle"}), 1e-8)}


def check_stages(out):
    """Two stages per mode, the second one after every rank resumed from rank 0's checkpoint."""
    res = {}
    for name, (cfg, _) in stage_configs().items():
        run_dir = out / f"stage-{name}"
        problem = partial_problem if name == "paper-partial" else make_problem
        lower, upper, head, data = problem()
        trainer = BisslTrainer(cfg, lower, upper, head, data, out_dir=run_dir)
        recs = list(trainer.run(1))
        distributed.barrier()  # rank 0 has written the checkpoint
        lower2, upper2, head2, data2 = problem()
        with torch.no_grad():  # scrambled: everything must come from the checkpoint
            for m in (lower2, upper2, head2):
                for p in m.parameters():
                    p.normal_()
        resumed = BisslTrainer(cfg, lower2, upper2, head2, data2, out_dir=run_dir)
        res[f"{name}_resumed"] = resumed.resume()
        recs += list(resumed.run(1))
        res[f"{name}_params"] = flat(lower2, upper2, head2)
        res[f"{name}_stages"] = [r for r in recs if r["kind"] == "stage"]
        res[f"{name}_upper"] = [(r["implicit_loss"], r["classic_loss"]) for r in recs if r["kind"] == "upper"]
        res[f"{name}_logs"] = trainer.log is not None
        data2.val = (data2.val[0][:17], data2.val[1][:17])  # an odd count: uneven shards, none padded
        res[f"{name}_eval17"] = resumed.evaluate()
    return res


class BNBackbone(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(D_IN, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, FEAT), nn.Tanh())
        self.feat_dim = FEAT


def bn_problem():
    lower, upper, head, data = make_problem()
    torch.manual_seed(3)
    lower.backbone = BNBackbone()
    upper = BNBackbone()
    upper.load_state_dict(lower.backbone.state_dict())
    return lower, upper, head, data


def bn_configs():
    """sync_bn on and off in paper mode, and on with our default's graph reuse, restored buffers and CG.
    CG runs to convergence here: capped at 20 unconverged iterations it amplifies the rounding
    differences of the two sides to 3e-8 (the BN-free toy agrees to 1e-10 even then)."""
    kw = dict(lower_batch_size=LOWER_B, upper_batch_size=UPPER_B)
    fast = {**FAST_MODE, "warm_start": "previous", "solver_iters": 300, "solver_rtol": 1e-12, "damping": 10.0}
    return {"syncTrue": cfg_for(1.0, sync_bn=True, **kw), "syncFalse": cfg_for(1.0, sync_bn=False, **kw),
            "syncTrue-fast": cfg_for(1.0, sync_bn=True, **kw, **fast)}


def bn_stage(cfg):
    lower, upper, head, data = bn_problem()
    list(BisslTrainer(cfg, lower, upper, head, data).run(1))
    return torch.cat([flat(lower, upper, head)] + [b.reshape(-1).double() for m in (lower, upper) for b in m.buffers()])


def check_batchnorm(out):
    return {name: bn_stage(cfg) for name, cfg in bn_configs().items()}


def pretrain_config(out_dir, method="simclr"):
    from bissl_kit.pretrain import PretrainConfig
    return PretrainConfig(steps=1, batch_size=16, warmup_steps=0, width=4, proj_hidden=32, proj_dim=16, knn_every=0,
                          eval_labels_per_class=5, sync_bn=True, progress=False, device="cpu", out_dir=str(out_dir),
                          method=method)


@contextlib.contextmanager
def float32_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def pretrain_params(out_dir, method="simclr"):
    """One step of the real pre-training loop (ResNet with BatchNorm, float32)."""
    from bissl_kit.pretrain import Pretrainer
    with float32_default():
        trainer = Pretrainer(pretrain_config(out_dir, method))
        recs = list(trainer.run())
    return {"params": torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]),
            "loss": [r["loss"] for r in recs if "loss" in r], "knn": [r["knn"] for r in recs if "knn" in r],
            "ddp": type(trainer.loss_fn).__name__}


def check_pretrain(out):
    return pretrain_params(out / "pretrain")


def check_byol(out):
    return pretrain_params(out / "byol", "byol")


# ---- fine-tuning: the real ResNet from check_pretrain's checkpoint, in float64 ----------------------------

def _remove_batchnorm(module):
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _remove_batchnorm(child)
    return module


@contextlib.contextmanager
def batchnorm_free_backbones():
    """Fine-tuning loads its backbone with every BatchNorm layer replaced by the identity."""
    from bissl_kit import finetune as ft
    load = ft.load_backbone

    def without_bn(path, which=None):
        loaded = load(path, which)
        loaded.backbone = _remove_batchnorm(loaded.backbone)
        return loaded

    ft.load_backbone = without_bn
    try:
        yield
    finally:
        ft.load_backbone = load


def finetune_config(source, out_dir, **kw):
    """30 digits (3 per class) in global batches of 13: 13 (7 + 6 per rank), 13, then a kept partial 4
    (2 + 2); val 287 and test 359 images split 144 + 143 and 180 + 179."""
    from bissl_kit.finetune import FinetuneConfig
    base = {"backbone_checkpoint": str(source), "labels_per_class": 3, "epochs": 1, "batch_size": 13, "lr": 0.02,
            "checkpoint_every": 1, "progress": False, "device": "cpu", "out_dir": str(out_dir)}
    return FinetuneConfig(**{**base, **kw})


def finetune_summary(tuner, records):
    return {"params": torch.cat([t.detach().reshape(-1).double() for m in (tuner.backbone, tuner.head)
                                 for t in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]]),
            "steps": [(r["step"], r["loss"]) for r in records if r["kind"] == "step"],
            "history": tuner.history, "result": tuner.result, "ddp": type(tuner.model).__name__,
            "log": type(tuner.log).__name__}


def finetune_bn_free(source, out_dir, cut_at_step=None):
    """Two epochs without BatchNorm; with ``cut_at_step``, killed there (in epoch 2) and resumed."""
    from bissl_kit.finetune import Finetuner
    cfg = finetune_config(source, out_dir, epochs=2)
    with batchnorm_free_backbones():
        resumed_at = None
        if cut_at_step is not None:
            for rec in Finetuner(cfg).run():
                if rec["kind"] == "step" and rec["step"] == cut_at_step:
                    break
        tuner = Finetuner(cfg)
        resumed_at = tuner.epoch
        out = finetune_summary(tuner, list(tuner.run()))
    return {**out, "resumed_at": resumed_at}


def finetune_bn(source, out_dir, sync_bn):
    from bissl_kit.finetune import Finetuner
    tuner = Finetuner(finetune_config(source, out_dir, sync_bn=sync_bn))
    return finetune_summary(tuner, list(tuner.run()))


def check_finetune(out):
    distributed.barrier()  # rank 0 has written check_pretrain's checkpoint
    source, r = out / "pretrain" / "checkpoint.pt", distributed.rank()
    return {"bn_free": finetune_bn_free(source, out / "ft-bn-free", cut_at_step=5),
            # a directory per rank: the ranks other than 0 must not create theirs
            "sync_bn": finetune_bn(source, out / f"ft-sync-{r}", sync_bn=True),
            "per_rank_bn": finetune_bn(source, out / f"ft-per-rank-{r}", sync_bn=False)}


def check_benchmark(out):
    """benchmarks/stage.py under 2 ranks at the smallest size (float32, as it runs for real)."""
    import contextlib
    import importlib.util
    import io
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "stage.py"
    spec = importlib.util.spec_from_file_location("stage_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
            bench.main(["--pretrain-steps", "1", "--batch", "8", "--width", "4", "--image-size", "8",
                        "--lower-steps", "1", "--upper-steps", "1", "--modes", "official", "--ref-iters", "3",
                        "--cache", str(out / "bench-cache"), "--json", str(out / f"bench-{distributed.rank()}.json"),
                        "--threads", "1"])
    finally:
        torch.set_default_dtype(old)
    return printed.getvalue()


CHECKS = {"benchmark": check_benchmark, "pretrain": check_pretrain, "byol": check_byol, "finetune": check_finetune,
          "ntxent": check_ntxent, "split": check_split, "hypergradient": check_hypergradient, "stages": check_stages,
          "batchnorm": check_batchnorm}


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    # the official gather's backward runs an all-reduce autograd does not record, and torch says so
    warnings.filterwarnings("ignore", message="c10d::allreduce_")
    out = Path(out)
    res = {}
    try:
        distributed.init("gloo", timeout_s=TIMEOUT_S)
        res["world"] = distributed.world_size()
        res["seconds"] = {}
        for name, check in CHECKS.items():
            t0 = time.perf_counter()
            res[name] = check(out)
            res["seconds"][name] = round(time.perf_counter() - t0, 2)
    except BaseException:
        res["error"] = traceback.format_exc()
    torch.save(res, out / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} ranks did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    res = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    errors = [r["error"] for r in res if "error" in r]
    assert not errors, errors[0]
    assert [r["world"] for r in res] == [WORLD] * WORLD
    print(f"seconds per check on rank 0 (pytest -s shows them): {res[0]['seconds']}")
    return res, out


# ---- the tests ----------------------------------------------------------------------------------------

def test_nt_xent_and_its_gradient_on_two_ranks_are_the_full_batch_ones(ranks):
    res, _ = ranks
    x1, x2, proj = ntxent_inputs()
    loss = nt_xent(proj(x1), proj(x2), 0.5)
    grads = torch.autograd.grad(loss, list(proj.parameters()))
    for r in res:
        assert abs(float(r["ntxent"]["loss"] - loss.detach())) < 1e-14
        assert rel(r["ntxent"]["grads"], grads) < 1e-13


def test_a_partial_batch_split_unevenly_gives_the_full_batch_loss_and_gradient(ranks):
    res, _ = ranks
    x, y, lin = split_inputs()
    loss = F.cross_entropy(lin(x), y)
    grads = torch.autograd.grad(loss, list(lin.parameters()))
    assert [r["split"]["n"] for r in res] == [4, 3]
    for r in res:
        assert abs(float(r["split"]["loss"] - loss.detach())) < 1e-14
        assert rel(r["split"]["grads"], grads) < 1e-14


def test_hypergradient_on_two_ranks_is_the_full_batch_one(ranks):
    res, _ = ranks
    lower, head, batch, (xd, yd), d = hessian_problem()
    params = list(lower.backbone.parameters())
    op = HessianOperator(lambda b: lower.loss(*b), params, batch, mode="reuse", lam=1e-3, damping=1.0)
    hd = op.hvp(d)
    v = torch.autograd.grad(F.cross_entropy(head(lower.backbone(xd)), yd), params)
    op10 = HessianOperator(lambda b: lower.loss(*b), params, batch, mode="reuse", lam=1e-3, damping=10.0)
    x = cg(op10, v, max_iter=60, rtol=1e-13).x
    for r in res:
        h = r["hypergradient"]
        assert rel(h["hvp_recompute"], hd) < 1e-12 and rel(h["hvp_reuse"], hd) < 1e-12
        assert rel(h["v"], v) < 1e-13
        assert max(float((a - b).abs().max()) for a, b in zip(h["x"], x)) < 1e-10
        # every rank holds the same bits: CG's dot products, and so x, are identical across ranks
        assert all(torch.equal(a, b) for a, b in zip(h["x"], res[0]["hypergradient"]["x"]))


def test_the_official_schemes_are_caught(ranks):
    """What the official code computes on 2 ranks (spec §1.8): the first-order gradient through its
    gather is exact, but its Hessian-vector product is not (the backward's all-reduce is not
    recorded, so the double backward loses the cross-rank terms), averaged (V3) or rank-local
    (V1/V2); and rank-local upper gradients (V1/V2, C6) differ from the global one."""
    res, _ = ranks
    lower, head, batch, (xd, yd), d = hessian_problem()
    params = list(lower.backbone.parameters())
    full_loss = lower.loss(*batch)
    grad = torch.autograd.grad(full_loss, params)
    hd = HessianOperator(lambda b: lower.loss(*b), params, batch, mode="reuse").hvp(d)
    v = torch.autograd.grad(F.cross_entropy(head(lower.backbone(xd)), yd), params)
    errors = {}
    for rank, r in enumerate(res):
        h = r["hypergradient"]
        assert rel(h["official_grad_mean"], grad) < 1e-12  # first order: fine
        errors[f"hvp V1/V2 rank {rank}"] = rel(h["official_hvp_local"], hd)
        errors["hvp V3 (rank mean)"] = rel(h["official_hvp_mean"], hd)
        errors[f"v rank-local {rank}"] = rel(h["v_local"], v)
        errors[f"hvp ours {rank}"] = rel(h["hvp_reuse"], hd)
    print("relative errors against the single-process full batch:",
          {k: f"{e:.2e}" for k, e in errors.items()})
    assert errors["hvp V3 (rank mean)"] > 0.05 and min(errors[f"hvp V1/V2 rank {i}"] for i in range(WORLD)) > 0.05
    assert min(errors[f"v rank-local {i}"] for i in range(WORLD)) > 0.05
    assert max(errors[f"hvp ours {i}"] for i in range(WORLD)) < 1e-12


@pytest.mark.parametrize("name", ["paper", "paper-partial", "fast-previous", "fast"])
def test_two_bissl_stages_on_two_ranks_with_a_resume_equal_one_process(ranks, name):
    res, out = ranks
    cfg, tol = stage_configs()[name]
    lower, upper, head, data = (partial_problem if name == "paper-partial" else make_problem)()
    trainer = BisslTrainer(cfg, lower, upper, head, data)
    recs = list(trainer.run(2))
    params = flat(lower, upper, head)
    assert (params - flat(*make_problem()[:3])).abs().max() > 1e-3  # the stages moved the parameters
    stages = [r for r in recs if r["kind"] == "stage"]
    upper_losses = [(r["implicit_loss"], r["classic_loss"]) for r in recs if r["kind"] == "upper"]
    data.val = (data.val[0][:17], data.val[1][:17])
    eval17 = trainer.evaluate()
    for rank, r in enumerate(res):
        s = r["stages"]
        assert s[f"{name}_resumed"]
        assert float((s[f"{name}_params"] - params).abs().max()) < tol
        assert s[f"{name}_logs"] == (rank == 0)  # rank 0 alone logs and checkpoints
        n_val = 18  # N_DOWN: the val split of the toy
        for a, b in zip(s[f"{name}_stages"], stages):
            # the same number of correct predictions (one process counts in float32, hence round)
            for key in ("val_top1", "val_top5"):
                assert round(a[key] * n_val) == round(b[key] * n_val)
            assert a["pretext_loss"] == pytest.approx(b["pretext_loss"], abs=1e-12)
            assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-10)
        assert torch.allclose(torch.tensor(s[f"{name}_upper"]), torch.tensor(upper_losses), atol=1e-10, rtol=0)
        assert s[f"{name}_eval17"]["val_loss"] == pytest.approx(eval17["val_loss"], abs=1e-10)
        assert [round(s[f"{name}_eval17"][k] * 17) for k in ("val_top1", "val_top5")] == \
            [round(eval17[k] * 17) for k in ("val_top1", "val_top5")]
    logged = (out / f"stage-{name}" / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "stage"' in ln for ln in logged) == 2  # once per stage, not once per rank


def test_batchnorm_is_exact_with_sync_bn_and_per_shard_without(ranks):
    """Documented behaviour: sync_bn=True normalises with the global batch (equal to one process);
    sync_bn=False normalises each rank's shard, as the official BiSSL (spec §1.8), so the stage
    differs from one process, while the replicas stay identical (buffers averaged each stage)."""
    res, _ = ranks
    ref = {name: bn_stage(cfg) for name, cfg in bn_configs().items()}
    assert torch.equal(ref["syncTrue"], ref["syncFalse"])  # one process: sync_bn changes nothing
    for r in res:
        assert float((r["batchnorm"]["syncTrue"] - ref["syncTrue"]).abs().max()) < 1e-10
        assert float((r["batchnorm"]["syncTrue-fast"] - ref["syncTrue-fast"]).abs().max()) < 1e-10
        assert float((r["batchnorm"]["syncFalse"] - ref["syncFalse"]).abs().max()) > 1e-4
    assert torch.equal(res[0]["batchnorm"]["syncFalse"], res[1]["batchnorm"]["syncFalse"])


def test_pretraining_on_two_ranks_is_one_process_with_the_global_batch(ranks, tmp_path):
    """DDP + SyncBatchNorm + the gathered NT-Xent: one step of the real loop equals one process up to
    float32 rounding; rank 0 alone runs the k-NN monitor and writes the checkpoint."""
    res, out = ranks
    ref = pretrain_params(tmp_path / "one")
    for rank, r in enumerate(res):
        p = r["pretrain"]
        assert p["ddp"] == "DistributedDataParallel"
        assert float((p["params"] - ref["params"]).abs().max()) < 1e-5
        assert p["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert p["knn"] == (ref["knn"] if rank == 0 else [])
    assert (out / "pretrain" / "checkpoint.pt").exists()
    assert sum('"knn"' in ln for ln in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()) == 2


def test_byol_pretraining_on_two_ranks_is_one_process_with_the_global_batch(ranks, tmp_path):
    """BYOL's loss is a mean over the rank's pairs, and its target network runs without gradient:
    DDP (online network) + SyncBatchNorm (online and target) give one process's step up to float32
    rounding, as SimCLR does."""
    res, out = ranks
    ref = pretrain_params(tmp_path / "one", "byol")
    for r in res:
        p = r["byol"]
        assert p["ddp"] == "DistributedDataParallel"
        assert float((p["params"] - ref["params"]).abs().max()) < 1e-5
        assert p["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert torch.equal(res[0]["byol"]["params"], res[1]["byol"]["params"])
    assert (out / "byol" / "checkpoint.pt").exists()


def test_batched_hessian_products_through_the_reduced_operator_are_the_full_batch_ones(ranks):
    """``rank_mean(op).hvp_batched`` averages across ranks like ``hvp``. No distributed path calls it,
    but before, ``__getattr__`` handed out the wrapped operator's: through SimCLR's gather its vmap
    fails (no batching rule for the collective), and on a gather-free loss it would have returned
    rank-local products."""
    res, _ = ranks
    lower, _, batch, _, d = hessian_problem()
    params = list(lower.backbone.parameters())
    ref = HessianOperator(lambda b: lower.loss(*b), params, batch, mode="reuse").hvp_batched(batched_directions(d))
    for r in res:
        assert rel(r["hypergradient"]["hvp_batched"], ref) < 1e-12
        local = r["hypergradient"]["hvp_batched_local"]
        assert ("Batching rule not implemented" in local) if isinstance(local, str) else rel(local, ref) > 0.05


def _same_counts(a, b, n):
    return round(a * n) == round(b * n)


def test_finetuning_without_batchnorm_on_two_ranks_with_a_resume_equals_one_process(ranks, tmp_path):
    """Two epochs, every batch split unevenly (7 + 6) or a partial one kept (2 + 2), killed in epoch 2
    and resumed from rank 0's checkpoint by both ranks: the parameters, every step's global loss, and
    val/test metrics over the union of the ranks' parts are one uninterrupted process's."""
    res, out = ranks
    ref = finetune_bn_free(out / "pretrain" / "checkpoint.pt", tmp_path / "one")
    assert len(ref["steps"]) == 6 and (ref["params"] - res[0]["finetune"]["bn_free"]["params"]).abs().max() < 1e-10
    for rank, r in enumerate(res):
        f = r["finetune"]["bn_free"]
        assert f["resumed_at"] == 1 and f["ddp"] == "DistributedDataParallel"
        assert f["log"] == ("MetricsLog" if rank == 0 else "NullLog")
        assert float((f["params"] - ref["params"]).abs().max()) < 1e-10
        assert [s for s, _ in f["steps"]] == [4, 5, 6]  # the resumed part: epoch 2 redone
        assert torch.allclose(torch.tensor([v for _, v in f["steps"]]), torch.tensor([v for _, v in ref["steps"][3:]]),
                              rtol=0, atol=1e-10)
        for a, b in zip(f["history"], ref["history"], strict=True):
            assert _same_counts(a["val_top1"], b["val_top1"], 287) and _same_counts(a["val_top5"], b["val_top5"], 287)
            assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)  # one process: float32 logits
            assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-10)
        fr, rr = f["result"], ref["result"]
        assert (fr["n_val"], fr["n_test"]) == (rr["n_val"], rr["n_test"]) == (287, 359)
        for key, n in (("val_top1", 287), ("val_top5", 287), ("test_top1", 359), ("test_top5", 359)):
            assert _same_counts(fr[key], rr[key], n)
        assert fr["test_loss"] == pytest.approx(rr["test_loss"], abs=1e-6)
    assert torch.equal(res[0]["finetune"]["bn_free"]["params"], res[1]["finetune"]["bn_free"]["params"])
    logged = [json.loads(ln) for ln in (out / "ft-bn-free" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in logged if rec["kind"] == "step"] == list(range(1, 7))  # rank 0, once each
    assert torch.allclose(torch.tensor([rec["loss"] for rec in logged if rec["kind"] == "step"]),
                          torch.tensor([v for _, v in ref["steps"]]), rtol=0, atol=1e-10)


def test_finetuning_with_batchnorm_is_exact_with_sync_bn_and_per_rank_without(ranks, tmp_path):
    """Documented behaviour: sync_bn=True normalises with the global batch (one process's run to 1e-10);
    sync_bn=False normalises each rank's part, so it differs from one process, while the replicas stay
    identical (running statistics averaged every epoch). Only rank 0 writes: rank 1 was given a run
    directory of its own, and it does not exist."""
    res, out = ranks
    source = out / "pretrain" / "checkpoint.pt"
    ref = finetune_bn(source, tmp_path / "one", sync_bn=True)
    assert torch.equal(ref["params"], finetune_bn(source, tmp_path / "one-b", sync_bn=False)["params"])
    for r in res:
        assert float((r["finetune"]["sync_bn"]["params"] - ref["params"]).abs().max()) < 1e-10
        assert _same_counts(r["finetune"]["sync_bn"]["result"]["test_top1"], ref["result"]["test_top1"], 359)
        assert float((r["finetune"]["per_rank_bn"]["params"] - ref["params"]).abs().max()) > 1e-6
    assert torch.equal(res[0]["finetune"]["per_rank_bn"]["params"], res[1]["finetune"]["per_rank_bn"]["params"])
    for name in ("ft-sync", "ft-per-rank"):
        assert (out / f"{name}-0" / "checkpoint.pt").exists() and (out / f"{name}-0" / "metrics.jsonl").exists()
        assert not (out / f"{name}-1").exists()


def test_the_finetune_cli_runs_under_torchrun(ranks, tmp_path):
    """``torchrun --nproc-per-node 2 -m bissl_kit finetune ...`` (float32, gloo, SyncBatchNorm): rank 0
    alone prints and writes; the model is one process's up to float32 rounding."""
    from bissl_kit.__main__ import main
    from bissl_kit.finetune import load_finetuned
    _, out = ranks
    args = ["finetune", "--backbone-checkpoint", str(out / "pretrain" / "checkpoint.pt"), "--labels-per-class", "3",
            "--epochs", "1", "--batch-size", "13", "--lr", "0.02", "--device", "cpu", "--progress", "false",
            "--sync-bn", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "bissl_kit", *args, "--out-dir", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=Path(__file__).parents[1],
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"torchrun finetune: {time.perf_counter() - t0:.1f} s")
    assert proc.stdout.count("done: ") == 1 and "test top-1" in proc.stdout  # rank 0 alone prints
    with float32_default(), contextlib.redirect_stdout(None):
        assert main([*args, "--out-dir", str(tmp_path / "one")]) == 0
        two, one = (load_finetuned(tmp_path / d / "checkpoint.pt") for d in ("two", "one"))
    diff = max(float((a - b).abs().max()) for m in (0, 1)
               for a, b in zip(two[m].state_dict().values(), one[m].state_dict().values()) if a.is_floating_point())
    assert diff < 1e-5


def test_the_stage_benchmark_runs_on_two_ranks_and_rank_0_reports(ranks):
    res, out = ranks
    assert "Processes: 2 (torchrun; global batch 8, 4 per rank" in res[0]["benchmark"]
    assert "official" in res[0]["benchmark"] and res[1]["benchmark"] == ""
    assert (out / "bench-0.json").exists() and not (out / "bench-1.json").exists()


def test_without_a_launcher_everything_is_the_identity():
    x = torch.randn(6, 3)
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.init() is False
    assert distributed.shard(x) is x and distributed.gather_cat(x) is x and distributed.all_reduce_sum(x) is x
    assert distributed.mean_value(x) is x and distributed.eval_slice(7) == slice(0, 7)
    ts = (x, x + 1)
    assert all(a is b for a, b in zip(distributed.reduce_mean(ts), ts))
    op = object()
    assert rank_mean(op) is op
