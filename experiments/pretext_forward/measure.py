"""Does the default mode lose anything by sending both SimCLR/BYOL views through one forward?

The official code runs one forward per view (spec §2.3); until 2026-12-01 the kit's default mode ran
one forward of both (``pretext_forward="joint"``), since then it runs one per view. This script measures the two on the embedded
default:

    OMP_NUM_THREADS=1 python experiments/pretext_forward/measure.py speed --method simclr
    OMP_NUM_THREADS=1 python experiments/pretext_forward/measure.py train --method simclr --forward per_view --seed 0

* ``speed``: seconds per pre-training step of the embedded default (batch 256, 16 px), joint and
  per-view side by side in one process: blocks of ``--block`` steps alternate between the two
  (same model, same batches), ``--repeats`` times each; medians and their ratio.
* ``train``: the embedded default pre-training run (200 steps) with the given forward and seed; the
  k-NN monitor's records (digits val, both BN protocols).

Records are appended to ``experiments/pretext_forward/records.jsonl`` with the command, the load
average and the thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bissl_kit.pretrain import PretrainConfig, Pretrainer, read_metrics  # noqa: E402

HERE = Path(__file__).resolve().parent
RECORDS = HERE / "records.jsonl"
RUNS = ROOT / "runs" / "experiments" / "pretext_forward"


def log(rec: dict) -> None:
    rec = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": torch.get_num_threads(),
           "command": "python " + shlex.join(["experiments/pretext_forward/measure.py"] + sys.argv[1:]), **rec}
    with open(RECORDS, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cmd_speed(args) -> None:
    cfg = PretrainConfig(method=args.method, out_dir=str(RUNS / f"speed_{args.method}"), progress=False, device="cpu")
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    tr = Pretrainer(cfg)
    before = load()
    times = {"joint": [], "per_view": []}
    tr.train_step(0)  # warm-up, not timed
    step = 1
    for _ in range(args.repeats):
        for forward in times:
            tr.model.pretext_forward = forward
            t = time.perf_counter()
            for _ in range(args.block):
                tr.train_step(step)
                step += 1
            times[forward].append((time.perf_counter() - t) / args.block)
    med = {k: statistics.median(v) for k, v in times.items()}
    log({"what": "speed", "method": args.method, "batch": cfg.batch_size, "image_size": cfg.image_size,
         "s_per_step": {k: [round(x, 4) for x in v] for k, v in times.items()},
         "median_s_per_step": {k: round(v, 4) for k, v in med.items()},
         "per_view_over_joint": round(med["per_view"] / med["joint"], 3),
         "block": args.block, "repeats": args.repeats, "load_before": before, "load_after": load()})


def cmd_train(args) -> None:
    out_dir = RUNS / f"{args.method}_{args.forward}_s{args.seed}"
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = PretrainConfig(method=args.method, pretext_forward=args.forward, seed=args.seed, out_dir=str(out_dir),
                         progress=False, device="cpu")
    before = load()
    t = time.perf_counter()
    records = list(Pretrainer(cfg).run())
    steps = [r for r in records if "loss" in r]
    knn = [{"step": r["step"], "knn_by_bn": r["knn_by_bn"]} for r in read_metrics(out_dir) if "knn" in r]
    log({"what": "train", "method": args.method, "forward": args.forward, "seed": args.seed,
         "wall_s": round(time.perf_counter() - t, 1), "steps": len(steps),
         "loss_last20": round(sum(r["loss"] for r in steps[-20:]) / 20, 4),
         "knn_final": knn[-1]["knn_by_bn"], "knn": knn, "protocol": records[-1].get("protocol"),
         "load_before": before, "load_after": load()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=("speed", "train"))
    ap.add_argument("--method", choices=("simclr", "byol"), default="simclr")
    ap.add_argument("--forward", choices=("joint", "per_view"), default="joint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    {"speed": cmd_speed, "train": cmd_train}[args.cmd](args)


if __name__ == "__main__":
    main()
