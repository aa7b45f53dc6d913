"""Batched per-sample augmentation (bissl_kit.augment) vs a per-image torchvision v2 pipeline.

Both sides run the same ops on the same uint8 batch: RandomResizedCrop + horizontal flip + colour
jitter (p) (+ random grayscale for RGB) (+ low resolution (p)) + normalise, with the spec's parameters. Cases:
  * embedded: 1 channel, 28 px (Fashion-MNIST-like), crop (no flip) + brightness/contrast + low
    resolution (p 0.5, r 6..12 px), bilinear;
  * paper:    3 channels, 96 px (STL10-like), the §2.4 chain without blur/solarize (bicubic);
  * with --blur, also view 1 + view 2 of the §2.4 chain as specified (blur, solarize), both sides.
Throughput = images / median wall time of one batch over --repeats runs (after a warm-up run).
The per-image pipeline always runs on CPU (where a DataLoader would run it); the batched one on
--device. Target: batched >= 10x per-image.

    python benchmarks/augment.py --batch 256 --repeats 5 --device cpu

On a shared 2-core machine, other busy processes make torch's 2 intra-op threads wait on each
other (the batched side, not the mostly single-threaded per-image loop, slows down by 10-100x);
compare with --threads 1 when the machine is not idle.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision.transforms.v2 as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from bissl_kit.augment import (  # noqa: E402
    BLUR_TRUNCATE, SOLARIZE_THRESHOLD, AugmentSpec, augment, default_mean_std, simclr_specs,
)

TARGET_SPEEDUP = 10.0


class RandomLowResolution:
    """Per image, with probability p: resize to r×r, r uniform in lowres_size (bilinear, antialiased),
    and back to its size (bilinear)."""

    def __init__(self, p: float, sizes: tuple[int, int]):
        self.p, self.sizes = p, sizes

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return img
        r = int(torch.randint(self.sizes[0], self.sizes[1] + 1, ()))
        side = list(img.shape[-2:])
        small = T.functional.resize(img, [r, r], interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        return T.functional.resize(small, side, interpolation=T.InterpolationMode.BILINEAR, antialias=True)


def torchvision_pipeline(spec: AugmentSpec, channels: int) -> T.Compose:
    """The per-image equivalent of `spec` (torchvision v2 transforms on one C×H×W uint8 tensor)."""
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[spec.interpolation]
    ops = [T.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, interpolation=mode, antialias=True),
           T.RandomHorizontalFlip(spec.flip_p)]
    if spec.jitter_p > 0:
        ops.append(T.RandomApply([T.ColorJitter(*spec.jitter)], p=spec.jitter_p))
    if channels == 3 and spec.gray_p > 0:
        ops.append(T.RandomGrayscale(spec.gray_p))
    if spec.blur_p > 0:
        kernel = 2 * int(BLUR_TRUNCATE * spec.blur_sigma[1] + 0.999) + 1
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=spec.blur_sigma)], p=spec.blur_p))
    mean, std = (spec.mean, spec.std) if spec.mean is not None else default_mean_std(channels)
    ops.append(T.ToDtype(torch.float32, scale=True))
    if spec.lowres_p > 0:  # after the blur, on floats, as ours
        ops.append(RandomLowResolution(spec.lowres_p, spec.lowres_size))
    if spec.solarize_p > 0:  # on floats, so the threshold is the same 128/255 as ours
        ops.append(T.RandomSolarize(SOLARIZE_THRESHOLD, p=spec.solarize_p))
    ops.append(T.Normalize(mean, std))
    return T.Compose(ops)


def median_seconds(fn, repeats: int, sync, warmup=None) -> float:
    (warmup or fn)()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="images per batch (both pipelines).")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median is reported.")
    parser.add_argument("--device", default="cpu", help="device of the batched pipeline (cpu, cuda, ...); "
                        "the per-image torchvision pipeline always runs on cpu.")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op CPU threads; 0 keeps torch's default.")
    parser.add_argument("--blur", action="store_true", help="also time the full paper views 1+2 (blur, solarize).")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    paper1, paper2 = simclr_specs(96, 3, paper=True)
    no_blur = dataclasses.replace(paper1, blur_p=0.0, solarize_p=0.0)
    cases = [  # name, channels, input side, view specs
        ("embedded 1ch 28px", 1, 28, [simclr_specs(28, 1)[0]]),
        ("paper 3ch 96px", 3, 96, [no_blur]),
    ]
    if args.blur:
        cases.append(("paper 3ch 96px, views 1+2 (blur/solarize)", 3, 96, [paper1, paper2]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; batch {args.batch}, "
          f"median of {args.repeats}; per-image on cpu, batched on {device}")
    print(f"{'case':44s} {'per-image img/s':>16s} {'batched img/s':>14s} {'ratio':>7s}")
    for name, channels, side, specs in cases:
        x_cpu = torch.randint(0, 256, (args.batch, channels, side, side), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(0))
        x_dev = x_cpu.to(device)
        generator = torch.Generator().manual_seed(0)
        pipelines = [torchvision_pipeline(spec, channels) for spec in specs]
        torch.manual_seed(0)
        loop = median_seconds(lambda: [torch.stack([p(img) for img in x_cpu]) for p in pipelines],
                              args.repeats, lambda: None,
                              warmup=lambda: [p(img) for p in pipelines for img in x_cpu[:8]])
        batched = median_seconds(lambda: [augment(x_dev, spec, generator) for spec in specs], args.repeats, sync)
        n_images = args.batch * len(specs)
        speedup = loop / batched
        print(f"{name:44s} {n_images / loop:16,.0f} {n_images / batched:14,.0f} {speedup:6.1f}x"
              + ("" if speedup >= TARGET_SPEEDUP else f"  (below the {TARGET_SPEEDUP:.0f}x target)"))


if __name__ == "__main__":
    main()
