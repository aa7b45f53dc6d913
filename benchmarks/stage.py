"""One BiSSL stage at the paper's counts: the official scheme, paper mode with graph reuse, our default.

The stage is the trainer's own (``bissl_kit.bissl.BisslTrainer``), started from one pre-trained
checkpoint with the spec's counts N_L = 20 lower steps, N_U = 8 upper steps, K = 5 solver
iterations (``--solver-iters``; the default mode's cap is its own), the head warm-up skipped so that only
the stage is timed.  Modes (``MODES``):

* ``official``: :data:`bissl_kit.bissl.PAPER_MODE`: layerwise recursion, every Hessian-vector product
  recomputed (forward + create-graph backward + double backward), BatchNorm statistics updated.
* ``paper+reuse``: the same algorithm with the gradient graph built once per stage; its parameters
  must equal the official ones (printed: max |Δ| over θ_P, φ_P, θ_D, φ_D).
* ``default``: :data:`bissl_kit.bissl.FAST_MODE`, the kit's default (one MINRES iteration per upper step).
* further named options for comparison (``--modes``).

Reported per mode: wall time of the lower phase, of the upper phase and of the stage (medians over
``--repeats``), the ratio official / mode, the Hessian-vector products, and how well each upper step
solved its system ``A x = v`` (A = I + H/(λ+δ)):

* ``res``: ‖v − A x‖/‖v‖ with A applied exactly (a fresh graph-reuse operator on the same Hessian
  batch), median / max over the N_U steps;
* ``err1``: ‖x − x*‖/‖x*‖ at upper step 1, where every mode sees the same v (θ_P, θ_D and φ_D are
  still equal across modes), against x* from MINRES run to ``--ref-rtol``; printed only when the
  reference reaches that tolerance.  MINRES rather than CG because A is indefinite here at the
  official δ = 10 (see ``bissl_kit.implicit``).

Usage: ``python benchmarks/stage.py`` (CPU: the embedded narrow ResNet-18 at 16 px);
``--device cuda`` uses ResNet-18 (width 64) at 96 px; ``--json FILE`` keeps everything.
Under torchrun (``torchrun --nproc-per-node M benchmarks/stage.py --device cuda``) every rank runs
the same stages on its shard of the same global batches (``--batch``) and rank 0 reports; the
speed-up of M processes is the ratio of the stage times of the two commands (README, "Scaling out
with torchrun").
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import device_name, flat, sync  # noqa: E402
from bissl_kit import distributed  # noqa: E402
from bissl_kit.bissl import FAST_MODE, PAPER_MODE, BisslConfig, build_trainer  # noqa: E402
from bissl_kit.implicit import HessianOperator, minres, rank_mean  # noqa: E402
from bissl_kit.pretrain import PretrainConfig, Pretrainer  # noqa: E402

OURS = dict(hvp="reuse", bn_stats="restore", nonfinite="raise")
MODES = {
    "official": dict(PAPER_MODE),
    "paper+reuse": {**PAPER_MODE, "hvp": "reuse"},
    "default": dict(FAST_MODE),
    # the default until 2026-11-28
    "reuse+cg5-tol+recycle": {**FAST_MODE, **OURS, "solver": "cg", "solver_iters": 5, "solver_rtol": 1e-2,
                              "warm_start": "recycle"},
    "reuse+minres5-tol": {**FAST_MODE, **OURS, "solver": "minres", "solver_iters": 5, "solver_rtol": 1e-2,
                          "warm_start": "none"},
    "reuse+minres2": {**FAST_MODE, **OURS, "solver": "minres", "solver_iters": 2, "solver_rtol": 1e-2, "warm_start": "none"},
    # the pretext views: one forward per view (official) against one joint forward (our default)
    "default+per-view": {**FAST_MODE, "pretext_forward": "per_view"},
    "official+joint": {**PAPER_MODE, "pretext_forward": "joint"},
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda.")
    ap.add_argument("--image-size", type=int, default=None, help="pixels (default 16 on CPU, 96 on CUDA).")
    ap.add_argument("--width", type=int, default=None, help="channels of layer1 (default 16 on CPU, 64 on CUDA).")
    ap.add_argument("--pretrain-steps", type=int, default=100,
                    help="SimCLR steps of the cached pre-training run the stage starts from.")
    ap.add_argument("--batch", type=int, default=128, help="B_P pairs per lower step and B_D images per upper step.")
    ap.add_argument("--lower-steps", type=int, default=20, help="N_L (paper 20).")
    ap.add_argument("--upper-steps", type=int, default=8, help="N_U (paper 8).")
    ap.add_argument("--solver-iters", type=int, default=5, help="K of the paper-mode solvers (paper 5).")
    ap.add_argument("--damping", type=float, default=10.0, help="δ (official 10).")
    ap.add_argument("--modes", default="official,paper+reuse,default",
                    help="comma-separated, from: " + ", ".join(MODES))
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats per mode (medians are reported).")
    ap.add_argument("--ref-rtol", type=float, default=1e-3, help="relative residual of the MINRES reference.")
    ap.add_argument("--ref-iters", type=int, default=300, help="iteration cap of the MINRES reference.")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "benchmarks"), help="folder of the pre-training run.")
    ap.add_argument("--json", default=None, help="also write all results to this JSON file.")
    ap.add_argument("--sync-bn", action="store_true",
                    help="under torchrun: BatchNorm over the global batch instead of per-rank shards.")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.image_size = args.image_size or (96 if cuda else 16)
    args.width = args.width or (64 if cuda else 16)
    for name in ("batch", "repeats", "solver_iters", "ref_iters", "pretrain_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("lower_steps", "upper_steps"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        ap.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    return args


def pretrained_checkpoint(args) -> Path:
    """The embedded pre-training config at the benchmark's size, run once and cached."""
    out = Path(args.cache) / f"stage_pretrain_w{args.width}_s{args.image_size}_steps{args.pretrain_steps}"
    cfg = PretrainConfig(image_size=args.image_size, width=args.width, small_stem=args.image_size <= 32,
                         steps=args.pretrain_steps, warmup_steps=min(30, args.pretrain_steps // 10),
                         knn_every=0, device=args.device, out_dir=str(out), progress=False)
    ckpt = out / "checkpoint.pt"
    if not (ckpt.exists() and json.loads((out / "config.json").read_text()).get("steps") == cfg.steps):
        print(f"[setup] pre-training {cfg.steps} steps into {out} ...", file=sys.stderr, flush=True)
        for _ in Pretrainer(cfg).run():
            pass
    distributed.barrier()  # under torchrun: rank 0 has written the checkpoint
    return ckpt


def stage_config(args, mode: str, ckpt: Path, out_dir: str) -> BisslConfig:
    opts = dict(MODES[mode])
    if opts["solver"] == "layerwise":
        opts["solver_iters"] = args.solver_iters
    return BisslConfig.from_dict({
        **opts, "pretrain_checkpoint": str(ckpt), "stages": 1, "lower_steps": args.lower_steps,
        "upper_steps": args.upper_steps, "head_warmup_epochs": 0, "damping": args.damping,
        "lower_batch_size": args.batch, "upper_batch_size": args.batch, "device": args.device,
        "out_dir": out_dir, "progress": False, "sync_bn": args.sync_bn})


def run_stage(cfg: BisslConfig):
    """One stage; returns the trainer, the timings and what each solve saw."""
    trainer = build_trainer(cfg, resume=False)
    seen = []
    trainer.solve_observer = lambda op, v, sol: seen.append(dict(
        batch=op.batch, v=tuple(t.detach().clone() for t in v), x=tuple(t.detach().clone() for t in sol.x),
        products=op.n_products, iterations=sol.iterations))
    device = trainer.device
    sync(device)
    t0 = time.perf_counter()
    t_lower = None
    stage_rec = None
    for rec in trainer.run(1):
        if rec["kind"] == "lower" and rec["step"] == cfg.lower_steps:
            sync(device)
            t_lower = time.perf_counter() - t0
        elif rec["kind"] == "stage" and rec["stage"] == 1:
            stage_rec = rec
    stage_s = stage_rec["seconds"]
    t_lower = t_lower if t_lower is not None else 0.0
    # products per step from the operator's running counter
    counts = [s["products"] for s in seen]
    per_step = [b - a for a, b in zip([0] + counts[:-1], counts)]
    return trainer, dict(lower_s=t_lower, upper_s=stage_s - t_lower, stage_s=stage_s,
                         products=per_step, iterations=[s["iterations"] for s in seen]), seen


def exact_operator(trainer, batch):
    """A = I + H/(λ+δ) on the stage's θ_P (unchanged by the upper phase), graph built once."""
    c = trainer.cfg
    # under torchrun `batch` is this rank's shard and the products are averaged: the global-batch A
    return rank_mean(HessianOperator(lambda b: trainer.lower.loss(*b), dict(trainer.lower.backbone.named_parameters()),
                                     batch, mode="reuse", lam=c.lam, damping=c.damping, bn_stats="restore",
                                     module=trainer.lower))


def solve_quality(trainer, seen, args):
    """Residual of every step's x; the MINRES reference of step 1 (same v in every mode)."""
    op = exact_operator(trainer, seen[0]["batch"])
    res = []
    for s in seen:
        r = flat(s["v"]) - flat(op(s["x"]))
        res.append(float(r.norm() / flat(s["v"]).norm()))
    ref = minres(op, seen[0]["v"], max_iter=args.ref_iters, rtol=args.ref_rtol)
    true_rel = float((flat(seen[0]["v"]) - flat(op(ref.x))).norm() / flat(seen[0]["v"]).norm())
    op.release()
    return res, ref, true_rel


def params_of(trainer):
    return torch.cat([p.detach().reshape(-1).double().cpu() for m in (trainer.lower, trainer.upper, trainer.head)
                      for p in m.parameters()])


def main(argv=None):
    args = parse_args(argv)
    distributed.init(device=args.device)  # under torchrun: join the process group; rank 0 alone reports
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = pretrained_checkpoint(args)
    results, ref_x, ref_info, v1 = {}, None, None, None
    params = {}
    modes = args.modes.split(",")
    runs: dict[str, list] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        # repeats interleave the modes, so that a change of load on a shared machine hits all alike
        for rep in range(args.repeats):
            for mode in modes:
                torch.manual_seed(0)
                trainer, stats, seen = run_stage(stage_config(args, mode, ckpt, f"{tmp}/{mode}-{rep}"))
                runs[mode].append(stats)
                print(f"[{mode}] repeat {rep + 1}: stage {stats['stage_s']:.1f} s", file=sys.stderr, flush=True)
                if rep:
                    continue
                out = results[mode] = dict(stats)
                res, ref, true_rel = solve_quality(trainer, seen, args)
                out["residuals"] = res
                if ref_x is None:  # step 1's system is the same in every mode: one reference serves all
                    ref_x, v1 = flat(ref.x), flat(seen[0]["v"])
                    ref_info = dict(iterations=ref.iterations, converged=ref.converged, true_rel_residual=true_rel)
                out["v1_matches_reference"] = bool(torch.allclose(flat(seen[0]["v"]), v1, rtol=1e-5, atol=1e-8))
                out["err1"] = float((flat(seen[0]["x"]) - ref_x).norm() / ref_x.norm())
                params[mode] = params_of(trainer)
                del trainer, seen
    for mode in modes:
        for key in ("lower_s", "upper_s", "stage_s"):
            results[mode][key] = statistics.median(r[key] for r in runs[mode])
            results[mode][key + "_all"] = [r[key] for r in runs[mode]]
    if "official" in params:
        for mode, p in params.items():
            results[mode]["max_param_diff_vs_official"] = float((p - params["official"]).abs().max())
    if not distributed.is_main():
        return
    report(args, results, ref_info)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), world_size=distributed.world_size(), reference=ref_info,
                                                 results=results), indent=1))


