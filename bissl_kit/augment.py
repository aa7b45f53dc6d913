"""Batched, per-sample random image augmentations on tensors (the SimCLR/BYOL views of spec §2.4).

One call augments a whole batch N×C×H×W on the batch's own device; every sample gets its own,
independent random parameters. The chain runs in the order spec §2.4 lists it:

    random-resized crop (+ horizontal flip) -> colour jitter (p) -> grayscale (p) -> Gaussian blur (p)
    -> low resolution (p, ours) -> solarize (p) -> normalise (mean/std)

Why batched tensors and not a per-image torchvision loop: on the 2-core dev machine a per-image
torchvision v2 loop does ≈6,900 img/s for crop+flip (≈1,400 with colour jitter), while one
`affine_grid` + `grid_sample` call for the whole batch does ≈150,000 img/s (notes/ecosystem.md).
kornia does the same job but its per-call overhead dominates at 28 px (≈14,000 img/s crop+flip),
so it is not a dependency. `benchmarks/augment.py` re-measures this: the embedded 1-channel 28-px
chain is ≈18× the per-image loop on one CPU thread, but the 3-channel 96-px paper chain (bicubic,
full colour jitter) only ≈2×: a 96-px image already gives torchvision's kernels 27k elements per
call and stays in cache, while a batch of them is memory-bound. The big win at 96 px is the GPU.

Protocol
--------
* Randomness. Every random number comes from an explicit CPU `torch.Generator`: one table
  U ~ Uniform[0,1) of shape (N, PARAM_COLUMNS) is drawn per view, and all parameters are inverse-CDF
  transforms of its columns (`sample_params`). Row i of the table depends only on (seed, i), so
  sample i's view does not depend on N or on the other images, the same seed gives the same views
  on any device, and switching an op on/off never shifts the draws of the others (every column is
  always drawn). The parameters are then moved to the input's device.
* Crop (torchvision `RandomResizedCrop` semantics, continuous instead of integer pixels). Up to
  CROP_ATTEMPTS boxes are proposed with area fraction a ~ U[scale] and aspect ratio w/h = exp(ℓ),
  ℓ ~ U[log ratio]; the first that fits in the image wins, otherwise the fallback is the
  torchvision one (the whole image, its aspect clamped into `ratio`, centred). The box's top-left
  corner is uniform over the positions where it fits. The box [x0, x0+w]×[y0, y0+h] (pixel-edge
  coordinates) is resampled to S×S at half-pixel centres, x = x0 + w·(j + ½)/S, via `affine_grid`
  with align_corners=False; that is what makes the identity box (scale 1, ratio 1, S = W, no flip)
  reproduce the input (up to float rounding of the grid, < 1e-5). A flip negates the x-scale of the affine map. Samples outside the
  image (half a pixel at the border when upsampling, bicubic taps) take the border value, as a
  crop-then-resize does. No antialiasing: the views here are crops of images no larger than
  S (STL10 96→96, Fashion-MNIST 28→28), i.e. upsampling; downsampling big images would alias.
  Bicubic can overshoot, so its output is clamped to [0, 1].
* Colour jitter (torchvision `ColorJitter` maths; tested against its functionals to 1e-5). With
  probability `jitter_p` a sample gets brightness b ~ U[max(0,1-s_b), 1+s_b], contrast
  c ~ U[max(0,1-s_c), 1+s_c], saturation s ~ U[max(0,1-s_s), 1+s_s], hue shift h ~ U[-s_h, s_h],
  applied in a **random order drawn per sample** (as torchvision draws one per image), each step
  clamped to [0, 1]:
      brightness: x·b;  contrast: c·x + (1-c)·mean(gray(x));  saturation: s·x + (1-s)·gray(x);
      hue: rotate H in HSV by h (mod 1).
  gray(x) = 0.2989 R + 0.587 G + 0.114 B (ITU-R 601-2, torchvision's weights); for 1-channel
  images gray(x) = x and **only brightness and contrast apply** (saturation/hue/grayscale are
  no-ops there, as in torchvision/PIL).
* Grayscale (RGB only): with probability `gray_p`, every channel ← gray(x).
* Gaussian blur: with probability `blur_p`, σ ~ U[blur_sigma] pixels of the output image; a
  separable kernel exp(-t²/2σ²) (normalised) of radius ceil(BLUR_TRUNCATE·σ_max), reflect padding.
* Low resolution (not in the paper; for the embedded Fashion-MNIST → digits setting, whose digits are
  8×8 images upscaled): with probability `lowres_p`, r ~ U{lowres_size[0], ..., lowres_size[1]}
  (integers, each equally likely) and the view is resized S → r×r (bilinear, antialiased, i.e. the
  triangle filter widened by S/r) and back r → S (bilinear), torch's `interpolate` semantics. Both
  resizes are separable linear maps, so a view is M_r X M_rᵀ with the S×S matrix M_r = U_r D_r: one
  batched matrix product for the whole batch, like the blur (tested against per-image torchvision
  `resize`). r = S is the identity; `lowres_size` must stay ≤ S (a larger r is not a lower resolution).
* Solarize: with probability `solarize_p`, x ← 1 - x where x ≥ SOLARIZE_THRESHOLD.
* Normalise: (x - mean)/std per channel. Input uint8 (0..255) or float (0..1); output float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# 1-channel data (Fashion-MNIST-like): map [0, 1] to [-1, 1]. Close enough to the data's own
# statistics (FMNIST ≈ 0.29 ± 0.35) for BN networks, and dataset-agnostic.
GRAY_MEAN = (0.5,)
GRAY_STD = (0.5,)

LUMA_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale
CROP_ATTEMPTS = 10  # boxes torchvision's RandomResizedCrop proposes before its centre fallback
SOLARIZE_THRESHOLD = 128 / 255  # PIL ImageOps.solarize's default threshold (uint8 128), used by the official code
BLUR_TRUNCATE = 3.0  # Gaussian kernel radius, in units of the largest sigma
INTERPOLATIONS = ("bilinear", "bicubic")
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


def _fail(name: str, rule: str, value) -> None:
    raise ValueError(f"AugmentSpec.{name} must be {rule}; got {value!r}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_prob(name: str, p) -> None:
    if not (_is_number(p) and 0.0 <= p <= 1.0):
        _fail(name, "a probability in [0, 1]", p)


def _check_range(name: str, r, lo: float, hi: float = math.inf) -> None:
    """r must be a pair (a, b) with lo < a <= b <= hi."""
    if not (len(r) == 2 and all(_is_number(v) for v in r) and lo < r[0] <= r[1] <= hi):
        _fail(name, f"a pair (min, max) with {lo} < min <= max" + (f" <= {hi}" if hi < math.inf else ""), r)


_TUPLE_FIELDS = ("scale", "ratio", "jitter", "blur_sigma", "lowres_size", "mean", "std")


@dataclass(frozen=True)
class AugmentSpec:
    """One view's augmentation chain. Probabilities are per sample; see the module docstring."""

    size: int                                   # output side S (pixels); output is N×C×S×S
    scale: tuple[float, float] = (0.08, 1.0)    # crop area as a fraction of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio w/h (paper: (0.5, 1), spec C14)
    flip_p: float = 0.5                         # horizontal flip probability
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue strengths
    jitter_p: float = 0.8                       # probability of applying colour jitter
    gray_p: float = 0.2                         # random grayscale probability (RGB only)
    blur_p: float = 0.0                         # Gaussian blur probability
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # blur σ range, output pixels
    solarize_p: float = 0.0                     # solarize probability
    lowres_p: float = 0.0                       # low-resolution probability (ours, see module docstring)
    lowres_size: tuple[int, int] = (6, 12)      # range of the low resolution r (pixels, inclusive, <= size)
    interpolation: str = "bilinear"             # "bilinear" or "bicubic" (official V1: bicubic)
    mean: tuple[float, ...] | None = None       # per-channel mean; None: GRAY_MEAN for 1 channel, IMAGENET_MEAN for 3
    std: tuple[float, ...] | None = None        # per-channel std;  None: GRAY_STD for 1 channel, IMAGENET_STD for 3

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:  # accept lists (JSON configs), store tuples (frozen, hashable)
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
            elif not isinstance(value, tuple) and not (value is None and name in ("mean", "std")):
                _fail(name, "a tuple", value)
        if not (isinstance(self.size, int) and not isinstance(self.size, bool) and self.size >= 1):
            _fail("size", "an int >= 1", self.size)
        _check_range("scale", self.scale, 0.0, 1.0)
        _check_range("ratio", self.ratio, 0.0)
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p", "lowres_p"):
            _check_prob(name, getattr(self, name))
        j = self.jitter
        if not (len(j) == 4 and all(_is_number(v) for v in j) and min(j[:3]) >= 0 and 0 <= j[3] <= 0.5):
            _fail("jitter", "4 strengths (brightness, contrast, saturation, hue), each >= 0, hue <= 0.5", j)
        _check_range("blur_sigma", self.blur_sigma, 0.0)
        r = self.lowres_size
        if not (len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
                and 1 <= r[0] <= r[1] and (self.lowres_p == 0 or r[1] <= self.size)):
            _fail("lowres_size", f"a pair of ints (min, max) with 1 <= min <= max <= size ({self.size})", r)
        if self.interpolation not in INTERPOLATIONS:
            _fail("interpolation", f"one of {INTERPOLATIONS}", self.interpolation)
        if (self.mean is None) != (self.std is None):
            missing, given = ("mean", "std") if self.mean is None else ("std", "mean")
            _fail(missing, f"given together with {given} (or both left None)", None)
        if self.mean is not None:
            if not (len(self.mean) >= 1 and all(_is_number(v) for v in self.mean)):
                _fail("mean", "a non-empty tuple with one value per channel", self.mean)
            if not (len(self.std) == len(self.mean) and all(_is_number(v) and v > 0 for v in self.std)):
                _fail("std", f"a tuple of {len(self.mean)} values > 0 (one per channel, like mean)", self.std)


