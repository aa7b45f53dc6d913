"""Tests for bissl_kit.augment: each test states the property of the module docstring it checks.

References: torchvision's functional ops (adjust_*, rgb_to_grayscale, gaussian_blur, solarize) on the
same image with the same factor, and torchvision's RandomResizedCrop.get_params for the crop law.
"""
import dataclasses
import math
import types

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from bissl_kit.augment import (
    GRAY_MEAN, IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD, AugmentSpec, ViewParams, apply_params,
    augment, downstream_train_spec, low_resolution, normalize, sample_params, simclr_specs, two_views,
)

ATOL = 1e-5  # float32 agreement with torchvision's functionals (same maths, other operation order)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n=4, c=3, h=16, w=16, seed=0, dtype=torch.float32):
    x = torch.rand(n, c, h, w, generator=gen(seed))
    return (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x


def raw_spec(size, channels, **kw):
    """No colour ops, identity normalisation: the output is the geometric view itself, in [0, 1]."""
    base = dict(jitter=(0.0, 0.0, 0.0, 0.0), jitter_p=0.0, gray_p=0.0,
                mean=(0.0,) * channels, std=(1.0,) * channels)
    return AugmentSpec(size, **{**base, **kw})


def identity_params(n, h, w):
    """Whole-image box, no flip, no colour ops: fields are then set one at a time by the tests."""
    return ViewParams(
        box=torch.tensor([[0.0, 0.0, float(w), float(h)]], dtype=torch.float64).repeat(n, 1),
        flip=torch.zeros(n, dtype=torch.bool),
        jitter=torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64).repeat(n, 1),
        jitter_order=torch.arange(4).repeat(n, 1),
        gray=torch.zeros(n, dtype=torch.bool), blur=torch.zeros(n, dtype=torch.bool),
        blur_sigma=torch.zeros(n, dtype=torch.float64), solarize=torch.zeros(n, dtype=torch.bool),
        lowres=torch.zeros(n, dtype=torch.bool), lowres_size=torch.zeros(n, dtype=torch.int64))


IDENTITY_CROP = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)


# ----------------------------------------------------------------------------------------------
# shape, dtype, range, normalisation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_output_is_float32_n_c_s_s(channels, dtype):
    x = images(5, channels, 20, 24, dtype=dtype)
    for spec in simclr_specs(12, channels) + (downstream_train_spec(12, channels),):
        out = augment(x, spec, gen())
        assert out.shape == (5, channels, 12, 12) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    assert augment(x[:0], spec, gen()).shape == (0, channels, 12, 12)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_crop_and_flip_stay_within_the_input_range(interpolation):
    x = 0.2 + 0.5 * images(16, 3, 16, 16)  # values in [0.2, 0.7]
    out = augment(x, raw_spec(24, 3, interpolation=interpolation), gen())
    lo, hi = x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))
    if interpolation == "bilinear":  # convex combinations of input pixels
        assert (out.amin(dim=(1, 2, 3)) >= lo - 1e-6).all() and (out.amax(dim=(1, 2, 3)) <= hi + 1e-6).all()
    else:  # bicubic may overshoot: clamped to the valid range
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_normalisation_of_a_constant_image_gives_the_expected_mean_and_std():
    x = torch.full((6, 3, 16, 16), 100, dtype=torch.uint8)
    out = augment(x, downstream_train_spec(8, 3), gen())
    expected = (100 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand_as(out), atol=ATOL, rtol=0)
    # the eval transform: same numbers, uint8 and float input alike
    torch.testing.assert_close(normalize(x), normalize(x.float() / 255), atol=ATOL, rtol=0)
    torch.testing.assert_close(normalize(x)[:, :, :8, :8], out, atol=ATOL, rtol=0)
    # 1-channel default: (x - 0.5) / 0.5
    g = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    assert GRAY_MEAN == (0.5,) and torch.allclose(normalize(g), torch.ones(2, 1, 4, 4))


