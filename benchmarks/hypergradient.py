"""One BiSSL upper phase: the official hypergradient scheme against the engine's modes.

The paper's counts (spec §1.6): N_U = 8 upper steps, K = 5 CG iterations, one Hessian batch fixed
for the stage, A = I + H/(λ+δ) with λ = 1e-3, δ = 10.  Each upper step here does what the trainer
will do, short of the optimiser step:

* v_j = ∇_θP CE(φ_D(θ_P(x_j)), y_j) on downstream batch j (random labels; a new batch per step);
* the classic gradient ∇_θD CE(φ_D(θ_D(x_j)), y_j) through a copy θ_D of the backbone;
* the hypergradient x_j ≈ A⁻¹ v_j, by the mode under test.

Reported per mode, each repeat in its own subprocess (so that its peak memory is its own), the
repeats interleaved across modes (so that load on a shared machine hits every mode alike):
* ``hyper s``: the Hessian side (operator construction + the 8 solves); ``upper s``: the whole phase;
  both wall-clock, medians over ``--repeats``;
* ``peak MB``: CPU: peak RSS during the repeat minus the RSS just before it (the kernel's high-water
  mark VmHWM, reset through ``/proc/self/clear_refs`` before the phase; it counts every allocation
  of the process, torch's included, and glibc may keep freed memory mapped, so it is an upper bound);
  CUDA: ``max_memory_allocated`` minus the allocation before the phase;
* ``err``: ‖x_j − x*_j‖/‖x*_j‖ against a reference x*_j solved by MINRES to ``--ref-rtol`` (its
  true residual ‖v − A x*‖/‖v‖ is printed; errors are shown only when it reached the tolerance);
  ``res``: ‖v − A x_j‖/‖v‖, always; both median and max over the 8 steps.

The backbone is pre-trained first (``--pretrain-steps``, SimCLR on Fashion-MNIST, random tensors when
the data is missing; cached under ``runs/benchmarks/``), since BiSSL starts from a pre-trained one.
A is indefinite at the official δ = 10 on this backbone (README, "Benchmarks"): CG meets pᵀAp ≤ 0
there, which is why the reference is MINRES.  A larger ``--damping`` makes A positive definite.

Usage: ``python benchmarks/hypergradient.py`` (CPU default: narrow ResNet-18, 16 px, 1 channel,
batch 128); ``--device cuda`` uses the paper's ResNet-18 at 96 px, 3 channels.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import device_name, flat, sync  # noqa: E402
from bissl_kit.implicit import (  # noqa: E402
    OFFICIAL_CG_ITERS, OFFICIAL_DAMPING, OFFICIAL_LAMBDA, RECOMMENDED_SOLVER,
    HessianOperator, HypergradientSolver, hypergradient,
)
from bissl_kit.losses import nt_xent  # noqa: E402
from bissl_kit.models import Projector, build_backbone  # noqa: E402

N_UPPER = 8
N_CLASSES = 10

# name -> (HessianOperator options, HypergradientSolver options)
PAPER = dict(solver="layerwise", max_iter=OFFICIAL_CG_ITERS, warm_start="none", nonfinite="zero")
# true CG to a tolerance, capped at the official K, Krylov recycling: the default until 2026-11-28
CG_TOL = dict(solver="cg", max_iter=OFFICIAL_CG_ITERS, rtol=1e-2, atol=None, warm_start="recycle", nonfinite="raise")
MODES = {
    "official": (dict(mode="recompute", bn_stats="update"), PAPER),
    "reuse+layerwise": (dict(mode="reuse"), PAPER),
    "reuse+cg5": (dict(mode="reuse"), dict(solver="cg", max_iter=OFFICIAL_CG_ITERS, warm_start="none")),
    "reuse+cg-tol": (dict(mode="reuse"), {**CG_TOL, "warm_start": "none"}),
    "reuse+cg-tol+previous": (dict(mode="reuse"), {**CG_TOL, "warm_start": "previous"}),
    "reuse+cg-tol+recycle": (dict(mode="reuse"), {**CG_TOL, "exact_start": True}),
    "reuse+cg-tol+recycle-free": (dict(mode="reuse"), {**CG_TOL, "exact_start": False}),
    "reuse+cg2+recycle-free": (dict(mode="reuse"), {**CG_TOL, "max_iter": 2, "exact_start": False}),
    "reuse+minres-tol": (dict(mode="reuse"), dict(solver="minres", max_iter=OFFICIAL_CG_ITERS, rtol=1e-2,
                                                  warm_start="none")),
    "reuse+minres-tol+previous": (dict(mode="reuse"), dict(solver="minres", max_iter=OFFICIAL_CG_ITERS, rtol=1e-2,
                                                           warm_start="previous")),
    "reuse+minres2": (dict(mode="reuse"), {**RECOMMENDED_SOLVER, "max_iter": 2}),
    "reuse+minres1": (dict(mode="reuse"), dict(RECOMMENDED_SOLVER)),
}
DEFAULT_MODE = "reuse+minres1"  # the kit's default: RECOMMENDED_SOLVER


# --- setup ----------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Model
    ap.add_argument("--arch", default=None, help="backbone: resnet18 or resnet50 (default resnet18).")
    ap.add_argument("--width", type=int, default=None,
                    help="channels of layer1; 16 = narrow CPU default, 64 = standard (default: 16 on CPU, 64 on CUDA).")
    ap.add_argument("--image-size", type=int, default=None,
                    help="image side in pixels (default: 16 on CPU, the embedded default; 96 on CUDA).")
    ap.add_argument("--channels", type=int, default=None, help="1 or 3 image channels (default: 1 on CPU, 3 on CUDA).")
    # Data
    ap.add_argument("--batch", type=int, default=128,
                    help="pairs in the Hessian (pretext) batch and images per downstream batch.")
    ap.add_argument("--pretrain-steps", type=int, default=100,
                    help="SimCLR steps before the phase (0 = random initialisation; see the module docstring).")
    ap.add_argument("--pretrain-batch", type=int, default=256, help="pairs per pre-training step.")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model, the data and the labels.")
    # Solver
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated modes to run, from: " + ", ".join(MODES))
    ap.add_argument("--rtol", type=float, default=CG_TOL["rtol"],
                    help="relative residual tolerance of the cg-tol modes.")
    ap.add_argument("--max-iter", type=int, default=CG_TOL["max_iter"],
                    help="iteration cap of the cg-tol modes.")
    ap.add_argument("--damping", type=float, default=OFFICIAL_DAMPING,
                    help="δ in A = I + H/(λ+δ); the official 10 gives an indefinite A on the pre-trained CPU backbone.")
    ap.add_argument("--ref-rtol", type=float, default=3e-4,
                    help="relative residual of the reference solve (float32 CG stagnates near 1e-4).")
    ap.add_argument("--ref-max-iter", type=int, default=100,
                    help="iteration cap of each reference solve; 0 = no reference (residuals only).")
    # Running
    ap.add_argument("--device", default="cpu", help="cpu or cuda.")
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats per mode (medians are reported).")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "benchmarks"),
                    help="folder for the pre-trained state and the reference solutions.")
    ap.add_argument("--json", default=None, help="also write all results to this JSON file.")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--state", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.arch = args.arch or "resnet18"
    args.width = args.width or (64 if cuda else 16)
    args.image_size = args.image_size or (96 if cuda else 16)
    args.channels = args.channels or (3 if cuda else 1)
    if args.ref_max_iter < 0:
        ap.error(f"--ref-max-iter must be >= 0, got {args.ref_max_iter}")
    for name in ("batch", "repeats", "max_iter", "pretrain_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.pretrain_steps < 0:
        ap.error(f"--pretrain-steps must be >= 0, got {args.pretrain_steps}")
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        ap.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    return args


class Problem:
    """Backbone θ_P, projector φ_P, head φ_D, θ_D = copy of θ_P, the Hessian batch, the 8 downstream batches."""

    def __init__(self, args, state=None):
        self.device = torch.device(args.device)
        torch.manual_seed(args.seed)
        small = args.image_size <= 32
        self.backbone = build_backbone(args.arch, in_channels=args.channels, width=args.width,
                                       small_stem=small).to(self.device)
        self.projector = Projector(self.backbone.feat_dim).to(self.device)
        self.head = torch.nn.Linear(self.backbone.feat_dim, N_CLASSES).to(self.device)
        if state is not None:
            self.backbone.load_state_dict(state["backbone"])
            self.projector.load_state_dict(state["projector"])
            self.head.load_state_dict(state["head"])
        self.backbone_D = copy.deepcopy(self.backbone)
        self.images = load_images(args)
        gen = torch.Generator().manual_seed(args.seed + 1)
        self.hessian_batch = self.views(args.batch, gen)
        self.downstream = []
        for _ in range(N_UPPER):
            x, _ = self.views(args.batch, gen)
            y = torch.randint(0, N_CLASSES, (args.batch,), generator=gen)
            self.downstream.append((x, y.to(self.device)))
        self.params = dict(self.backbone.named_parameters())
        self.damping = args.damping

    def residuals(self, xs):
        """‖v_j − A x_j‖/‖v_j‖ for the phase's solutions (reuse operator, BN buffers untouched)."""
        op = HessianOperator(self.pretext_loss, self.params, self.hessian_batch, module=self.backbone,
                             damping=self.damping)
        out = []
        for j, x in enumerate(xs):
            v, _ = self.rhs(j)
            out.append(float(torch.linalg.vector_norm(flat(v) - flat(op(x))) / torch.linalg.vector_norm(flat(v))))
        op.release()
        return out

    def views(self, n, gen):
        idx = torch.randint(0, len(self.images), (n,), generator=gen)
        x = self.images[idx]
        if x.dtype == torch.uint8:
            from bissl_kit.augment import simclr_specs, two_views
            s1, s2 = simclr_specs(x.shape[-1], x.shape[1])
            v1, v2 = two_views(x, s1, s2, gen)
        else:  # random tensors: "views" are the same noise plus independent noise
            v1 = x + 0.1 * torch.randn(x.shape, generator=gen)
            v2 = x + 0.1 * torch.randn(x.shape, generator=gen)
        return v1.to(self.device), v2.to(self.device)

    def pretext_loss(self, batch):
        v1, v2 = batch
        z1, z2 = self.projector(self.backbone(torch.cat([v1, v2]))).chunk(2)
        return nt_xent(z1, z2)

    def rhs(self, j):
        """v_j and the classic gradient of upper step j (both backbones in train mode)."""
        x, y = self.downstream[j]
        v = torch.autograd.grad(F.cross_entropy(self.head(self.backbone(x)), y), list(self.params.values()))
        classic = torch.autograd.grad(F.cross_entropy(self.head(self.backbone_D(x)), y),
                                      list(self.backbone_D.parameters()))
        return tuple(t.detach() for t in v), classic


