"""The deterministic half of a view: batched image operations on the input's device (resized
crop, colour jitter, blur, low resolution, normalise), :func:`apply_params` chaining them, and
:func:`augment` / :func:`two_views`, which draw the parameters and apply them."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .params import _JITTER_IDENTITY, JITTER_OPS, ViewParams, sample_params
from .specs import AugmentSpec, default_mean_std

LUMA_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128 / 255  # PIL ImageOps.solarize's default threshold (uint8 128), used by the official code
BLUR_TRUNCATE = 3.0  # Gaussian kernel radius, in units of the largest sigma


def _to_float(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"expected a batch N×C×H×W; got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if x.is_floating_point():
        return x.to(torch.float32)
    raise TypeError(f"expected uint8 (0..255) or float (0..1) images; got {x.dtype}")


def _gray(x: torch.Tensor) -> torch.Tensor:
    """N×3×H×W -> N×1×H×W luma."""
    r, g, b = x.unbind(dim=1)
    return (LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b).unsqueeze(1)


def resized_crop(x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, size: int,
                 interpolation: str = "bilinear") -> torch.Tensor:
    """Resample box (x0, y0, w, h) of each image to size×size, mirrored where flip; one grid_sample call."""
    n, c, height, width = x.shape
    x0, y0, w, h = box.to(torch.float64).unbind(dim=1)
    # affine_grid maps output coords in [-1, 1] to input coords in [-1, 1] (pixel edges, align_corners=False).
    sx, sy = w / width, h / height
    cx, cy = (2 * x0 + w) / width - 1, (2 * y0 + h) / height - 1
    sx = torch.where(flip.to(sx.device), -sx, sx)
    zero = torch.zeros_like(sx)
    theta = torch.stack([sx, zero, cx, zero, sy, cy], dim=1).view(n, 2, 3)
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), [n, c, size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode=interpolation, padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0) if interpolation == "bicubic" else out


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (m×1×1×1, in turns) keeping HSV's S and V: torchvision's adjust_hue, fused.

    With M = max(R,G,B), chroma C = M - min(R,G,B) and 6H = sector + (difference of the other two
    channels)/C (torchvision's case order R, G, B), the inverse map is
        channel_n = M - C·clamp(min(k, 4 - k), 0, 1),  k = (n' + 6H') mod 6,  n' = 5, 3, 1 for R, G, B,
    since V·S = C. Written with few, mostly in-place passes: on CPU every fresh full-batch tensor
    costs page faults, which makes a full rgb->hsv->rgb round trip (torchvision's adjust_hue) slower.
    """
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(chroma > 0, chroma, 1.0)  # chroma 0: gray pixel, hue 0, output = M anyway
    h6 = torch.where(maxc == r, g - b,
                     torch.where(maxc == g, (b - r).add_(safe, alpha=2.0), (r - g).add_(safe, alpha=4.0)))
    h6 = h6.div_(safe).add_(6.0 * shift.view(-1, 1, 1)).remainder_(6.0)
    out = torch.empty_like(x)
    for channel, offset in enumerate((5.0, 3.0, 1.0)):
        k = (h6 + offset).remainder_(6.0)
        weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.sub(maxc, weight.mul_(chroma), out=out[:, channel])
    return out


