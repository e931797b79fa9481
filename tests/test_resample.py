"""cca_jax.resample against torch.nn.functional.interpolate / adaptive_avg_pool2d."""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cca_jax import resample

# (in, out) pairs: up, down, non-integer ratios both ways, 1-pixel edges, VAR's 16 -> pn and pn -> 16
SIZE_PAIRS = [(16, 1), (16, 2), (16, 3), (16, 5), (16, 6), (16, 10), (16, 13), (16, 16),
              (1, 16), (2, 16), (3, 16), (5, 16), (13, 16), (7, 3), (3, 7), (9, 4), (4, 9),
              (384, 256), (17, 11), (11, 17), (2, 1), (1, 3), (32, 24)]


def _torch_resize(x_nchw, size, mode):
    t = torch.from_numpy(x_nchw)
    if mode == "area":
        return F.interpolate(t, size=size, mode="area").numpy()
    return F.interpolate(t, size=size, mode="bicubic", align_corners=False).numpy()


@pytest.mark.parametrize("mode", ["bicubic", "area"])
@pytest.mark.parametrize("ih,oh", SIZE_PAIRS)
def test_resize_matches_torch(mode, ih, oh):
    rng = np.random.default_rng(ih * 1000 + oh)
    iw, ow = (ih, oh) if ih < 100 else (7, 5)  # keep the 384 -> 256 case cheap on one axis
    x = rng.standard_normal((2, 3, ih, iw)).astype(np.float32) * 3.0
    want = _torch_resize(x, (oh, ow), mode)
    fn = resample.resize_bicubic if mode == "bicubic" else resample.resize_area
    got_nchw = np.asarray(fn(x, (oh, ow), layout="NCHW"))
    got_nhwc = np.asarray(fn(x.transpose(0, 2, 3, 1), (oh, ow)))
    assert got_nchw.shape == want.shape
    np.testing.assert_allclose(got_nchw, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_nhwc.transpose(0, 3, 1, 2), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ih,oh", [(16, 5), (5, 16), (16, 13), (13, 16)])
def test_area_matches_adaptive_avg_pool_rectangular(ih, oh):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, ih, 16)).astype(np.float32)
    want = F.adaptive_avg_pool2d(torch.from_numpy(x), (oh, 6)).numpy()
    got = np.asarray(resample.resize_area(x, (oh, 6), layout="NCHW"))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_bicubic_rectangular_and_jit():
    import jax
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 9, 14)).astype(np.float32)
    want = _torch_resize(x, (13, 6), "bicubic")
    got = jax.jit(lambda a: resample.resize_bicubic(a, (13, 6), layout="NCHW"))(x)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_area_windows_overlap_like_spec():
    # var.md §6, in = 16
    assert resample.area_bounds(16, 3) == [(0, 6), (5, 11), (10, 16)]
    assert resample.area_bounds(16, 13)[:5] == [(0, 2), (1, 3), (2, 4), (3, 5), (4, 7)]
    assert resample.area_bounds(16, 10) == [(0, 2), (1, 4), (3, 5), (4, 7), (6, 8), (8, 10), (9, 12),
                                             (11, 13), (12, 15), (14, 16)]


def test_bicubic_is_not_jax_image_resize():
    # guards against "simplifying" to jax.image.resize: A = -0.5 and antialiasing differ
    import jax
    x = np.random.default_rng(2).standard_normal((1, 16, 16, 1)).astype(np.float32)
    ours = np.asarray(resample.resize_bicubic(x, 5))
    theirs = np.asarray(jax.image.resize(x, (1, 5, 5, 1), "cubic"))
    assert np.abs(ours - theirs).max() > 1e-3


def test_bicubic_matrix_rows_sum_to_one_and_clamp_edges():
    m = resample.bicubic_matrix(4, 9)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
    # output 0 of 4 -> 9 has src = -0.2777...: taps -2..1 clamp to 0, so pixel 0 takes 3 taps
    src = 0.5 * 4 / 9 - 0.5
    t = src - np.floor(src)
    w = resample._cubic_weights(np.array(t))
    np.testing.assert_allclose(m[0, 0], w[0] + w[1] + w[2], atol=1e-7)


def test_nearest2x_matches_torch():
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 5)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x), scale_factor=2, mode="nearest").numpy()
    np.testing.assert_array_equal(np.asarray(resample.upsample_nearest2x(x, layout="NCHW")), want)


def test_llamagen_eval_uint8_matches_official_recipe():
    rng = np.random.default_rng(4)
    # overshoot past ±1 on purpose: the official code clamps only after the resize
    x = np.clip(rng.standard_normal((2, 3, 24, 24)).astype(np.float32) * 0.8, -1.3, 1.3)
    t = F.interpolate(torch.from_numpy(x), size=(16, 16), mode="bicubic")
    want = torch.clamp(127.5 * t + 128.0, 0, 255).permute(0, 2, 3, 1).to(dtype=torch.uint8).numpy()
    got = np.asarray(resample.llamagen_eval_uint8(x, 16, layout="NCHW"))
    assert got.dtype == np.uint8 and got.shape == (2, 16, 16, 3)
    # the float values agree to ~1e-6, so a cast can differ by one level only at exact .0 ties
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    got_nhwc = np.asarray(resample.llamagen_eval_uint8(x.transpose(0, 2, 3, 1), 16))
    np.testing.assert_array_equal(got_nhwc, got)
    # exact rule on hand-picked values: truncation after +128
    v = np.array([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5, -2.0], np.float32)
    np.testing.assert_array_equal(np.asarray(resample.llamagen_to_uint8(v)),
                                  torch.clamp(127.5 * torch.from_numpy(v) + 128.0, 0, 255).to(torch.uint8).numpy())


def test_llamagen_to_uint8_is_exact_under_jit_on_rounding_boundaries():
    # 127.5·x lands on integers here; a fused multiply-add would give 1.99999… → 1 instead of 2
    v = np.arange(-1.1, 1.1, 1 / 127.5 / 4).astype(np.float32)
    v = np.concatenate([v, np.nextafter(v, np.float32(2)), np.nextafter(v, np.float32(-2))])
    want = torch.clamp(127.5 * torch.from_numpy(v) + 128.0, 0, 255).to(torch.uint8).numpy()
    got = np.asarray(jax.jit(resample.llamagen_to_uint8)(v))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("ih,oh", SIZE_PAIRS)
def test_bicubic_weights_bit_identical_to_torch(ih, oh):
    # impulses along W with H 1 -> 1 (an exact identity) read torch's float32 weights directly
    eye = torch.eye(ih, dtype=torch.float32).reshape(ih, 1, 1, ih)
    torch_m = F.interpolate(eye, size=(1, oh), mode="bicubic").reshape(ih, oh).T.numpy()
    np.testing.assert_array_equal(resample.bicubic_matrix(ih, oh), torch_m)
