"""FID-Inception in Flax: parity with the pytorch-fid package, resize front ends, weight converter.

The reference network is built by pytorch-fid itself (``pytorch_fid.inception.InceptionV3``, its
``fid_inception_v3`` and FIDInception* blocks over torchvision's ``Inception3``), with the weight
download replaced by our random state dict. torchvision 0.28 from PyPI is a CUDA build whose C
extension cannot load beside the CPU torch wheel (``import torchvision`` fails with "operator
torchvision::nms does not exist") and no CPU build of it is on PyPI; when the import fails,
:func:`_pytorch_fid_inception` loads torchvision's *real* ``models/inception.py`` under stand-in
parent packages that skip ``torchvision/__init__.py`` (the only part that needs the extension).
No torchvision code is rewritten here.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import jax
import numpy as np
import pytest

from cca_jax.convert import inception as convert
from cca_jax.convert.common import CheckpointMismatchError, save_torch_file
from cca_jax.models import inception as inc


def _import_torchvision_inception():
    """``torchvision.models.inception``, through the real package or the stand-in parents."""
    try:
        import torchvision.models.inception as tv_inception  # noqa: F401
        return tv_inception
    except (ImportError, RuntimeError, OSError):
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    spec = importlib.util.find_spec("torchvision")
    assert spec is not None and spec.submodule_search_locations, "torchvision is not installed"
    root = list(spec.submodule_search_locations)[0]
    from importlib import metadata
    tv = types.ModuleType("torchvision")
    tv.__path__ = [root]
    tv.__version__ = metadata.version("torchvision")
    models = types.ModuleType("torchvision.models")
    models.__path__ = [root + "/models"]
    tv.models = models
    sys.modules["torchvision"], sys.modules["torchvision.models"] = tv, models
    tv_inception = importlib.import_module("torchvision.models.inception")
    models.inception_v3, models.Inception3 = tv_inception.inception_v3, tv_inception.Inception3
    return tv_inception


def _pytorch_fid_inception(state_dict):
    """pytorch-fid's ``InceptionV3(output_blocks=[3])`` loaded (strictly) with ``state_dict``."""
    import torch

    _import_torchvision_inception()
    pfi = importlib.import_module("pytorch_fid.inception")
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda url, progress=True: dict(tensors)
    try:
        model = pfi.InceptionV3(output_blocks=[3])
    finally:
        pfi.load_state_dict_from_url = original
    return model.eval()


@pytest.fixture(scope="module")
def params():
    return inc.random_params(seed=3)


@pytest.mark.parity
def test_parity_with_pytorch_fid(params):
    """pool3 / logits (pool3·Wᵀ) / Mixed_6d.branch1x1[..., :7] of 2 images vs pytorch-fid."""
    import torch

    torch.set_num_threads(1)
    sd = convert.to_state_dict(params)
    ref = _pytorch_fid_inception(sd)
    captured = {}
    mixed_6d = ref.blocks[2][6]
    assert type(mixed_6d).__name__ == "FIDInceptionC"
    mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("b1", o))

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 80, 96, 3), dtype=np.uint8)  # non-square, upsampled to 299
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        pool_ref = ref(x)[0][:, :, 0, 0].numpy()
        logits_ref = (torch.from_numpy(pool_ref) @ torch.from_numpy(sd["fc.weight"]).T).numpy()
        spatial_ref = captured["b1"].permute(0, 2, 3, 1)[..., :7].reshape(2, -1).numpy()

    out = jax.jit(inc.feature_apply())(params, images)
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert out["spatial"].shape == (2, 17 * 17 * 7)
    for name, want in [("pool", pool_ref), ("logits", logits_ref), ("spatial", spatial_ref)]:
        got = np.asarray(out[name])
        err = np.abs(got - want).max()
        print(f"{name}: max|ref| {np.abs(want).max():.3f} max abs err {err:.2e}")
        assert err <= 1e-4, (name, err)