def default_mean_std(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(0.5,)/(0.5,) for 1-channel data, ImageNet's for RGB."""
    if channels == 1:
        return GRAY_MEAN, GRAY_STD
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    raise ValueError(f"no default mean/std for {channels} channels; pass mean= and std= explicitly")


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
PAPER_RATIO = (0.5, 1.0)  # spec C14: the official "min crop ratio" 0.5 lands in RandomResizedCrop's ratio


def _check_channels(channels: int, paper: bool) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels}")
    if paper and channels != 3:
        raise ValueError("the paper's chain (paper=True) is defined for RGB images with ImageNet mean/std; "
                         "repeat gray images to 3 channels first, e.g. x.expand(-1, 3, -1, -1)")


def simclr_specs(size: int, channels: int, *, paper: bool = False) -> tuple[AugmentSpec, AugmentSpec]:
    """The two pretext views.

    paper=False (embedded default, e.g. 16-px Fashion-MNIST): crop (0.08–1, aspect 3/4–4/3, bilinear),
    jitter p 0.8; for 1 channel only brightness/contrast 0.4, for RGB the full (0.4, 0.4, 0.2, 0.1) +
    grayscale 0.2; no blur/solarize (at 28 px a σ≤2 blur erases the digit-scale detail). Both views
    identical. mean/std from `default_mean_std`.
    The 1-channel chain is the embedded Fashion-MNIST → digits setting, and two choices follow its
    downstream task (benchmarks/experiments/pretrain_knn.md, digits val k-NN after 300 steps):
    no horizontal flip (flip_p 0: digits are chiral, so mirror invariance is a wrong prior for them,
    and most Fashion-MNIST items are mirror-symmetric, so a flip adds little pretext signal), and a
    low-resolution view with p 0.5, r ∈ 6..12 px (the digits are 8×8 images upscaled; with flip 0 it
    gave 92.3 / 90.2 % at seeds 0 / 1 vs 81.4 ± 2.7 % at random init). The RGB chain keeps flip 0.5.
    paper=True (spec §2.4, RGB only): crop with aspect (0.5, 1) and bicubic, flip 0.5, jitter
    (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2; view 1 blur p 1.0; view 2 blur p 0.1 + solarize p 0.2;
    σ ∈ [0.1, 2.0]; ImageNet mean/std.
    """
    _check_channels(channels, paper)
    mean, std = default_mean_std(channels)
    if not paper:
        jitter = (0.4, 0.4, 0.0, 0.0) if channels == 1 else (0.4, 0.4, 0.2, 0.1)
        gray_p = 0.0 if channels == 1 else 0.2
        if channels == 1:
            lowres = {"flip_p": 0.0, "lowres_p": 0.5, "lowres_size": (min(6, size), min(12, size))}
        else:
            lowres = {}
        view = AugmentSpec(size, jitter=jitter, gray_p=gray_p, mean=mean, std=std, **lowres)
        return view, view
    common = dict(ratio=PAPER_RATIO, interpolation="bicubic", jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                  gray_p=0.2, blur_sigma=(0.1, 2.0), mean=mean, std=std)
    return (AugmentSpec(size, blur_p=1.0, solarize_p=0.0, **common),
            AugmentSpec(size, blur_p=0.1, solarize_p=0.2, **common))


