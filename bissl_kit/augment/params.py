"""The random half of a view: per-sample parameters drawn on CPU from one uniform table
(:func:`sample_params`), including torchvision's crop-box law (:func:`sample_crop_boxes`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .specs import AugmentSpec

CROP_ATTEMPTS = 10  # boxes torchvision's RandomResizedCrop proposes before its centre fallback
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
_JITTER_IDENTITY = (1.0, 1.0, 1.0, 0.0)  # factor values at which each jitter op does nothing

# Columns of the per-sample uniform table, in order. Fixed, so that the draws of one op never
# depend on which other ops are switched on.
_PARAM_LAYOUT = (
    ("crop_area", CROP_ATTEMPTS),
    ("crop_log_ratio", CROP_ATTEMPTS),
    ("crop_offset", 2),
    ("flip", 1),
    ("jitter_apply", 1),
    ("jitter_factor", len(JITTER_OPS)),
    ("jitter_order", len(JITTER_OPS)),
    ("gray", 1),
    ("blur_apply", 1),
    ("blur_sigma", 1),
    ("solarize", 1),
    ("lowres", 1),       # appended after the paper's ops: adding them shifted every earlier draw once
    ("lowres_size", 1),
)
PARAM_COLUMNS = sum(k for _, k in _PARAM_LAYOUT)


@dataclass(frozen=True)
class ViewParams:
    """Per-sample parameters of one view (row i belongs to sample i).

    box: (N, 4) float64 crop box (x0, y0, w, h) in input pixels (pixel-edge coordinates);
    flip: (N,) bool; jitter: (N, 4) float64 factors in JITTER_OPS order, identity (1, 1, 1, 0)
    where jitter is not applied; jitter_order: (N, 4) int64, a permutation of op indices per sample;
    gray, blur, solarize, lowres: (N,) bool; blur_sigma: (N,) float64; lowres_size: (N,) int64,
    the low resolution r where lowres (0 elsewhere).
    """

    box: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    jitter_order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    blur_sigma: torch.Tensor
    solarize: torch.Tensor
    lowres: torch.Tensor
    lowres_size: torch.Tensor


def _uniform_between(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + u * (hi - lo)


def sample_crop_boxes(u_area: torch.Tensor, u_log_ratio: torch.Tensor, u_offset: torch.Tensor,
                      height: int, width: int, scale: tuple[float, float],
                      ratio: tuple[float, float]) -> torch.Tensor:
    """torchvision RandomResizedCrop's box sampler, vectorised and continuous.

    u_area, u_log_ratio: (N, attempts) uniforms; u_offset: (N, 2). Returns (N, 4) boxes (x0, y0, w, h).
    Attempt k proposes area A = H·W·U[scale], aspect r = exp(U[log ratio]), w = √(A r), h = √(A / r);
    the first proposal with w <= W and h <= H is kept; if none fits, the image's aspect clamped
    into `ratio`, centred. The corner is uniform over [0, W-w] × [0, H-h].
    """
    area = height * width * _uniform_between(u_area, *scale)
    r = torch.exp(_uniform_between(u_log_ratio, math.log(ratio[0]), math.log(ratio[1])))
    w, h = torch.sqrt(area * r), torch.sqrt(area / r)
    fits = (w <= width) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # Fallback when no attempt fits: the largest box of the image with aspect clamped into `ratio`.
    image_ratio = width / height
    fw, fh = float(width), float(height)
    if image_ratio < ratio[0]:
        fh = fw / ratio[0]
    elif image_ratio > ratio[1]:
        fw = fh * ratio[1]
    any_fits = fits.any(dim=1)
    w = torch.where(any_fits, w, torch.full_like(w, fw))
    h = torch.where(any_fits, h, torch.full_like(h, fh))
    corner_u = torch.where(any_fits[:, None], u_offset, torch.full_like(u_offset, 0.5))
    x0 = corner_u[:, 0] * (width - w)
    y0 = corner_u[:, 1] * (height - h)
    return torch.stack([x0, y0, w, h], dim=1)


def sample_params(n: int, height: int, width: int, spec: AugmentSpec,
                  generator: torch.Generator) -> ViewParams:
    """Draw one view's parameters for n samples of an H×W image from a CPU generator (on CPU)."""
    if generator.device.type != "cpu":
        raise ValueError("pass a CPU torch.Generator: parameters are drawn on CPU so that a seed gives "
                         "the same views on every device")
    table = torch.rand(n, PARAM_COLUMNS, generator=generator, dtype=torch.float64)
    u = dict(zip([name for name, _ in _PARAM_LAYOUT], table.split([k for _, k in _PARAM_LAYOUT], dim=1)))

    box = sample_crop_boxes(u["crop_area"], u["crop_log_ratio"], u["crop_offset"], height, width,
                            spec.scale, spec.ratio)

    strengths = spec.jitter
    lo = torch.tensor([max(0.0, 1 - s) for s in strengths[:3]] + [-strengths[3]], dtype=torch.float64)
    hi = torch.tensor([1 + s for s in strengths[:3]] + [strengths[3]], dtype=torch.float64)
    factors = lo + u["jitter_factor"] * (hi - lo)
    jitter_on = u["jitter_apply"] < spec.jitter_p
    factors = torch.where(jitter_on, factors, torch.tensor(_JITTER_IDENTITY, dtype=torch.float64))

    blur = (u["blur_apply"] < spec.blur_p).squeeze(1)
    lowres = (u["lowres"] < spec.lowres_p).squeeze(1)
    lo, hi = spec.lowres_size
    r = (lo + (u["lowres_size"].squeeze(1) * (hi - lo + 1)).floor().long()).clamp_(max=hi)
    return ViewParams(
        box=box,
        flip=(u["flip"] < spec.flip_p).squeeze(1),
        jitter=factors,
        jitter_order=u["jitter_order"].argsort(dim=1),  # argsort of iid uniforms: a uniform random permutation
        gray=(u["gray"] < spec.gray_p).squeeze(1),
        blur=blur,
        blur_sigma=torch.where(blur, _uniform_between(u["blur_sigma"].squeeze(1), *spec.blur_sigma), 0.0),
        solarize=(u["solarize"] < spec.solarize_p).squeeze(1),
        lowres=lowres,
        lowres_size=torch.where(lowres, r, 0),
    )