def _jitter_op(op: str, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """One colour op with per-sample factor f (m×1×1×1): torchvision's maths, clamped to [0, 1]."""
    if op == "brightness":
        return (x * f).clamp_(0.0, 1.0)
    if op == "contrast":
        # mean(gray(x)) = Σ_c w_c mean(x_c): reduce first, then weight (one pass over x, not four)
        channel_means = x.mean(dim=(2, 3))
        mean = channel_means @ x.new_tensor(LUMA_WEIGHTS) if x.shape[1] == 3 else channel_means[:, 0]
        return torch.lerp(mean.view(-1, 1, 1, 1).expand_as(x), x, f).clamp_(0.0, 1.0)
    if op == "saturation":
        return torch.lerp(_gray(x).expand_as(x), x, f).clamp_(0.0, 1.0)
    return _adjust_hue(x, f)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Per-sample colour jitter in a per-sample order (see :mod:`bissl_kit.augment`).

    The jittered samples are gathered once, sorted by their op order (at most 4! = 24 groups),
    each group's contiguous slice runs its 4 ops in its order, and the result is scattered back
    once: less CPU time than one gather/scatter per (slot, op), and each group's slice (about N/24
    images) stays in cache. Group boundaries come from the CPU parameters, so there is no device
    sync (on a GPU: ≤ 24·4 small op calls).
    """
    channels = x.shape[1]
    factors, order = factors.cpu(), order.cpu()
    active = factors != torch.tensor(_JITTER_IDENTITY, dtype=factors.dtype)
    if channels != 3:  # saturation and hue do nothing to gray images (torchvision/PIL behaviour)
        active[:, JITTER_OPS.index("saturation")] = False
        active[:, JITTER_OPS.index("hue")] = False
    rows = active.any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return x
    group = (order * torch.tensor([64, 16, 4, 1])).sum(dim=1)  # the order as a base-4 number
    rows = rows[torch.argsort(group[rows], stable=True)]
    _, counts = torch.unique_consecutive(group[rows], return_counts=True)
    rows_dev = rows.to(x.device)
    xs = x[rows_dev]
    fs = factors[rows].to(device=x.device, dtype=x.dtype)
    on = active[rows]
    start = 0
    for count in counts.tolist():
        part = slice(start, start + count)
        for op_index in order[rows[start]].tolist():
            mask = on[part, op_index]
            if not mask.any():
                continue
            new = _jitter_op(JITTER_OPS[op_index], xs[part], fs[part, op_index].view(-1, 1, 1, 1))
            if not mask.all():  # an identity factor must leave its sample bit-exact (hue 0 is not)
                new = torch.where(mask.to(x.device).view(-1, 1, 1, 1), new, xs[part])
            xs[part] = new
        start += count
    out = x.clone()
    out[rows_dev] = xs
    return out


def _blur_matrices(kernel: torch.Tensor, side: int) -> torch.Tensor:
    """(m, side, side) matrices B with (B v)_i = Σ_t kernel_t · v[reflect(i + t)], one per kernel row."""
    radius = kernel.shape[1] // 2
    src = torch.arange(side, device=kernel.device).view(-1, 1) + torch.arange(-radius, radius + 1,
                                                                            device=kernel.device)
    src = src.abs()
    src = torch.where(src > side - 1, 2 * (side - 1) - src, src)  # reflect (edge pixel not repeated)
    m = kernel.shape[0]
    mats = kernel.new_zeros(m, side, side)
    return mats.scatter_add_(2, src.expand(m, -1, -1), kernel.view(m, 1, -1).expand(-1, side, -1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Blur the samples with sigma > 0 by a separable Gaussian of their own σ (pixels).

    Kernel exp(-t²/2σ²)/Σ on t = -R..R, R = ceil(BLUR_TRUNCATE·σ_max) (capped at side - 1, as
    reflect padding needs), reflect padding. Per-sample kernels make this a banded matrix product
    B_v x B_hᵀ per image: one batched matmul, which took less CPU time than the equivalent grouped
    conv2d, and exactly torchvision's gaussian_blur with kernel size 2R + 1 (tested).
    """
    rows = sigma.cpu() > 0
    if not rows.any():
        return x
    _, _, height, width = x.shape
    radius = min(math.ceil(BLUR_TRUNCATE * sigma_max), height - 1, width - 1)
    idx = rows.nonzero().squeeze(1).to(x.device)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(device=x.device, dtype=x.dtype)[idx].view(-1, 1)
    kernel = torch.exp(-t ** 2 / (2 * s ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    horizontal = _blur_matrices(kernel, width).transpose(1, 2).unsqueeze(1)   # (m, 1, W, W)
    vertical = horizontal if height == width else _blur_matrices(kernel, height).transpose(1, 2).unsqueeze(1)
    x = x.clone()
    x[idx] = vertical.transpose(2, 3) @ (x[idx] @ horizontal)
    return x


def _resize_matrix(src: int, dst: int, *, antialias: bool, device, dtype) -> torch.Tensor:
    """(dst, src) matrix R with R v = the bilinear resize of a length-src signal v to dst samples
    (torch `interpolate` semantics, align_corners=False): the resize applied to the identity."""
    eye = torch.eye(src, device=device, dtype=dtype).view(1, 1, src, src)
    return F.interpolate(eye, size=(dst, src), mode="bilinear", align_corners=False, antialias=antialias)[0, 0]


def low_resolution(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Resize each sample with size r > 0 to r×r (bilinear, antialiased) and back to its S×S
    (bilinear); samples with size 0 are returned unchanged. One batched product M X Mᵀ with one S×S
    matrix per sample (see :mod:`bissl_kit.augment`)."""
    size = size.cpu()
    rows = size > 0
    if not rows.any():
        return x
    _, _, height, width = x.shape
    if height != width:
        raise ValueError(f"low_resolution needs square views; got {height}×{width}")
    side = width
    idx = rows.nonzero().squeeze(1)
    resolutions = size[idx]
    distinct = resolutions.unique()
    # one S×S matrix per distinct r (at most lowres_size[1] - lowres_size[0] + 1 tiny matrices)
    mats = torch.stack([_resize_matrix(r, side, antialias=False, device=x.device, dtype=x.dtype)
                        @ _resize_matrix(side, r, antialias=True, device=x.device, dtype=x.dtype)
                        for r in distinct.tolist()])
    m = mats[torch.searchsorted(distinct, resolutions).to(x.device)].unsqueeze(1)  # (k, 1, S, S)
    idx = idx.to(x.device)
    x = x.clone()
    x[idx] = m @ x[idx] @ m.transpose(2, 3)
    return x


def _resolve_mean_std(channels: int, mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if mean is None and std is None:
        return default_mean_std(channels)
    if mean is None or std is None or len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} values each (one per channel); got {mean!r}, {std!r}")
    return tuple(mean), tuple(std)


def normalize(x: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """The eval transform: uint8 (0..255) or float (0..1) N×C×H×W -> float32 (x - mean)/std.

    mean/std None: `default_mean_std(C)`.
    """
    x = _to_float(x)
    mean, std = _resolve_mean_std(x.shape[1], mean, std)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m).div_(s)


def apply_params(x: torch.Tensor, params: ViewParams, spec: AugmentSpec) -> torch.Tensor:
    """Render one view from given parameters (the deterministic half of `augment`)."""
    x = _to_float(x)
    channels = x.shape[1]
    if channels not in (1, 3) and (spec.jitter[2] > 0 or spec.jitter[3] > 0 or spec.gray_p > 0):
        raise ValueError(f"saturation, hue and grayscale need RGB (or 1-channel) images; got {channels} channels")
    mean, std = _resolve_mean_std(channels, spec.mean, spec.std)
    if x.shape[0] == 0:  # affine_grid rejects empty batches
        return x.new_empty(0, channels, spec.size, spec.size)
    x = resized_crop(x, params.box, params.flip, spec.size, spec.interpolation)
    x = color_jitter(x, params.jitter, params.jitter_order)
    if channels == 3 and params.gray.any():
        idx = params.gray.nonzero().squeeze(1).to(x.device)
        x[idx] = _gray(x[idx]).expand(-1, 3, -1, -1)
    x = gaussian_blur(x, params.blur_sigma, spec.blur_sigma[1])
    x = low_resolution(x, params.lowres_size)
    if params.solarize.any():
        on = params.solarize.to(x.device).view(-1, 1, 1, 1) & (x >= SOLARIZE_THRESHOLD)
        x = torch.where(on, 1.0 - x, x)
    return normalize(x, mean, std)


def augment(x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """One random view of every image of x (uint8 or [0, 1] float, N×C×H×W) -> float32 N×C×S×S, normalised."""
    if x.dim() != 4:
        raise ValueError(f"expected a batch N×C×H×W; got shape {tuple(x.shape)}")
    n, _, height, width = x.shape
    return apply_params(x, sample_params(n, height, width, spec, generator), spec)


def two_views(x: torch.Tensor, spec1: AugmentSpec, spec2: AugmentSpec,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretext pair: view 1's parameters are drawn first, then view 2's, from the same generator."""
    x = _to_float(x)
    return augment(x, spec1, generator), augment(x, spec2, generator)

