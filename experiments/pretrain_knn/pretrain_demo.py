"""The issue-2 targets of the embedded pre-training default, measured with the library itself.

    OMP_NUM_THREADS=1 nice -n 5 python experiments/pretrain_knn/pretrain_demo.py speed
    OMP_NUM_THREADS=1 nice -n 5 python experiments/pretrain_knn/pretrain_demo.py random --seeds 0 1 2 3 4
    OMP_NUM_THREADS=1 nice -n 5 python experiments/pretrain_knn/pretrain_demo.py notebook --seed 0
    OMP_NUM_THREADS=1 nice -n 5 python experiments/pretrain_knn/pretrain_demo.py train --seed 1

* ``speed``: steps/s of the default with and without the low-resolution view, side by side in one
  process: blocks of ``--block`` training steps alternate between the two view chains (same model,
  same batches), ``--repeats`` times each; and the two-view augmentation alone (batch 256, median
  of 20 calls per chain, interleaved).
* ``random``: the k-NN monitor at random init, under both BN protocols (``knn_by_bn``), per seed.
* ``notebook``: notebook 01 with its defaults (headless, ``live=False``), timed from the start of
  papermill to its end, into ``runs/issue2/pretrain_s<seed>`` and ``figures/``; prints the k-NN
  records it logged.
* ``train``: the same default run without a notebook (``Pretrainer.run``), for other seeds.

Every record (with the load average before and after) is appended to runs/experiments/pretrain_demo.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bissl_kit.augment import two_views
from bissl_kit.pretrain import (
    PretrainConfig,
    Pretrainer,
    pretext_view_specs,
    read_metrics,
)
from bissl_kit.rng import generator

LOG = ROOT / "runs" / "experiments" / "pretrain_demo.jsonl"
RUNS = ROOT / "runs" / "issue2"


def log(rec: dict) -> None:
    rec = {"time": time.strftime("%H:%M:%S"), "threads": torch.get_num_threads(), **rec}
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(LOG, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cmd_speed(args) -> None:
    cfg = PretrainConfig(out_dir=str(RUNS / "speed"), progress=False, device="cpu")
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    tr = Pretrainer(cfg)
    chains = {"lowres (default)": tr.view_specs,
              "no lowres": pretext_view_specs(cfg.replace(lowres_p=0.0), tr.images.shape[1])}
    before = load()
    x = tr.batch(0)
    aug = {name: [] for name in chains}
    for i in range(20):
        for name, specs in chains.items():
            t = time.perf_counter()
            two_views(x, *specs, generator(0, "speed", i))
            aug[name].append(time.perf_counter() - t)
    step_times = {name: [] for name in chains}
    step = 0
    tr.train_step(step)  # warm-up step, not timed
    step += 1
    for _ in range(args.repeats):
        for name, specs in chains.items():
            tr.view_specs = specs
            t = time.perf_counter()
            for _ in range(args.block):
                tr.train_step(step)
                step += 1
            step_times[name].append((time.perf_counter() - t) / args.block)
    for name in chains:
        log({"what": "speed", "chain": name, "batch": cfg.batch_size, "image_size": cfg.image_size,
             "two_views_ms_median": round(1000 * statistics.median(aug[name]), 2),
             "step_s_per_block": [round(s, 3) for s in step_times[name]],
             "steps_per_s_median": round(1 / statistics.median(step_times[name]), 3),
             "block": args.block, "repeats": args.repeats, "load_before": before, "load_after": load()})


def cmd_random(args) -> None:
    for seed in args.seeds:
        before = load()
        tr = Pretrainer(PretrainConfig(seed=seed, out_dir=str(RUNS / "random"), progress=False, device="cpu"))
        rec = tr._knn_record()
        log({"what": "random_init", "seed": seed, "knn_by_bn": rec["knn_by_bn"], "protocol": rec["protocol"],
             "load_before": before, "load_after": load()})


def _knn_records(out_dir) -> list[dict]:
    return [{"step": r["step"], "knn_by_bn": r["knn_by_bn"]} for r in read_metrics(out_dir) if "knn" in r]


def cmd_notebook(args) -> None:
    from bissl_kit.notebooks import execute
    out_dir = RUNS / f"pretrain_s{args.seed}"
    shutil.rmtree(out_dir, ignore_errors=True)
    params = {"seed": args.seed, "out_dir": str(out_dir), "figures_dir": str(ROOT / "runs" / "figures"), **args.set}
    before = load()
    t = time.perf_counter()
    execute("01_pretrain", params, output_dir=RUNS / "executed")
    wall = time.perf_counter() - t
    kernel = resource.getrusage(resource.RUSAGE_CHILDREN)  # the kernel's CPU time (it has exited)
    steps = [r for r in read_metrics(out_dir) if "loss" in r]
    log({"what": "notebook01", "seed": args.seed, "params": params, "wall_s": round(wall, 1),
         "kernel_cpu_s": round(kernel.ru_utime + kernel.ru_stime, 1),
         "train_loop_s": round(steps[-1]["seconds"], 1), "steps": len(steps),
         "loss_last20": round(sum(r["loss"] for r in steps[-20:]) / 20, 4),
         "knn": _knn_records(out_dir), "load_before": before, "load_after": load()})


def cmd_train(args) -> None:
    out_dir = RUNS / f"train_s{args.seed}"
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = PretrainConfig(seed=args.seed, out_dir=str(out_dir), progress=False, device="cpu", **args.set)
    before = load()
    t, cpu = time.perf_counter(), time.process_time()
    records = list(Pretrainer(cfg).run())
    cpu = time.process_time() - cpu
    steps = [r for r in records if "loss" in r]
    log({"what": "train", "seed": args.seed, "set": args.set, "wall_s": round(time.perf_counter() - t, 1),
         "cpu_s": round(cpu, 1),
         "train_loop_s": round(steps[-1]["seconds"], 1), "steps": len(steps),
         "loss_last20": round(sum(r["loss"] for r in steps[-20:]) / 20, 4),
         "knn": _knn_records(out_dir), "load_before": before, "load_after": load()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=("speed", "random", "notebook", "train"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", nargs="*", default=[], help="PretrainConfig field=json-value")
    args = ap.parse_args()
    args.set = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    {"speed": cmd_speed, "random": cmd_random, "notebook": cmd_notebook, "train": cmd_train}[args.cmd](args)


if __name__ == "__main__":
    main()