def test_mean_std_must_match_the_channels():
    with pytest.raises(ValueError, match="mean/std"):
        augment(images(2, 1), AugmentSpec(8, mean=IMAGENET_MEAN, std=IMAGENET_STD), gen())


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_identity_crop_reproduces_the_input(interpolation, dtype):
    x = images(3, 3, 16, 16, dtype=dtype)
    out = augment(x, raw_spec(16, 3, interpolation=interpolation, **IDENTITY_CROP), gen())
    reference = x.float() / 255 if dtype == torch.uint8 else x
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)  # float rounding of the grid only


def test_flip_mirrors_the_width_axis():
    x = images(3, 3, 16, 16)
    out = augment(x, raw_spec(16, 3, **{**IDENTITY_CROP, "flip_p": 1.0}), gen())
    torch.testing.assert_close(out, x.flip(-1), atol=1e-6, rtol=0)


def test_rendered_view_is_the_sampled_box():
    # Image whose value is the x coordinate (pixel-edge units / W): a view's column j must read
    # x0 + w (j + 1/2) / S (reversed when flipped), its row i  y0 + h (i + 1/2) / S in channel 1.
    n, side, size = 64, 32, 16
    cols = (torch.arange(side) + 0.5) / side
    x = torch.stack([cols.view(1, -1).expand(side, side), cols.view(-1, 1).expand(side, side)])
    x = x.expand(n, 2, side, side)
    spec = raw_spec(size, 2, scale=(0.2, 1.0))
    params = sample_params(n, side, side, spec, gen())
    out = apply_params(x, params, spec)
    j = (torch.arange(size) + 0.5) / size
    x0, y0, w, h = [v.float().view(-1, 1) for v in params.box.unbind(1)]
    want_x = (x0 + w * j) / side
    want_x = torch.where(params.flip.view(-1, 1), want_x.flip(1), want_x)
    want_y = (y0 + h * j) / side
    # Linear images are reproduced exactly by bilinear sampling, except within half a pixel of the
    # image border (clamped there), so compare where the sample lies half a pixel inside.
    inside_x = (want_x > 0.5 / side) & (want_x < 1 - 0.5 / side)
    inside_y = (want_y > 0.5 / side) & (want_y < 1 - 0.5 / side)
    got_x, got_y = out[:, 0, 0, :], out[:, 1, :, 0]
    assert inside_x.float().mean() > 0.8
    torch.testing.assert_close(got_x[inside_x], want_x[inside_x], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_y[inside_y], want_y[inside_y], atol=1e-5, rtol=0)


def test_crop_sampler_respects_scale_and_ratio():
    n = 20_000
    for scale, ratio in [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.08, 1.0), (0.5, 1.0)), ((0.3, 0.6), (0.5, 2.0))]:
        spec = AugmentSpec(32, scale=scale, ratio=ratio)
        box = sample_params(n, 32, 32, spec, gen()).box
        x0, y0, w, h = box.unbind(1)
        area, aspect = w * h / (32 * 32), w / h
        assert (area >= scale[0] - 1e-9).all() and (area <= scale[1] + 1e-9).all()
        assert (aspect >= ratio[0] - 1e-9).all() and (aspect <= ratio[1] + 1e-9).all()
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 32 + 1e-9).all() and (y0 + h <= 32 + 1e-9).all()


def test_crop_sampler_is_uniform_in_area_and_log_ratio():
    # With scale <= 0.5 every proposal fits a square image, so no proposal is rejected and the
    # accepted (area, log ratio) is exactly uniform: 10 bins of 2000 ± 5σ (σ ≈ 42).
    n, bins = 20_000, 10
    spec = AugmentSpec(32, scale=(0.08, 0.5), ratio=(3 / 4, 4 / 3))
    x0, y0, w, h = sample_params(n, 32, 32, spec, gen()).box.unbind(1)
    area_u = (w * h / 32 ** 2 - 0.08) / (0.5 - 0.08)
    log_u = (torch.log(w / h) - math.log(3 / 4)) / (math.log(4 / 3) - math.log(3 / 4))
    for u in (area_u, log_u, x0 / (32 - w)):  # the corner too: uniform over where the box fits
        counts = torch.histc(u.float(), bins=bins, min=0.0, max=1.0)
        assert (counts - n / bins).abs().max() < 5 * math.sqrt(n / bins)


