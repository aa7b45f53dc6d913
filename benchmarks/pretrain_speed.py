"""Pre-training images/s with each speed option (bissl_kit.speed) on and off, against a measured ceiling.

One pre-training step as the kit runs it (uint8 batch on the device → the two augmented views → SimCLR loss →
backward → LARS step), at the paper's sizes by default on CUDA (ResNet-18, width 64, 96 px, batch 1024,
spec §2.2) and small ones on a CPU. The ceiling is forward + backward of the same network on synthetic
views already on the device (no augmentation, no optimiser step). All ratios are measured in one run.

    python benchmarks/pretrain_speed.py --device cuda [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import device_name, sync  # noqa: E402
from bissl_kit import speed  # noqa: E402
from bissl_kit.augment import two_views  # noqa: E402
from bissl_kit.optim import LARS  # noqa: E402
from bissl_kit.pretrain import PretrainConfig, build_model, pretext_view_specs  # noqa: E402
from bissl_kit.rng import generator  # noqa: E402

OPTIONS = {"off": {}, "bf16": {"bf16": True}, "channels_last": {"channels_last": True},
           "bf16+channels_last": {"bf16": True, "channels_last": True},
           "bf16+channels_last+compile": {"bf16": True, "channels_last": True, "compile": True}}


def measure(args, device, options: dict, ceiling: bool = False) -> float:
    cfg = PretrainConfig(width=args.width, image_size=args.image_size, small_stem=False, paper_augment=True,
                         batch_size=args.batch, device=str(device), **options)
    model = build_model(cfg, 3).to(device)
    speed.memory_format(model, cfg.channels_last)
    opt = LARS(model.parameters(), lr=0.1, weight_decay=1e-6, momentum=0.9)
    loss_fn = speed.compiled(model.loss, cfg.compile)
    specs = pretext_view_specs(cfg, 3)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8, device=device)
    fixed = [speed.inputs(torch.randn(args.batch, 3, args.image_size, args.image_size, device=device),
                          cfg.channels_last) for _ in range(2)]

    def step(i):
        if ceiling:
            v1, v2 = fixed
        else:
            v1, v2 = (speed.inputs(v, cfg.channels_last) for v in two_views(images, *specs, generator(0, "bench", i)))
        with speed.autocast(device, cfg.bf16):
            loss = loss_fn(v1, v2)
        loss.backward()
        if not ceiling:
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_target()
        else:
            model.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    sync(device)
    return args.batch * args.steps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=None, help="default 1024 on CUDA, 32 on a CPU")
    p.add_argument("--width", type=int, default=None, help="default 64 on CUDA, 16 on a CPU")
    p.add_argument("--image-size", type=int, default=None, help="default 96 on CUDA, 32 on a CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on CUDA, 3 on a CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, kernel choice)")
    p.add_argument("--options", default=",".join(o for o in OPTIONS if "compile" not in o),
                   help=f"comma-separated, from {', '.join(OPTIONS)} (compile: add it on a GPU)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.batch = args.batch or (1024 if cuda else 32)
    args.width = args.width or (64 if cuda else 16)
    args.image_size = args.image_size or (96 if cuda else 32)
    args.steps = args.steps or (10 if cuda else 3)
    print(f"{device_name(device)}: ResNet-18 width {args.width}, {args.image_size} px, batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup}")
    rows = {}
    for name in args.options.split(","):
        rows[name] = {"step": measure(args, device, OPTIONS[name]), "ceiling": measure(args, device, OPTIONS[name], True)}
    base = rows["off"]["step"] if "off" in rows else None
    print(f"{'options':<28}{'images/s':>10}{'ceiling':>10}{'of ceiling':>12}{'vs off':>8}")
    for name, r in rows.items():
        vs = f"{r['step'] / base:>8.2f}" if base else ""
        print(f"{name:<28}{r['step']:>10.1f}{r['ceiling']:>10.1f}{r['step'] / r['ceiling']:>12.2f}{vs}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name(device), "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
