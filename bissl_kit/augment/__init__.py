"""Batched, per-sample random image augmentations on tensors (the SimCLR/BYOL views of spec §2.4).

One call augments a whole batch N×C×H×W on the batch's own device; every sample gets its own,
independent random parameters. The chain runs in the order spec §2.4 lists it:

    random-resized crop (+ horizontal flip) -> colour jitter (p) -> grayscale (p) -> Gaussian blur (p)
    -> low resolution (p, ours) -> solarize (p) -> normalise (mean/std)

Why batched tensors and not a per-image torchvision loop: a per-image loop pays Python and
dispatch overhead on every small image, while one `affine_grid` + `grid_sample` call (and a few
batched matrix products) covers the whole batch. kornia batches too, but its per-call overhead
still dominates at 28 px, so it is not a dependency. The gain is large for the embedded 1-channel
28-px chain and small on CPU for the 3-channel 96-px paper chain (bicubic, full colour jitter): a
96-px image already gives torchvision's kernels 27k elements per call and stays in cache, while a
batch of them is memory-bound; at 96 px the gain comes from the GPU. `benchmarks/augment.py`
measures both chains against the per-image loop; its figures are in docs/benchmarks.md.

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
  reproduce the input (up to float rounding of the grid, < 1e-5). A flip negates the x-scale of the affine map.
  Samples outside the image (half a pixel at the border when upsampling, bicubic taps) take the border value, as a
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

Modules: :mod:`~bissl_kit.augment.specs` (:class:`AugmentSpec`, presets, mean/std),
:mod:`~bissl_kit.augment.params` (the uniform table and the parameters drawn from it) and
:mod:`~bissl_kit.augment.ops` (the batched operations, :func:`augment`, :func:`two_views`).
"""

from __future__ import annotations

from .ops import (BLUR_TRUNCATE, LUMA_WEIGHTS, SOLARIZE_THRESHOLD, apply_params, augment, color_jitter,
                  gaussian_blur, low_resolution, normalize, resized_crop, two_views)
from .params import CROP_ATTEMPTS, JITTER_OPS, PARAM_COLUMNS, ViewParams, sample_crop_boxes, sample_params
from .specs import (GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, PAPER_RATIO, AugmentSpec,
                    default_mean_std, downstream_train_spec, simclr_specs)

__all__ = [
    "AugmentSpec", "ViewParams", "augment", "two_views", "normalize", "simclr_specs", "downstream_train_spec",
    "sample_params", "sample_crop_boxes", "apply_params", "resized_crop", "color_jitter", "gaussian_blur",
    "low_resolution",
    "default_mean_std", "IMAGENET_MEAN", "IMAGENET_STD", "GRAY_MEAN", "GRAY_STD",
    # constants of the ops and the parameter table, for the benchmarks and the tests
    "BLUR_TRUNCATE", "LUMA_WEIGHTS", "SOLARIZE_THRESHOLD", "CROP_ATTEMPTS", "JITTER_OPS", "PARAM_COLUMNS",
    "INTERPOLATIONS", "PAPER_RATIO",
]
