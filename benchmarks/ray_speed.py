"""The committed comparison's fine-tuning workload on Ray against one process, side by side in one run.

The workload is that of ``results/run_comparison.sh`` (``results/settings.sh``): per task (digits,
fashion_mnist:50) and arm (BiSSL, compute-matched baseline), ``--trials`` search trials at the shared
candidates (:func:`bissl_kit.hpo.sample_candidates`), then ``--seeds`` final runs at the chosen (lr, wd),
the search's own seed being the chosen trial continued to its test evaluation (as :func:`bissl_kit.hpo.run_search`
does), each run ``--epochs`` epochs at batch 256. It is stated as a job graph (trials → a choice → seeds)
built from :mod:`bissl_kit.finetune` and :mod:`bissl_kit.hpo` directly, and run three times in fresh folders:

* ``sequential ×1``: the sequential executor, every job with 1 torch thread;
* ``ray 2×1``: the Ray executor on a local instance of ``--workers`` CPUs, every job with 1 thread;
* ``sequential ×2``: the sequential executor, every job with ``--workers`` threads.

The two 1-thread executors must give identical numbers (asserted); the ``--workers``-thread run may differ in
the last bits (CPU kernels reduce in a thread-count-dependent order), which is printed. Printed: wall times,
the ratios, Ray's start-up time (included in its wall time, and the ratio without it).

The backbones are stand-ins: two short pre-training runs of the embedded default architecture (one per
arm), because fine-tuning costs the same whatever the weights, and the BiSSL and matched pre-training runs
that the comparison fine-tunes are not part of this workload.

``--quick``: digits only, 3 trials, 2 seeds, 3 epochs. ``--gpu``: runs on CUDA, ``--pack`` runs per GPU
(``Resources(gpus=1/pack)``) against one at a time (``gpus=1``), both on Ray.

Usage: ``python benchmarks/ray_speed.py [--quick] [--workers 2] [--json FILE]``;
``python benchmarks/ray_speed.py --gpu --pack 4 [--quick]`` on a GPU machine.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bissl_kit.engine import Job, Ref, Resources, run_jobs  # noqa: E402

TASKS = ("digits", "fashion_mnist:50")
ARMS = ("bissl", "baseline_matched")


# ---- the jobs (imported by name in the workers: this file is the module ``ray_speed``) -----------------

def pretrain_source(out_dir: str, seed: int, device: str) -> str:
    """A stand-in backbone: the embedded default architecture after two pre-training steps."""
    from bissl_kit.pretrain import PretrainConfig, pretrain
    pretrain(PretrainConfig(steps=2, warmup_steps=1, knn_every=0, checkpoint_every=2, seed=seed, progress=False,
                            device=device, out_dir=out_dir))
    return str(Path(out_dir) / "checkpoint.pt")


@functools.lru_cache(maxsize=4)
def _data(backbone: str, task: str):
    """A task's data, loaded once per process (as the search shares it between its runs)."""
    from bissl_kit.backbones import load_backbone
    from bissl_kit.compare import parse_task
    from bissl_kit.downstream import load_data
    name, labels = parse_task(task)
    return load_data(name, load_backbone(backbone).pretrain_config, labels_per_class=labels)


def _config(backbone: str, task: str, epochs: int, device: str, **kw):
    from bissl_kit.compare import parse_task
    from bissl_kit.finetune import FinetuneConfig
    name, labels = parse_task(task)
    return FinetuneConfig(backbone_checkpoint=backbone, downstream=name, labels_per_class=labels, epochs=epochs,
                          batch_size=256, eval_every=0, select="last", device=device, progress=False, **kw)


def trial(backbone: str, task: str, epochs: int, device: str, index: int, lr: float, wd: float, out_dir: str) -> dict:
    from bissl_kit.finetune import finetune
    cfg = _config(backbone, task, epochs, device, lr=lr, weight_decay=wd, seed=0, test=False, out_dir=out_dir)
    rec = finetune(cfg, data=_data(backbone, task))
    return {"trial": index, "lr": lr, "weight_decay": wd, "run": out_dir, "status": "ok", "val_top1": rec["val_top1"],
            "val_loss": rec["val_loss"]}


def choose(trials: list) -> dict:
    from bissl_kit.hpo import select_best
    return select_best(trials)


def seed_run(backbone: str, task: str, epochs: int, device: str, chosen: dict, seed: int, out_dir: str) -> dict:
    from bissl_kit.finetune import finetune
    run = chosen["run"] if seed == 0 else out_dir  # the search's seed is the chosen trial, continued to test
    cfg = _config(backbone, task, epochs, device, lr=chosen["lr"], weight_decay=chosen["weight_decay"], seed=seed,
                  test=True, out_dir=run)
    rec = finetune(cfg, data=_data(backbone, task))
    return {k: rec[k] for k in ("val_top1", "val_loss", "test_top1", "test_loss")}


# ---- the graph ---------------------------------------------------------------------------------------------