# enough images to draw the Hessian batch, the downstream batches and the pre-training batches from
N_IMAGES = 4096


def load_images(args):
    """N_IMAGES Fashion-MNIST training images (uint8, resized / channel-repeated as asked), or noise."""
    gen = torch.Generator().manual_seed(args.seed)
    try:
        from bissl_kit.data import load_pretext
        images = load_pretext(image_size=28, download=False)
    except Exception as e:  # noqa: BLE001 - any failure to find the data falls back to noise
        print(f"[data] Fashion-MNIST unavailable ({type(e).__name__}: {e}); using random tensors", file=sys.stderr)
        return torch.randn(N_IMAGES, args.channels, args.image_size, args.image_size, generator=gen)
    images = images[torch.randperm(len(images), generator=gen)[:N_IMAGES]]
    if args.image_size != images.shape[-1]:
        images = F.interpolate(images.float(), size=args.image_size, mode="bilinear",
                               align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return images.expand(-1, args.channels, -1, -1).contiguous()


def pretrained_state(args):
    """SimCLR pre-training (LARS, lr 1.0, wd 1e-6), cached by its settings."""
    key = (f"init_{args.arch}_w{args.width}_c{args.channels}_s{args.image_size}_seed{args.seed}"
           f"_steps{args.pretrain_steps}_b{args.pretrain_batch}.pt")
    path = Path(args.cache) / key
    if path.exists():
        return torch.load(path, map_location="cpu"), path
    from bissl_kit.optim import LARS
    prob = Problem(args)
    opt = LARS(list(prob.backbone.parameters()) + list(prob.projector.parameters()), lr=1.0, weight_decay=1e-6)
    gen = torch.Generator().manual_seed(args.seed + 2)
    t0 = time.perf_counter()
    for step in range(args.pretrain_steps):
        loss = prob.pretext_loss(prob.views(args.pretrain_batch, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == args.pretrain_steps - 1:
            print(f"[pretrain] step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    state = {k: {n: t.detach().cpu() for n, t in getattr(prob, k).state_dict().items()}
             for k in ("backbone", "projector", "head")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state, path


# --- one mode, in a child process ------------------------------------------------------------------

def current_rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss():
    """Reset the kernel's RSS high-water mark (VmHWM; Linux >= 4.0).  False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_phase(prob, op_opts, solver_opts):
    """One upper phase: 8 × (v, classic gradient, hypergradient).  Returns (xs, stats)."""
    dev = prob.device
    sync(dev)
    t_start = time.perf_counter()
    t_hyper = 0.0
    t0 = time.perf_counter()
    op = HessianOperator(prob.pretext_loss, prob.params, prob.hessian_batch, module=prob.backbone,
                         damping=prob.damping, **op_opts)
    sync(dev)
    t_hyper += time.perf_counter() - t0
    solver = HypergradientSolver(op, **solver_opts)
    xs, products, iters, negative = [], [], [], False
    for j in range(N_UPPER):
        v, _classic = prob.rhs(j)
        res = solver(v)
        t_hyper += res.seconds
        xs.append(res.x)
        products.append(res.n_products)
        iters.append(res.iterations)
        negative |= res.negative_curvature
    solver.release()
    sync(dev)
    t_upper = time.perf_counter() - t_start
    return xs, dict(hyper_s=t_hyper, upper_s=t_upper, products=products, iterations=iters,
                    loss_calls=op.n_loss_calls, graph_builds=op.n_graph_builds, negative_curvature=negative)


def child_main(args):
    payload = torch.load(args.state, map_location="cpu")
    prob = Problem(args, payload["state"])
    ref = payload["reference"]
    op_opts, solver_opts = MODES[args.child]
    if "-tol" in args.child:
        solver_opts = {**solver_opts, "rtol": args.rtol, "max_iter": args.max_iter}
    elif "cg2" in args.child:
        solver_opts = {**solver_opts, "rtol": args.rtol}
    runs = []
    for rep in range(args.repeats):
        if prob.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(prob.device)
            before = torch.cuda.memory_allocated(prob.device)
        else:
            before = current_rss_bytes()
            stats_reset = reset_peak_rss()
        xs, stats = run_phase(prob, op_opts, solver_opts)
        if prob.device.type == "cuda":
            stats["peak_mb"] = (torch.cuda.max_memory_allocated(prob.device) - before) / 2**20
        else:
            stats["peak_mb"] = max(0, peak_rss_bytes() - before) / 2**20
            stats["peak_reset"] = stats_reset
        errs = [float(torch.linalg.vector_norm(flat(x).cpu() - r) / torch.linalg.vector_norm(r))
                for x, r in zip(xs, ref)]
        stats["errors"] = errs
        if rep == 0:
            stats["residuals"] = prob.residuals(xs)
        runs.append(stats)
    out = dict(runs[0])
    for key in ("hyper_s", "upper_s"):
        out[key] = statistics.median(r[key] for r in runs)
    print("RESULT " + json.dumps(out))


# --- the parent -------------------------------------------------------------------------------------

def reference(prob, args):
    """x*_j by MINRES to ``--ref-rtol``, with the true residual of each.

    MINRES, not CG: A = I + H/(λ+δ) is indefinite on this backbone at the official δ (CG meets
    pᵀAp ≤ 0 within a few iterations and its residual grows), and MINRES is the Krylov method for
    symmetric indefinite systems; on a positive definite A it converges like CG."""
    op = HessianOperator(prob.pretext_loss, prob.params, prob.hessian_batch, module=prob.backbone,
                         damping=args.damping)
    xs, info = [], []
    for j in range(N_UPPER):
        v, _ = prob.rhs(j)
        if args.ref_max_iter == 0:
            xs.append(torch.full_like(flat(v).cpu(), float("nan")))
            info.append(dict(iterations=0, converged=False, true_rel_residual=float("nan"),
                             x_vs_v=float("nan"), negative_curvature=False))
            continue
        res = hypergradient(v, op, solver="minres", max_iter=args.ref_max_iter, rtol=args.ref_rtol)
        Ax = op(res.x)
        true_rel = float(torch.linalg.vector_norm(flat(v) - flat(Ax)) / torch.linalg.vector_norm(flat(v)))
        x_vs_v = float(torch.linalg.vector_norm(flat(res.x) - flat(v)) / torch.linalg.vector_norm(flat(v)))
        xs.append(flat(res.x).cpu())
        info.append(dict(iterations=res.iterations, converged=res.converged, true_rel_residual=true_rel,
                         x_vs_v=x_vs_v, negative_curvature=res.negative_curvature))
        print(f"[reference] step {j}: {res.iterations} iterations, true relative residual {true_rel:.1e}, "
              f"vᵀAv ≤ 0 seen: {res.negative_curvature}", file=sys.stderr, flush=True)
    op.release()
    return xs, info


def reference_valid(ref_info, args):
    """A reference is trusted only if MINRES reached its tolerance in the true residual too."""
    # in float32 the recursive residual drifts from the true one by ~1e-4 relative
    floor = max(10 * args.ref_rtol, 1e-4)
    return all(r["converged"] and r["true_rel_residual"] <= floor for r in ref_info)


def without_option(argv, name):
    """argv without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child_main(args)
    t0 = time.perf_counter()
    if args.pretrain_steps:
        state, path = pretrained_state(args)
        print(f"[setup] pre-trained state: {path}", file=sys.stderr)
    else:
        prob0 = Problem(args)
        state = {k: getattr(prob0, k).state_dict() for k in ("backbone", "projector", "head")}
        path = Path(args.cache) / f"init_{args.arch}_w{args.width}_c{args.channels}_s{args.image_size}_seed{args.seed}_random.pt"
    prob = Problem(args, state)
    n_params = sum(p.numel() for p in prob.params.values())
    ref_path = path.with_name(f"{path.stem}_ref_b{args.batch}_d{args.damping:g}_rtol{args.ref_rtol:g}"
                              f"_it{args.ref_max_iter}_minres_{args.device}.pt")
    if ref_path.exists():
        ref, ref_info = torch.load(ref_path)
        print(f"[reference] cached: {ref_path}", file=sys.stderr)
    else:
        print(f"[setup] {time.perf_counter() - t0:.0f} s; computing the reference ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        ref, ref_info = reference(prob, args)
        print(f"[reference] {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save((ref, ref_info), ref_path)
    del prob

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "payload.pt"
        torch.save({"state": state, "reference": ref}, payload)
        argv_child = without_option(without_option(list(argv if argv is not None else sys.argv[1:]), "--json"),
                                    "--repeats")
        base = [sys.executable, __file__, "--state", str(payload), "--repeats", "1"] + argv_child
        # repeats interleave the modes (official, A, B, ..., official, A, B, ...), so that a change of
        # load on a shared machine hits every mode alike instead of whichever mode ran at that time
        runs: dict[str, list] = {}
        for rep in range(args.repeats):
            for mode in args.modes.split(","):
                t0 = time.perf_counter()
                proc = subprocess.run(base + ["--child", mode], capture_output=True, text=True)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    print(f"[{mode}] failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                    continue
                runs.setdefault(mode, []).append(json.loads(line[-1][len("RESULT "):]))
                print(f"[{mode}] repeat {rep + 1}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        for mode, rs in runs.items():
            results[mode] = dict(rs[0])
            for key in ("hyper_s", "upper_s"):
                results[mode][key] = statistics.median(r[key] for r in rs)
                results[mode][key + "_all"] = [r[key] for r in rs]
            results[mode]["peak_mb"] = statistics.median(r["peak_mb"] for r in rs)

    report(args, prob_desc(args, n_params), ref_info, results)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), reference=ref_info, results=results), indent=1))


def prob_desc(args, n_params):
    return (f"{args.arch} width {args.width}, {args.channels}×{args.image_size}² px, {n_params / 1e6:.2f} M backbone "
            f"params; SimCLR Hessian batch {args.batch} pairs; {N_UPPER} upper steps; λ+δ = "
            f"{OFFICIAL_LAMBDA + args.damping:g}; pre-trained {args.pretrain_steps} steps")


def report(args, desc, ref_info, results):
    dev = torch.device(args.device)
    valid = reference_valid(ref_info, args)
    print(f"\nDevice: {device_name(dev)}; torch {torch.__version__}")
    print(f"Problem: {desc}")
    its = [r["iterations"] for r in ref_info]
    print(f"Reference: MINRES to rtol {args.ref_rtol:g}; iterations per step {its}; true relative "
          f"residual max {max(r['true_rel_residual'] for r in ref_info):.1e}; ‖x*−v‖/‖v‖ median "
          f"{statistics.median(r['x_vs_v'] for r in ref_info):.3f}; vᵀAv ≤ 0 seen: "
          f"{any(r['negative_curvature'] for r in ref_info)}")
    if not valid:
        print("  -> NO VALID REFERENCE: MINRES did not reach its tolerance, so errors are not reported; "
              "the residual ‖v − Ax‖/‖v‖ still compares the modes.")
    print(f"cg-tol modes: rtol {args.rtol:g}, max_iter {args.max_iter}\n")
    base = results.get("official")
    head = (f"{'mode':24s} {'products':>8s} {'fwd':>4s} {'hyper s':>8s} {'upper s':>8s} {'×hyper':>7s} "
            f"{'×upper':>7s} {'peak MB':>8s} {'err med':>8s} {'err max':>8s} {'res med':>8s} {'res max':>8s}")
    print(head)
    print("-" * len(head))
    for mode, r in results.items():
        sp_h = base["hyper_s"] / r["hyper_s"] if base else float("nan")
        sp_u = base["upper_s"] / r["upper_s"] if base else float("nan")
        tag = " *" if mode == DEFAULT_MODE else ""
        err = (f"{statistics.median(r['errors']):8.1e} {max(r['errors']):8.1e}" if valid
               else f"{'n/a':>8s} {'n/a':>8s}")
        print(f"{mode + tag:24s} {sum(r['products']):8d} {r['loss_calls']:4d} {r['hyper_s']:8.1f} {r['upper_s']:8.1f} "
              f"{sp_h:7.2f} {sp_u:7.2f} {r['peak_mb']:8.0f} {err} {statistics.median(r['residuals']):8.1e} "
              f"{max(r['residuals']):8.1e}")
    print("\n* = recommended default.  products: Hessian-vector products of the phase; fwd: pretext loss "
          "forwards; ×: official time / mode time (hyper = Hessian side only, upper = whole phase incl. "
          "the 8 downstream v and classic gradients); peak MB: see the module docstring; err: ‖x − x*‖/‖x*‖ "
          "against the reference; res: ‖v − Ax‖/‖v‖; both median / max over the 8 steps.")
    for mode, r in results.items():
        print(f"  {mode}: products per step {r['products']}")


if __name__ == "__main__":
    main()