def test_crop_law_matches_torchvision_random_resized_crop():
    # Default scale/ratio on 96 px: rejections make the law non-uniform; compare the mean area
    # fraction and mean log aspect with torchvision's own sampler (integer boxes) at 5 SE.
    n = 4000
    torch.manual_seed(0)
    tv = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(1, 96, 96), [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(n)], dtype=torch.float64)  # (top, left, h, w)
    tv_area, tv_log = tv[:, 2] * tv[:, 3] / 96 ** 2, torch.log(tv[:, 3] / tv[:, 2])
    _, _, w, h = sample_params(n, 96, 96, AugmentSpec(96), gen()).box.unbind(1)
    area, log_aspect = w * h / 96 ** 2, torch.log(w / h)
    for ours, theirs in ((area, tv_area), (log_aspect, tv_log)):
        se = math.sqrt((ours.var() + theirs.var()) / n)
        assert abs(ours.mean() - theirs.mean()) < 5 * se


# ----------------------------------------------------------------------------------------------
# randomness: per-sample, seeded
# ----------------------------------------------------------------------------------------------
def test_identical_images_get_different_views():
    x = images(1, 3, 24, 24).expand(8, 3, 24, 24)
    for spec in (AugmentSpec(16), downstream_train_spec(16, 3)):
        out = augment(x, spec, gen()).flatten(1)
        distinct = torch.cdist(out, out) > 1e-3
        assert distinct.sum() == 8 * 7  # all off-diagonal pairs differ


def test_a_sample_view_depends_only_on_its_image_and_its_row():
    spec1, spec2 = simclr_specs(16, 3, paper=True)
    x = images(6, 3, 24, 24)
    y = x.clone()
    y[[0, 1, 3, 5]] = images(4, 3, 24, 24, seed=1)  # change every image but 2 and 4
    a1, a2 = two_views(x, spec1, spec2, gen())
    b1, b2 = two_views(y, spec1, spec2, gen())
    for a, b in ((a1, b1), (a2, b2)):
        torch.testing.assert_close(a[[2, 4]], b[[2, 4]], atol=0, rtol=0)
    # and not on the batch size: the first k samples of a batch are the batch of k
    torch.testing.assert_close(augment(x[:3], spec1, gen(5)), augment(x, spec1, gen(5))[:3], atol=0, rtol=0)


def test_same_seed_same_views_other_seed_other_views():
    x = images(4, 3, 24, 24)
    spec1, spec2 = simclr_specs(16, 3, paper=True)
    a = two_views(x, spec1, spec2, gen(7))
    b = two_views(x, spec1, spec2, gen(7))
    c = two_views(x, spec1, spec2, gen(8))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.allclose(a[0], c[0]) and not torch.allclose(a[1], c[1])
    assert not torch.allclose(a[0], a[1])  # the two views of a pair differ


def test_switching_an_op_does_not_change_the_other_draws():
    # Every parameter column is always drawn: turning blur on keeps crops, flips and colours.
    base = AugmentSpec(16)
    p0 = sample_params(32, 24, 24, base, gen(3))
    p1 = sample_params(32, 24, 24, dataclasses.replace(base, blur_p=1.0, solarize_p=0.5), gen(3))
    for field in ("box", "flip", "jitter", "jitter_order", "gray"):
        assert torch.equal(getattr(p0, field), getattr(p1, field))