def downstream_train_spec(size: int, channels: int, *, paper: bool = False) -> AugmentSpec:
    """Fine-tuning / BiSSL upper-level train view: crop + flip + normalise, no colour ops.

    paper=True: aspect (0.5, 1) and bicubic (V1/V2; V3 uses bilinear), ImageNet mean/std (RGB only).
    """
    _check_channels(channels, paper)
    mean, std = default_mean_std(channels)
    no_colour = dict(jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=0.0, gray_p=0.0, mean=mean, std=std)
    if paper:
        return AugmentSpec(size, ratio=PAPER_RATIO, interpolation="bicubic", **no_colour)
    return AugmentSpec(size, **no_colour)


# --------------------------------------------------------------------------------------------
# Random parameters (CPU)
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Ops on batches (device of x)
# --------------------------------------------------------------------------------------------
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
    costs page faults; a full rgb->hsv->rgb round trip (torchvision's adjust_hue on the same
    256×3×96×96 batch, one factor) took ≈2× as long on one core here.
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
    """Per-sample colour jitter in a per-sample order (see module docstring).

    The jittered samples are gathered once, sorted by their op order (at most 4! = 24 groups),
    each group's contiguous slice runs its 4 ops in its order, and the result is scattered back
    once. Compared with one gather/scatter per (slot, op) this cut the CPU time on a 256×3×96×96
    batch on one core by ≈20 % (265 -> 205 ms); the ≈10-image slices also stay in cache. Group boundaries come
    from the CPU parameters, so there is no device sync (on a GPU: ≤ 24·4 small op calls).
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
    B_v x B_hᵀ per image: one batched matmul, measured 57 ms vs 99 ms for the equivalent grouped
    conv2d on the 2-core dev machine (256×3×96×96, σ_max 2), and exactly torchvision's
    gaussian_blur with kernel size 2R + 1 (tested).
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
    matrix per sample (see the module docstring)."""
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


__all__ = [
    "AugmentSpec", "ViewParams", "augment", "two_views", "normalize", "simclr_specs", "downstream_train_spec",
    "sample_params", "sample_crop_boxes", "apply_params", "resized_crop", "color_jitter", "gaussian_blur",
    "low_resolution",
    "default_mean_std", "IMAGENET_MEAN", "IMAGENET_STD", "GRAY_MEAN", "GRAY_STD",
]