# ------------------------------------------------------------------------------------ resizing


@pytest.mark.parametrize("hw", [(80, 96), (320, 301), (37, 23), (299, 299), (512, 256)])
def test_half_pixel_resize_matches_torch_interpolate(hw):
    import torch
    import torch.nn.functional as F

    x = np.random.default_rng(1).uniform(size=(2, *hw, 3)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                         align_corners=False).permute(0, 2, 3, 1).numpy()
    got = np.asarray(jax.jit(lambda a: inc.resize_bilinear(a, (299, 299), "half_pixel"))(x))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("hw", [(64, 64), (256, 256), (320, 301)])
def test_tf1_resize_matches_tensorflow_legacy_resize_bilinear(hw):
    import tensorflow as tf

    x = np.random.default_rng(2).integers(0, 256, (1, *hw, 3)).astype(np.float32)
    want = tf.compat.v1.image.resize_bilinear(x, [299, 299], align_corners=False,
                                              half_pixel_centers=False).numpy()
    got = np.asarray(jax.jit(lambda a: inc.resize_bilinear(a, (299, 299), "tf1"))(x))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)  # values in [0, 255]
    # and the half-pixel convention really is a different grid
    assert np.abs(np.asarray(inc.resize_bilinear(x, (299, 299), "half_pixel")) - want).max() > 1.0


def test_preprocess_front_ends():
    x = np.array([0, 128, 255], np.uint8).reshape(1, 1, 3, 1)  # grayscale -> RGB
    x = np.tile(x, (1, 3, 1, 1))  # [1, 3, 3, 1]
    tf1 = np.asarray(inc.preprocess(x, "tf1", size=3))
    torch_like = np.asarray(inc.preprocess(x, "pytorch_fid", size=3))
    assert tf1.shape == torch_like.shape == (1, 3, 3, 3)
    np.testing.assert_allclose(tf1[0, 0, :, 0], [-1.0, 0.0, 127.0 / 128.0])
    np.testing.assert_allclose(torch_like[0, 0, :, 0], [-1.0, 1.0 / 255.0, 1.0], atol=1e-7)
    with pytest.raises(ValueError, match="inception_preprocess"):
        inc.preprocess(x, "bicubic")


# ------------------------------------------------------------------------------------ converter


def test_converter_round_trip_and_strict_keys(params, tmp_path):
    sd = convert.to_state_dict(params)
    expected = convert.expected_state_dict_shapes()
    assert set(sd) == set(expected) and len(sd) == 94 * 5 + 2  # 94 convs (+4 BN each), fc
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Mixed_6d.branch1x1.conv.weight"].shape == (192, 768, 1, 1)
    assert sd["Mixed_7c.branch3x3_2a.conv.weight"].shape == (384, 384, 1, 3)
    assert "Mixed_6d.branch7x7_2.bn.running_var" in sd
    back = convert.from_state_dict(sd)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    # the counters a live PyTorch state dict carries are accepted and ignored
    with_counters = convert.to_state_dict(params, num_batches_tracked=True)
    assert len(with_counters) == len(sd) + 94
    jax.tree_util.tree_map(np.testing.assert_array_equal, convert.from_state_dict(with_counters), params)

    missing = dict(sd)
    del missing["Mixed_5b.branch_pool.bn.running_mean"]
    with pytest.raises(CheckpointMismatchError, match="Mixed_5b.branch_pool.bn.running_mean"):
        convert.from_state_dict(missing)
    extra = dict(sd, **{"AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})
    with pytest.raises(CheckpointMismatchError, match="AuxLogits.fc.weight"):
        convert.from_state_dict(extra)
    bad = dict(sd, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    with pytest.raises(CheckpointMismatchError, match="fc.weight"):
        convert.from_state_dict(bad)

    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    save_torch_file(with_counters, path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, convert.load_checkpoint(path), params)
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        convert.load_checkpoint("")
