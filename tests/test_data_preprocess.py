"""Official view pipelines: ADM centre crop, torchvision TenCrop order, VAR resize + fixed crops."""

import numpy as np
import pytest
from PIL import Image

from cca_jax.data import preprocess


def _blocky(h, w, seed=0):
    """uint8 image whose 2x2 blocks are constant (so BOX halving is exact)."""
    small = np.random.default_rng(seed).integers(0, 256, (h // 2, w // 2, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, 2, 0), 2, 1)


def test_center_crop_arr_box_halving_then_crop():
    arr = _blocky(40, 64)
    out = preprocess.center_crop_arr(Image.fromarray(arr), 20)
    # short side 40 >= 2*20: one BOX halving to 32x20, bicubic to the same size, centre 20x20
    np.testing.assert_array_equal(out, arr[::2, ::2][:, 6:26])
    big = preprocess.center_crop_arr(Image.fromarray(_blocky(30, 50)), 281)  # upscaling
    assert big.shape == (281, 281, 3) and big.dtype == np.uint8


def test_ten_crop_order_and_offsets():
    arr = np.random.default_rng(1).integers(0, 256, (281, 281, 3), dtype=np.uint8)
    v = preprocess.ten_crop(arr, 256)
    assert v.shape == (10, 256, 256, 3)
    np.testing.assert_array_equal(v[0], arr[:256, :256])
    np.testing.assert_array_equal(v[1], arr[:256, 25:])
    np.testing.assert_array_equal(v[2], arr[25:, :256])
    np.testing.assert_array_equal(v[3], arr[25:, 25:])
    np.testing.assert_array_equal(v[4], arr[12:268, 12:268])  # int(round(12.5)) = 12
    np.testing.assert_array_equal(v[5], arr[:256, 25:][:, ::-1])  # mirror's top-left
    np.testing.assert_array_equal(v[9], arr[:, ::-1][12:268, 12:268])  # mirror's centre
    assert not np.array_equal(v[9], v[4][:, ::-1])  # 281 is odd: not the centre crop's mirror
    odd = preprocess.five_crop(np.zeros((403, 403, 3), np.uint8), 384)
    assert odd[4].shape == (384, 384, 3)
    assert [preprocess.LlamaGenTenCrop(s, r).crop_size for s, r in
            ((256, 1.1), (384, 1.1), (384, 1.05))] == [281, 422, 403]


def test_views_shapes_and_normalisation_match_torch():
    import torch
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    t = torch.from_numpy(u8).permute(2, 0, 1).float().div(255)
    ref_lg = ((t - 0.5) / 0.5).permute(1, 2, 0).numpy()
    ref_var = t.add(t).add_(-1).permute(1, 2, 0).numpy()
    assert np.array_equal(preprocess.to_pm1_llamagen(u8), ref_lg)
    assert np.array_equal(preprocess.to_pm1_var(u8), ref_var)
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    lg = preprocess.LlamaGenTenCrop(32, 1.1)(img, 0)
    assert lg.shape == (10, 32, 32, 3) and lg.dtype == np.float32 and lg.min() >= -1 and lg.max() <= 1
    cf = preprocess.LlamaGenCenterFlip(32)(img, 0)
    assert cf.shape == (2, 32, 32, 3) and np.array_equal(cf[1], cf[0][:, ::-1])


def test_torchvision_resize_short_sizes():
    img = Image.new("RGB", (500, 375))
    assert preprocess.torchvision_resize_short(img, 288).size == (384, 288)
    assert preprocess.torchvision_resize_short(Image.new("RGB", (375, 500)), 288).size == (288, 384)
    assert preprocess.torchvision_resize_short(Image.new("RGB", (333, 1000)), 288).size == (288, 864)
    same = Image.new("RGB", (288, 400))
    assert preprocess.torchvision_resize_short(same, 288) is same


def test_var_random_crops_are_fixed_and_in_range():
    v = preprocess.VarRandomCrops(image_size=32, num_views=4, seed=7)
    assert v.mid_size == 36
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    a, b = v(img, 5), v(img, 5)
    assert a.shape == (4, 32, 32, 3) and np.array_equal(a, b)  # reruns write the same tokens
    resized = np.asarray(preprocess.torchvision_resize_short(img, 36, Image.LANCZOS))
    assert resized.shape == (36, 54, 3)
    params = [v.crop_params(36, 54, 5, k) for k in range(4)]
    for k, (top, left, flip) in enumerate(params):
        assert 0 <= top <= 4 and 0 <= left <= 22 and not flip
        np.testing.assert_array_equal(a[k], preprocess.to_pm1_var(resized[top:top + 32, left:left + 32]))
    assert len(set(params)) > 1
    assert v.crop_params(36, 54, 6, 0) != v.crop_params(36, 54, 5, 0) or \
        v.crop_params(36, 54, 6, 1) != v.crop_params(36, 54, 5, 1)
    flips = {preprocess.VarRandomCrops(32, 1, seed=0, hflip=True).crop_params(36, 54, i, 0)[2]
             for i in range(20)}
    assert flips == {True, False}
    with pytest.raises(ValueError, match="num_views"):
        preprocess.VarRandomCrops(32, 0)