def report(args, results, ref_info):
    print(f"\nDevice: {device_name(args.device)}; torch {torch.__version__}")
    w = distributed.world_size()
    print(f"Processes: {w}" + (f" (torchrun; global batch {args.batch}, {args.batch // w} per rank; BatchNorm "
                               f"{'over the global batch' if args.sync_bn else 'per rank'})" if w > 1 else ""))
    print(f"Stage: N_L {args.lower_steps}, N_U {args.upper_steps}, K {args.solver_iters} (paper modes); "
          f"batch {args.batch}; ResNet-18 width {args.width} at {args.image_size} px, pre-trained "
          f"{args.pretrain_steps} SimCLR steps; λ = 1e-3, δ = {args.damping:g}; repeats {args.repeats}")
    ok = ref_info["converged"] and ref_info["true_rel_residual"] <= 2 * args.ref_rtol
    print(f"Reference x* (step 1): MINRES, {ref_info['iterations']} iterations, true relative residual "
          f"{ref_info['true_rel_residual']:.1e}" + ("" if ok else "  -> NOT CONVERGED: err1 not reported"))
    base = results.get("official")
    head = (f"{'mode':22s} {'lower s':>8s} {'upper s':>8s} {'stage s':>8s} {'×upper':>7s} {'×stage':>7s} "
            f"{'HVPs':>5s} {'res med':>8s} {'res max':>8s} {'err1':>8s} {'max|Δθ| vs official':>20s}")
    print(head)
    print("-" * len(head))
    for mode, r in results.items():
        sp_u = base["upper_s"] / r["upper_s"] if base else math.nan
        sp_s = base["stage_s"] / r["stage_s"] if base else math.nan
        err = f"{r['err1']:8.1e}" if ok and r["v1_matches_reference"] else f"{'n/a':>8s}"
        diff = r.get("max_param_diff_vs_official", math.nan)
        print(f"{mode:22s} {r['lower_s']:8.1f} {r['upper_s']:8.1f} {r['stage_s']:8.1f} {sp_u:7.2f} {sp_s:7.2f} "
              f"{sum(r['products']):5d} {statistics.median(r['residuals']):8.1e} {max(r['residuals']):8.1e} "
              f"{err} {diff:20.1e}")
    print("\n×: official time / mode time.  HVPs: Hessian-vector products of the upper phase.  res: "
          "‖v − Ax‖/‖v‖ over the upper steps; err1: ‖x − x*‖/‖x*‖ at upper step 1.  Times are wall-clock "
          "medians; the lower phase is the same computation in every mode.")
    for mode, r in results.items():
        print(f"  {mode}: products per step {r['products']}, solver iterations {r['iterations']}")


if __name__ == "__main__":
    main()