def test_generator_must_live_on_cpu():
    cuda_like = types.SimpleNamespace(device=torch.device("cuda"))  # no CUDA needed to check the guard
    with pytest.raises(ValueError, match="CPU"):
        sample_params(2, 8, 8, AugmentSpec(8), cuda_like)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_seed_same_views_on_cuda():
    x = images(8, 3, 32, 32, dtype=torch.uint8)
    spec1, spec2 = simclr_specs(24, 3, paper=True)
    cpu = two_views(x, spec1, spec2, gen(11))
    gpu = two_views(x.cuda(), spec1, spec2, gen(11))
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# colour ops against torchvision's functionals
# ----------------------------------------------------------------------------------------------
TV_JITTER = {
    "brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
    "saturation": TF.adjust_saturation, "hue": TF.adjust_hue,
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_each_jitter_op_matches_torchvision(op, channels):
    n = 12
    x = images(n, channels, 16, 16)
    strengths = {"brightness": (0.8, 0, 0, 0), "contrast": (0, 0.8, 0, 0),
                 "saturation": (0, 0, 0.8, 0), "hue": (0, 0, 0, 0.5)}[op]
    spec = raw_spec(16, channels, jitter=strengths, jitter_p=1.0, **IDENTITY_CROP)
    params = sample_params(n, 16, 16, spec, gen())
    out = apply_params(x, params, spec)
    k = list(TV_JITTER).index(op)
    reference = torch.stack([TV_JITTER[op](x[i], float(params.jitter[i, k])) for i in range(n)])
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)
    if channels == 1 and op in ("saturation", "hue"):
        torch.testing.assert_close(out, x, atol=ATOL, rtol=0)  # gray images: no-op (torchvision/PIL)


def test_known_colours():
    # pure red rotated by +1/3 turn is pure green; grayscale of pure red is 0.2989 on every channel;
    # saturation 0 gives the gray value, brightness 0.5 halves.
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(4, 3, 4, 4).contiguous()
    params = identity_params(4, 4, 4)
    params = dataclasses.replace(params, jitter=torch.tensor(
        [[1.0, 1.0, 1.0, 1 / 3], [1.0, 1.0, 0.0, 0.0], [0.5, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]],
        dtype=torch.float64), gray=torch.tensor([False, False, False, True]))
    out = apply_params(red, params, raw_spec(4, 3))[:, :, 0, 0]
    expected = torch.tensor([[0.0, 1.0, 0.0], [0.2989] * 3, [0.5, 0.0, 0.0], [0.2989] * 3])
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def test_full_jitter_applies_the_ops_in_each_sample_own_order():
    n = 24
    x = images(n, 3, 16, 16)
    spec = raw_spec(16, 3, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=1.0, **IDENTITY_CROP)
    params = sample_params(n, 16, 16, spec, gen())
    assert len({tuple(o.tolist()) for o in params.jitter_order}) > 6  # orders do vary per sample
    out = apply_params(x, params, spec)
    for i in range(n):
        ref = x[i]
        for k in params.jitter_order[i].tolist():
            ref = list(TV_JITTER.values())[k](ref, float(params.jitter[i, k]))
        torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)


def test_jitter_probability_leaves_some_samples_untouched():
    n = 400
    params = sample_params(n, 8, 8, AugmentSpec(8, jitter_p=0.8), gen())
    untouched = (params.jitter == torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)).all(1)
    assert abs(untouched.float().mean() - 0.2) < 0.06


def test_grayscale_makes_channels_equal():
    x = images(6, 3, 16, 16)
    out = augment(x, raw_spec(16, 3, gray_p=1.0, **IDENTITY_CROP), gen())
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    torch.testing.assert_close(out, TF.rgb_to_grayscale(x, num_output_channels=3), atol=ATOL, rtol=0)


def test_gray_images_only_get_brightness_and_contrast():
    # same seed, same columns: saturation/hue/grayscale switched on change nothing on 1 channel
    x = images(16, 1, 16, 16)
    bc = AugmentSpec(12, jitter=(0.4, 0.4, 0.0, 0.0), jitter_p=0.8, gray_p=0.0, mean=(0.5,), std=(0.5,))
    full = dataclasses.replace(bc, jitter=(0.4, 0.4, 0.2, 0.1), gray_p=1.0)
    torch.testing.assert_close(augment(x, full, gen()), augment(x, bc, gen()), atol=0, rtol=0)


def test_blur_matches_torchvision_gaussian_blur():
    n = 6
    x = images(n, 3, 20, 20)
    spec = raw_spec(20, 3, blur_p=1.0, blur_sigma=(0.1, 2.0), **IDENTITY_CROP)
    params = sample_params(n, 20, 20, spec, gen())
    out = apply_params(x, params, spec)
    kernel = 2 * math.ceil(3 * 2.0) + 1
    for i in range(n):
        s = float(params.blur_sigma[i])
        assert 0.1 <= s <= 2.0
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [kernel, kernel], [s, s]), atol=ATOL, rtol=0)


