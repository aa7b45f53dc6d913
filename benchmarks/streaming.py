"""The streaming pretext loader (bissl_kit.data.pretext) against the in-memory path, on the same images.

A folder of --images JPEGs (random pixels, 128×112, so the shorter-side resize and the centre crop run)
is written to a temporary folder; the streamed side reads it through ``StepBatches`` (a DataLoader whose
workers decode, resize and crop, in the run's seeded order); the in-memory side slices the decoded tensor
of the same images by the same indices (what Fashion-MNIST does). Throughput = images of --steps batches /
median wall time over --repeats passes (each pass starts a fresh loader, so worker start-up is counted),
printed per worker count with the ratio streamed / in-memory.

    python benchmarks/streaming.py --images 512 --batch 64 --steps 8 --size 96 --workers 0 1 2 --repeats 3

What a GPU run needs is that the loader outpaces the training step: compare the streamed images/s with the
pre-training images/s of docs/benchmarks.md at the same image size.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import device_name  # noqa: E402
from bissl_kit.data import load_pretext  # noqa: E402
from bissl_kit.data.pretext import StepBatches  # noqa: E402


def write_folder(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / f"class{i % 8}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (112, 128, 3), dtype=np.uint8)).save(sub / f"{i:05d}.JPEG", quality=90)


def indices(n: int, batch: int):
    per_epoch = n // batch

    def of(step):
        epoch, i = divmod(step, per_epoch)
        return torch.randperm(n, generator=torch.Generator().manual_seed(epoch))[i * batch:(i + 1) * batch]
    return of


def timed(batches: StepBatches, steps: int) -> float:
    t0 = time.perf_counter()
    for s in range(steps):
        batches.get(s)
    batches.close()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp), args.images)
        ds = load_pretext(tmp + "/", image_size=args.size)
        memory = ds[torch.arange(len(ds))]
        of = indices(len(ds), args.batch)
        n = args.steps * args.batch
        mem = statistics.median(timed(StepBatches(memory, of, stop=args.steps), args.steps) for _ in range(args.repeats))
        print(f"{device_name('cpu')}; {args.images} JPEGs 128×112 → {args.size} px, batch {args.batch}, "
              f"{args.steps} steps, median of {args.repeats}")
        print(f"in memory (sliced tensor): {n / mem:12,.0f} images/s")
        for w in args.workers:
            t = statistics.median(timed(StepBatches(ds, of, stop=args.steps, workers=w), args.steps)
                                  for _ in range(args.repeats))
            print(f"streamed, {w} worker(s):    {n / t:12,.0f} images/s   ratio streamed/in-memory {mem / t:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
