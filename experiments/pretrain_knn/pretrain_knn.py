"""Why does embedded SimCLR pre-training not raise the digits val k-NN above random init?

Experiments for the foundation issue's target "pre-trained k-NN clearly above random init".
Everything here is outside the library: changes under test (feature-extraction modes, extra
augmentations) are monkeypatched/subclassed in this file only.

Usage (one run at a time, on the shared 2-core machine):

    OMP_NUM_THREADS=1 nice -n 5 python experiments/pretrain_knn/pretrain_knn.py random --seeds 0 1 2 3 4
    OMP_NUM_THREADS=1 nice -n 5 python experiments/pretrain_knn/pretrain_knn.py train --name base \
        --seeds 0 --set steps=300 --eval-at 0 100 200 300
    OMP_NUM_THREADS=1 nice -n 5 python experiments/pretrain_knn/pretrain_knn.py ckpt runs/pretrain/checkpoint.pt

Feature-extraction modes of the k-NN monitor (`MODES`):

* ``eval``   : the library's `extract_features`: eval-mode BN with the running statistics the
               backbone holds (after pre-training: EMA of the last Fashion-MNIST *augmented* batches;
               at random init: mean 0 / var 1, i.e. BN is the identity up to its affine).
* ``recal``  : BN running statistics re-estimated on the k-NN *train* split (digits train, labels
               unused, no augmentation), cumulative average (momentum=None), then eval mode.
               Only train-split images are used, so val stays untouched.
* ``fmnist`` : BN running statistics re-estimated on un-augmented Fashion-MNIST pretext images
               (5,120 of them): "the pretext distribution, without augmentation".

Results are appended as JSON lines to runs/experiments/<name>.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bissl_kit import data as data_mod  # noqa: E402
from bissl_kit.augment import normalize  # noqa: E402
from bissl_kit.evaluate import extract_features, knn_accuracy  # noqa: E402
from bissl_kit.pretrain import PretrainConfig, Pretrainer, build_model, load_pretrained  # noqa: E402

OUT = ROOT / "runs" / "experiments"
MODES = ("eval", "recal", "fmnist")
K, T = 20, 0.07


# ------------------------------------------------------------------------------------------------
# feature extraction variants
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def recalibrate_bn(backbone: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 512) -> nn.Module:
    """A copy of `backbone` whose BN running stats are the cumulative average over `images`."""
    bb = copy.deepcopy(backbone)
    for m in bb.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average = the exact mean over the batches
    bb.train()
    for i in range(0, len(images), batch_size):
        bb(normalize(images[i:i + batch_size], mean, std))
    bb.eval()
    return bb


def features(backbone, images, mode, ctx):
    mean, std = ctx["mean"], ctx["std"]
    if mode == "eval":
        bb = backbone
    elif mode == "recal":
        bb = recalibrate_bn(backbone, ctx["knn_train"].images, mean, std)
    elif mode == "fmnist":
        bb = recalibrate_bn(backbone, ctx["fmnist_bn"], mean, std)
    else:
        raise ValueError(mode)
    return extract_features(bb, images, mean=mean, std=std)


def knn_all(backbone, ctx, modes=MODES):
    out = {}
    tr, va = ctx["knn_train"], ctx["knn_val"]
    for mode in modes:
        ftr = features(backbone, tr.images, mode, ctx)
        fva = features(backbone, va.images, mode, ctx)
        out[mode] = round(knn_accuracy(ftr, tr.labels, fva, va.labels, k=K, temperature=T).accuracy * 100, 2)
    return out


def make_ctx(image_size=16, eval_dataset="digits"):
    knn_train = data_mod.load_downstream(eval_dataset, "train", image_size=image_size)
    knn_val = data_mod.load_downstream(eval_dataset, "val", image_size=image_size)
    fm = data_mod.load_pretext("fashion_mnist", image_size=image_size)
    g = torch.Generator().manual_seed(123)
    fmnist_bn = fm[torch.randperm(len(fm), generator=g)[:5120]]
    return dict(knn_train=knn_train, knn_val=knn_val, fmnist_bn=fmnist_bn, mean=(0.5,), std=(0.5,))


def pixel_knn(ctx):
    tr, va = ctx["knn_train"], ctx["knn_val"]
    f = lambda s: normalize(s.images, ctx["mean"], ctx["std"]).flatten(1)  # noqa: E731
    return round(knn_accuracy(f(tr), tr.labels, f(va), va.labels, k=K, temperature=T).accuracy * 100, 2)


def log(name, rec):
    OUT.mkdir(parents=True, exist_ok=True)
    rec = {"time": time.strftime("%H:%M:%S"), **rec}
    with open(OUT / f"{name}.jsonl", "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


# ------------------------------------------------------------------------------------------------
# augmentation variants (monkeypatched into the Pretrainer's view specs / views)
# ------------------------------------------------------------------------------------------------
def lowres(x: torch.Tensor, p: float, lo: int, hi: int, g: torch.Generator) -> torch.Tensor:
    """With probability p per sample: downsample the (normalised) view to r×r, r ~ U{lo..hi}, with
    antialiasing, and upsample back bilinearly (the look of the digits: 8×8 upscaled to 16 px)."""
    n, c, s, _ = x.shape
    apply = torch.rand(n, generator=g) < p
    res = torch.randint(lo, hi + 1, (n,), generator=g)
    out = x.clone()
    for r in res[apply].unique().tolist():
        idx = torch.nonzero(apply & (res == r)).squeeze(1)
        small = F.interpolate(x[idx], size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        out[idx] = F.interpolate(small, size=(s, s), mode="bilinear", align_corners=False)
    return out


class ExpPretrainer(Pretrainer):
    def __init__(self, cfg, aug: dict, lowres_cfg: dict | None):
        super().__init__(cfg)
        if aug:
            self.view_specs = tuple(dataclasses.replace(s, **aug) for s in self.view_specs)
        self.lowres_cfg = lowres_cfg

    def train_step(self, step):
        if not self.lowres_cfg:
            return super().train_step(step)
        from bissl_kit import pretrain as P
        orig = P.two_views
        lc = self.lowres_cfg

        def tv(x, s1, s2, g):
            v1, v2 = orig(x, s1, s2, g)
            g2 = torch.Generator().manual_seed(10_000_019 * (self.cfg.seed + 1) + step)
            return lowres(v1, lc["p"], lc["lo"], lc["hi"], g2), lowres(v2, lc["p"], lc["lo"], lc["hi"], g2)
        P.two_views = tv
        try:
            return super().train_step(step)
        finally:
            P.two_views = orig


def parse_set(items):
    out = {}
    for it in items or []:
        k, v = it.split("=", 1)
        out[k] = json.loads(v)
        if isinstance(out[k], list):
            out[k] = tuple(out[k])
    return out


def cmd_random(args):
    ctx = make_ctx()
    log(args.name or "random", {"what": "pixels", "knn": pixel_knn(ctx)})
    for seed in args.seeds:
        cfg = PretrainConfig(seed=seed, **parse_set(args.set))
        model = build_model(cfg, 1)
        log(args.name or "random", {"what": "random_init", "seed": seed, "set": args.set, "knn": knn_all(model.backbone, ctx)})


def cmd_ckpt(args):
    ctx = make_ctx()
    for p in args.paths:
        model, cfg = load_pretrained(p)
        log(args.name or "ckpt", {"what": "checkpoint", "path": p, "knn": knn_all(model.backbone, ctx)})


def cmd_train(args):
    ctx = make_ctx()
    sets = parse_set(args.set)
    aug = parse_set(args.aug)
    lowres_cfg = json.loads(args.lowres) if args.lowres else None
    for seed in args.seeds:
        out_dir = OUT / f"{args.name}_s{seed}"
        shutil.rmtree(out_dir, ignore_errors=True)
        cfg = PretrainConfig(seed=seed, out_dir=str(out_dir), progress=False, knn_every=0,
                             checkpoint_every=10**6, **sets)
        tr = ExpPretrainer(cfg, aug, lowres_cfg)
        eval_at = set(args.eval_at)
        t0, t_train = time.perf_counter(), 0.0
        if 0 in eval_at:
            log(args.name, {"seed": seed, "step": 0, "knn": knn_all(tr.model.backbone, ctx)})
        losses = []
        while tr.step < cfg.steps:
            ts = time.perf_counter()
            rec = tr.train_step(tr.step)
            t_train += time.perf_counter() - ts
            tr.step += 1
            losses.append(rec["loss"])
            if tr.step in eval_at or tr.step == cfg.steps:
                log(args.name, {"seed": seed, "step": tr.step, "loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
                                "steps_per_s": round(tr.step / t_train, 3), "set": args.set, "aug": args.aug,
                                "lowres": args.lowres, "knn": knn_all(tr.model.backbone, ctx)})
        tr.save()
        print(f"total {time.perf_counter() - t0:.0f}s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=("random", "ckpt", "train"))
    ap.add_argument("paths", nargs="*")
    ap.add_argument("--name", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", nargs="*", help="PretrainConfig field=json-value")
    ap.add_argument("--aug", nargs="*", help="AugmentSpec field=json-value applied to both views")
    ap.add_argument("--lowres", default=None, help='json {"p":..,"lo":..,"hi":..}')
    ap.add_argument("--eval-at", type=int, nargs="*", default=[0, 100, 200, 300])
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"random": cmd_random, "ckpt": cmd_ckpt, "train": cmd_train}[args.cmd](args)


if __name__ == "__main__":
    main()
