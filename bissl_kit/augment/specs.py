"""What a view is: :class:`AugmentSpec` (one view's augmentation chain, validated), the default
mean/std, and the presets :func:`simclr_specs` (the pretext pair) and :func:`downstream_train_spec`."""
from __future__ import annotations

import math
from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# 1-channel data (Fashion-MNIST-like): map [0, 1] to [-1, 1]. Close enough to the data's own
# statistics (FMNIST ≈ 0.29 ± 0.35) for BN networks, and dataset-agnostic.
GRAY_MEAN = (0.5,)
GRAY_STD = (0.5,)
INTERPOLATIONS = ("bilinear", "bicubic")


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
    """One view's augmentation chain. Probabilities are per sample; see :mod:`bissl_kit.augment`."""

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
    lowres_p: float = 0.0                       # low-resolution probability (ours, see bissl_kit.augment)
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
    downstream task (experiments/pretrain_knn/README.md, digits val k-NN after 300 steps):
    no horizontal flip (flip_p 0: digits are chiral, so mirror invariance is a wrong prior for them,
    and most Fashion-MNIST items are mirror-symmetric, so a flip adds little pretext signal), and a
    low-resolution view with p 0.5, r ∈ 6..12 px (the digits are 8×8 images upscaled); the k-NN
    accuracies that chose them are in that file. The RGB chain keeps flip 0.5.
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