def workload(root: Path, sources: dict, *, tasks, trials: int, seeds: int, epochs: int, device: str,
             resources: Resources) -> list[Job]:
    from bissl_kit.hpo import sample_candidates
    import ray_speed as me  # by name, so that Ray's workers import these functions instead of unpickling copies

    jobs = []
    for task in tasks:
        for arm in ARMS:
            where = root / task.replace(":", "_") / arm
            common = {"backbone": sources[arm], "task": task, "epochs": epochs, "device": device}
            keys = []
            for i, (lr, wd) in enumerate(sample_candidates(trials, seed=0)):
                key = f"{task}/{arm}/trial_{i:02d}"
                jobs.append(Job(key, me.trial, {**common, "index": i, "lr": lr, "wd": wd,
                                                "out_dir": str(where / f"trial_{i:02d}")}, resources=resources))
                keys.append(key)
            jobs.append(Job(f"{task}/{arm}/chosen", me.choose, {"trials": [Ref(k) for k in keys]}))
            for s in range(seeds):
                jobs.append(Job(f"{task}/{arm}/seed_{s}", me.seed_run,
                                {**common, "chosen": Ref(f"{task}/{arm}/chosen"), "seed": s,
                                 "out_dir": str(where / f"seed_{s}")}, resources=resources))
    return jobs


def numbers(results: dict) -> dict:
    """The results without the run folders (which differ between the executors' fresh roots)."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "run"}
        return v
    return {k: strip(v) for k, v in results.items()}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="digits only, 3 trials, 2 seeds, 3 epochs")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers (CPUs of the local instance), and the threads "
                                                              "of the multi-threaded sequential run")
    ap.add_argument("--gpu", action="store_true", help="on CUDA: --pack runs per GPU against one at a time")
    ap.add_argument("--pack", type=int, default=4, help="runs sharing one GPU in --gpu mode")
    ap.add_argument("--device", default=None, help="where the runs train (default: cuda with --gpu, else cpu); "
                                                   "--gpu --device cpu rehearses the packing on a declared GPU")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--json", default=None, help="write every number to this file")
    args = ap.parse_args(argv)
    tasks = ("digits",) if args.quick else TASKS
    trials = args.trials or (3 if args.quick else 12)
    seeds = args.seeds or (2 if args.quick else 5)
    epochs = args.epochs or (3 if args.quick else 10)
    device = args.device or ("cuda" if args.gpu else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {device} needs CUDA")

    import ray

    from bissl_kit.engine.ray_executor import start_local
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="ray_speed_"))
    sources = {arm: pretrain_source(str(root / "sources" / arm), seed, device) for seed, arm in enumerate(ARMS)}
    spec = dict(tasks=tasks, trials=trials, seeds=seeds, epochs=epochs, device=device)
    n_runs = len(tasks) * len(ARMS) * (trials + seeds - 1)
    card = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    print(f"workload: {', '.join(tasks)} × {len(ARMS)} arms × ({trials} trials + {seeds} seeds), {epochs} epochs: "
          f"{n_runs} fine-tuning runs; {card}", flush=True)
    out = {"workload": {**spec, "tasks": list(tasks), "runs": n_runs}, "device": card, "seconds": {}}

    def on_ray(name, resources, **init):
        _, t_start = timed(lambda: start_local(**init))
        try:
            res, t = timed(lambda: run_jobs(workload(root / name, sources, **spec, resources=resources), executor="ray",
                                            desc=name))
        finally:
            ray.shutdown()
        out["seconds"][name] = t + t_start
        out["seconds"][f"{name} start"] = t_start
        return res

    if not args.gpu:
        one = Resources(cpus=1)
        seq1, out["seconds"]["sequential ×1"] = timed(lambda: run_jobs(
            workload(root / "seq1", sources, **spec, resources=one), desc="sequential ×1"))
        ray_name = f"ray {args.workers}×1"
        par = on_ray(ray_name, one, num_cpus=args.workers)
        seqn, out["seconds"][f"sequential ×{args.workers}"] = timed(lambda: run_jobs(
            workload(root / "seqn", sources, **spec, resources=Resources(cpus=args.workers)), desc=f"sequential ×{args.workers}"))
        assert numbers(par) == numbers(seq1), "Ray and the sequential executor disagree at one thread per run"
        out["identical"] = {"ray vs sequential ×1": True,
                            f"sequential ×{args.workers} vs ×1": numbers(seqn) == numbers(seq1)}
        s = out["seconds"]
        warm = s[ray_name] - s[f"{ray_name} start"]
        out["ratios"] = {f"sequential ×1 / {ray_name}": s["sequential ×1"] / s[ray_name],
                         f"sequential ×{args.workers} / {ray_name}": s[f"sequential ×{args.workers}"] / s[ray_name],
                         f"sequential ×1 / {ray_name} without its start": s["sequential ×1"] / warm}
    else:
        cpus = max(args.pack, 1)
        single = on_ray("gpu 1 at a time", Resources(cpus=1, gpus=1.0), num_cpus=cpus, num_gpus=1)
        packed = on_ray(f"gpu {args.pack} per GPU", Resources(cpus=1, gpus=1.0 / args.pack), num_cpus=cpus, num_gpus=1)
        s = out["seconds"]
        out["identical"] = {"packed vs one at a time": numbers(packed) == numbers(single)}
        a, b = "gpu 1 at a time", f"gpu {args.pack} per GPU"
        out["ratios"] = {f"one at a time / {args.pack} per GPU": s[a] / s[b],
                         "the same without the starts": (s[a] - s[f"{a} start"]) / (s[b] - s[f"{b} start"])}
    for k, v in out["seconds"].items():
        print(f"{k:>40}: {v:8.1f} s")
    for k, v in out["ratios"].items():
        print(f"{k:>40}: {v:8.2f}×")
    for k, v in out["identical"].items():
        print(f"{'identical ' + k:>40}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