def test_solarize_matches_torchvision():
    x = images(4, 3, 16, 16)
    out = augment(x, raw_spec(16, 3, solarize_p=1.0, **IDENTITY_CROP), gen())
    torch.testing.assert_close(out, TF.solarize(x, SOLARIZE_THRESHOLD), atol=1e-6, rtol=0)


def test_op_probabilities():
    n = 2000
    spec = AugmentSpec(8, flip_p=0.5, gray_p=0.2, blur_p=0.1, solarize_p=0.2, lowres_p=0.3, lowres_size=(2, 6))
    p = sample_params(n, 8, 8, spec, gen())
    for got, want in ((p.flip, 0.5), (p.gray, 0.2), (p.blur, 0.1), (p.solarize, 0.2), (p.lowres, 0.3)):
        assert abs(got.float().mean().item() - want) < 5 * math.sqrt(want * (1 - want) / n)


# ----------------------------------------------------------------------------------------------
# low resolution (ours)
# ----------------------------------------------------------------------------------------------
def test_lowres_sizes_are_uniform_integers_in_the_range_and_zero_where_off():
    n = 3000
    p = sample_params(n, 16, 16, AugmentSpec(16, lowres_p=0.5, lowres_size=(6, 12)), gen())
    r = p.lowres_size[p.lowres]
    assert p.lowres_size.dtype == torch.int64 and (p.lowres_size[~p.lowres] == 0).all()
    counts = torch.bincount(r, minlength=13)[6:13].double()
    assert counts.sum() == len(r) and (counts > 0).all() and r.min() >= 6 and r.max() <= 12
    expected = len(r) / 7
    assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_lowres_matches_per_image_torchvision_resize_down_and_up(channels):
    n = 10
    x = images(n, channels, 16, 16)
    spec = raw_spec(16, channels, lowres_p=0.7, lowres_size=(3, 16), **IDENTITY_CROP)
    params = sample_params(n, 16, 16, spec, gen(2))
    assert params.lowres.any() and not params.lowres.all()
    out = apply_params(x, params, spec)
    assert out.shape == x.shape and out.dtype == torch.float32
    for i in range(n):
        r = int(params.lowres_size[i])
        if r == 0:
            torch.testing.assert_close(out[i], x[i], atol=ATOL, rtol=0)  # untouched (identity crop: grid rounding)
            continue
        small = TF.resize(x[i], [r, r], interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        ref = TF.resize(small, [16, 16], interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)


def test_lowres_off_is_the_identity_and_on_changes_every_image():
    x = images(8, 1, 20, 20)
    base = raw_spec(16, 1)
    off = augment(x, base, gen(4))
    torch.testing.assert_close(augment(x, dataclasses.replace(base, lowres_p=0.0, lowres_size=(2, 3)), gen(4)),
                               off, atol=0, rtol=0)
    on = augment(x, dataclasses.replace(base, lowres_p=1.0, lowres_size=(4, 8)), gen(4))
    assert on.shape == off.shape
    assert ((on - off).flatten(1).abs().amax(1) > 0.05).all()  # every view lost detail
    # r = S is the identity (both resizes are at scale 1)
    same = low_resolution(off, torch.full((8,), 16))
    torch.testing.assert_close(same, off, atol=1e-6, rtol=0)


def test_lowres_same_seed_same_views_and_other_draws_unchanged():
    x = images(6, 1, 16, 16)
    spec = AugmentSpec(16, lowres_p=0.5, lowres_size=(6, 12), mean=(0.5,), std=(0.5,))
    a, b = augment(x, spec, gen(9)), augment(x, spec, gen(9))
    assert torch.equal(a, b) and not torch.equal(a, augment(x, spec, gen(10)))
    p0 = sample_params(32, 16, 16, dataclasses.replace(spec, lowres_p=0.0), gen(3))
    p1 = sample_params(32, 16, 16, spec, gen(3))
    for field in ("box", "flip", "jitter", "jitter_order", "gray", "blur", "solarize"):
        assert torch.equal(getattr(p0, field), getattr(p1, field))


# ----------------------------------------------------------------------------------------------
# presets and validation
# ----------------------------------------------------------------------------------------------
def test_presets():
    v1, v2 = simclr_specs(28, 1)
    assert v1 == v2 and v1.jitter == (0.4, 0.4, 0.0, 0.0) and v1.blur_p == 0 and v1.solarize_p == 0
    assert v1.mean == (0.5,) and v1.ratio == (3 / 4, 4 / 3) and v1.interpolation == "bilinear"
    # the embedded gray chain (Fashion-MNIST -> digits): no flip, a low-resolution view; RGB keeps its flip
    assert v1.flip_p == 0.0 and v1.lowres_p == 0.5 and v1.lowres_size == (6, 12)
    assert simclr_specs(8, 1)[0].lowres_size == (6, 8)  # capped at the image size
    rgb = simclr_specs(28, 3)[0]
    assert rgb.flip_p == 0.5 and rgb.lowres_p == 0.0
    p1, p2 = simclr_specs(96, 3, paper=True)
    for v in (p1, p2):
        assert v.ratio == (0.5, 1.0) and v.scale == (0.08, 1.0) and v.interpolation == "bicubic"
        assert v.jitter == (0.4, 0.4, 0.2, 0.1) and v.jitter_p == 0.8 and v.gray_p == 0.2
        assert v.mean == IMAGENET_MEAN and v.std == IMAGENET_STD and v.blur_sigma == (0.1, 2.0)
    assert (p1.blur_p, p1.solarize_p, p2.blur_p, p2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert p1.flip_p == p2.flip_p == 0.5 and p1.lowres_p == p2.lowres_p == 0.0
    d = downstream_train_spec(96, 3, paper=True)
    assert d.jitter_p == 0 and d.gray_p == 0 and d.blur_p == 0 and d.ratio == (0.5, 1.0)
    with pytest.raises(ValueError, match="RGB"):
        simclr_specs(28, 1, paper=True)


@pytest.mark.parametrize("field, value", [
    ("size", 0), ("size", 12.0), ("scale", (0.0, 1.0)), ("scale", (0.5, 0.2)), ("scale", (0.1, 1.5)),
    ("ratio", (0.0, 1.0)), ("ratio", (2.0, 1.0)), ("flip_p", 1.5), ("jitter", (-0.1, 0.4, 0.2, 0.1)),
    ("jitter", (0.4, 0.4, 0.2, 0.6)), ("jitter", (0.4, 0.4)), ("jitter_p", -0.1), ("gray_p", 2),
    ("blur_p", 1.1), ("blur_sigma", (0.0, 2.0)), ("solarize_p", -1), ("interpolation", "nearest"),
    ("std", (1.0, 1.0)), ("std", (0.0,)), ("std", None), ("scale", 0.5), ("jitter", None),
    ("blur_sigma", (0.1, float("nan"))), ("lowres_p", 1.5), ("lowres_size", (0, 4)), ("lowres_size", (5, 4)),
    ("lowres_size", (4.0, 6)), ("lowres_size", 6),
])
def test_validation_errors_name_the_field(field, value):
    kwargs = {"size": 8, field: value}
    if field == "lowres_size":
        kwargs["lowres_p"] = 0.5
    if field == "std":
        kwargs["mean"] = (0.5,)
    with pytest.raises(ValueError, match=rf"AugmentSpec\.{field} "):
        AugmentSpec(**kwargs)


def test_lowres_size_above_the_output_size_is_an_error_only_when_used():
    AugmentSpec(8, lowres_size=(6, 12))  # off: the default range needs no checking against size
    with pytest.raises(ValueError, match=r"AugmentSpec\.lowres_size .*<= size \(8\)"):
        AugmentSpec(8, lowres_p=0.5, lowres_size=(6, 12))


def test_lists_from_json_configs_become_tuples():
    spec = AugmentSpec(8, scale=[0.2, 1.0], mean=[0.5], std=[0.5])
    assert spec.scale == (0.2, 1.0) and spec.mean == (0.5,) and hash(spec)
