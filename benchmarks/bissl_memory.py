"""Peak memory of one BiSSL stage per mode, and the largest batch that fits per mode.

Graph reuse keeps the first-order graph of the pretext loss alive through the upper phase, so its
Hessian-vector products skip a forward and a create-graph backward each; the price is memory. This
script measures that price beside the official scheme (every product recomputed) and our default:

* each (mode, batch) runs one stage of the trainer (``benchmarks/stage.py``'s config: N_L lower steps,
  N_U upper steps, the head warm-up skipped) in a **fresh child process**, so one measurement cannot
  inherit another's allocator cache;
* CUDA: the peak of ``torch.cuda.max_memory_allocated`` over the stage (what the tensors need) and of
  ``max_memory_reserved`` (what the caching allocator held); CPU: the child's peak RSS (``ru_maxrss``),
  which includes the interpreter and the libraries, so compare modes by their differences;
* ``--max-batch``: per mode, the largest batch B_P = B_D that fits, by doubling from ``--batch`` until
  the child runs out of memory and then bisecting (CUDA only; on CPU the kernel's OOM killer is no
  measurement).

Usage: ``python benchmarks/bissl_memory.py`` (CPU, the embedded narrow ResNet-18 at 16 px, batch 128);
``python benchmarks/bissl_memory.py --device cuda --max-batch`` (ResNet-18 width 64 at 96 px, batch 256:
the paper's sizes). ``--json FILE`` keeps everything. Report the card with every GPU number.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("official", "paper+reuse", "default")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda.")
    ap.add_argument("--batch", type=int, default=None, help="B_P = B_D (default 128 on CPU, 256 on CUDA).")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, from benchmarks/stage.py's MODES.")
    ap.add_argument("--lower-steps", type=int, default=2, help="N_L of the measured stage.")
    ap.add_argument("--upper-steps", type=int, default=2, help="N_U of the measured stage.")
    ap.add_argument("--solver-iters", type=int, default=5, help="K of the paper-mode solver (paper 5).")
    ap.add_argument("--max-batch", action="store_true", help="also find the largest batch per mode (CUDA).")
    ap.add_argument("--batch-cap", type=int, default=8192, help="stop the search for the largest batch here.")
    ap.add_argument("--child-timeout", type=float, default=300, help="seconds per measured stage.")
    ap.add_argument("--json", default=None, help="also write all results to this JSON file.")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: measure one mode and exit
    args = ap.parse_args(argv)
    args.batch = args.batch or (256 if args.device.startswith("cuda") else 128)
    if args.batch < 2:
        ap.error(f"--batch must be >= 2, got {args.batch}")
    if args.max_batch and not args.device.startswith("cuda"):
        ap.error("--max-batch needs --device cuda (on CPU running out of memory is the OOM killer, not a number)")
    return args


def stage_args(args):
    """benchmarks/stage.py's arguments for the same device, sizes and counts."""
    from benchmarks.stage import parse_args as stage_parse
    return stage_parse(["--device", args.device, "--batch", str(args.batch), "--lower-steps", str(args.lower_steps),
                        "--upper-steps", str(args.upper_steps), "--solver-iters", str(args.solver_iters)])


def child(args) -> dict:
    """One stage of mode ``args.child``; its peak memory as a JSON line on stdout."""
    import torch

    from benchmarks.stage import pretrained_checkpoint, stage_config
    from bissl_kit.bissl import build_trainer
    sargs = stage_args(args)
    ckpt = pretrained_checkpoint(sargs)
    cuda = args.device.startswith("cuda")
    out = {"mode": args.child, "batch": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = stage_config(sargs, args.child, ckpt, tmp)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            t0 = time.perf_counter()
            # the trainer's own loop, without stage.py's solve observer (its copies of v and x cost memory)
            for _ in build_trainer(cfg, resume=False).run(1):
                pass
            if cuda:
                torch.cuda.synchronize()
            out["seconds"] = time.perf_counter() - t0
        except torch.OutOfMemoryError:
            out["oom"] = True
            return out
    if cuda:
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB
    return out


def measure(args, mode: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--device", args.device, "--batch", str(batch),
           "--lower-steps", str(args.lower_steps), "--upper-steps", str(args.upper_steps),
           "--solver-iters", str(args.solver_iters)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "batch": batch, "error": f"timed out after {args.child_timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or "").strip().splitlines()[-3:]
        oom = any("out of memory" in ln.lower() for ln in tail)
        return {"mode": mode, "batch": batch, **({"oom": True} if oom else {"error": " | ".join(tail)})}
    return json.loads(lines[-1])


def largest_batch(args, mode: str) -> int | None:
    """Double from --batch until out of memory, then bisect between the last fit and the first miss."""
    lo, hi = None, args.batch
    while hi <= args.batch_cap:
        r = measure(args, mode, hi)
        if r.get("oom"):
            break
        if "error" in r:
            print(f"  {mode} B={hi}: {r['error']}", file=sys.stderr)
            return lo
        lo, hi = hi, hi * 2
    else:
        return lo  # fits up to the cap
    while lo is not None and hi - lo > max(1, lo // 16):  # to within about 6 %
        mid = (lo + hi) // 2
        if measure(args, mode, mid).get("oom"):
            hi = mid
        else:
            lo = mid
    return lo


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    from benchmarks._common import device_name
    modes = args.modes.split(",")
    print(f"device: {device_name(args.device)}; batch {args.batch}; one stage of N_L={args.lower_steps}, "
          f"N_U={args.upper_steps} per mode, each in a fresh process", flush=True)
    from benchmarks.stage import pretrained_checkpoint
    pretrained_checkpoint(stage_args(args))  # cached here, so that no child's peak includes pre-training
    results = [measure(args, mode, args.batch) for mode in modes]
    base = next((r for r in results if r["mode"] == "official" and "seconds" in r), None)
    key = "peak_allocated_gib" if args.device.startswith("cuda") else "peak_rss_gib"
    print(f"\n| mode | {key} | reserved GiB | ratio to official | stage s |\n|---|---:|---:|---:|---:|")
    for r in results:
        if "seconds" not in r:
            print(f"| {r['mode']} | {'out of memory' if r.get('oom') else r.get('error')} | | | |")
            continue
        ratio = f"{r[key] / base[key]:.2f}" if base else "–"
        print(f"| {r['mode']} | {r[key]:.3f} | {r.get('peak_reserved_gib', float('nan')):.3f} | {ratio} | "
              f"{r['seconds']:.1f} |")
    if args.max_batch:
        print("\n| mode | largest batch that fits |\n|---|---:|")
        for r in results:
            r["largest_batch"] = largest_batch(args, r["mode"])
            print(f"| {r['mode']} | {r['largest_batch']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name(args.device), "args": vars(args),
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
