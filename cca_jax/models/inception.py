"""The FID-Inception network (pytorch-fid's port of TF Inception-v3 "2015-12-05") in Flax, NHWC.

Architecture: torchvision's ``Inception3`` (``num_classes=1008``, no aux head, no input transform)
with pytorch-fid's patched blocks (``../shared/spec/evaluation.md`` §5): the pooling branch of
``Mixed_5b..5d`` / ``Mixed_6b..6e`` / ``Mixed_7b`` is a 3×3 stride-1 average pool that ignores
padded zeros (``count_include_pad=False``, as TF does), and ``Mixed_7c``'s pooling branch is a
3×3 *max* pool (a quirk of the TF graph). Every conv is ``BasicConv2d``: conv without bias →
BatchNorm(eps=1e-3, running statistics) → ReLU.

Parameter tree mirrors the official state-dict keys (``Mixed_6d/branch1x1/conv/kernel`` ↔
``Mixed_6d.branch1x1.conv.weight``); BatchNorm statistics are ordinary (frozen) parameters named
``scale``/``bias``/``mean``/``var`` so the whole network is one ``{'params': p}`` tree.
See ``cca_jax/convert/inception.py`` for loading ``pt_inception-2015-12-05-6726825d.pth``.

Outputs of :class:`FIDInceptionV3` (``B`` images):
  ``pool3``   [B, 2048]  global average pool after ``Mixed_7c`` (TF ``pool_3:0``): FID, IS, P/R.
  ``logits``  [B, 1008]  ``pool3 @ fc.weight.T`` **without** ``fc.bias``: the ADM evaluator feeds
                         ``pool_3`` into the weight of ``softmax/logits/MatMul`` only (IS).
  ``spatial`` [B, h·w·7] the first 7 channels of ``Mixed_6d.branch1x1`` (conv→BN→ReLU output),
                         flattened in NHWC order (h = w = 17 at 299 px: 2023 values). TF's graph
                         names the blocks mixed, mixed_1 … mixed_10 for Mixed_5b … Mixed_7c, so
                         ``mixed_6`` is ``Mixed_6d`` and its first conv ``mixed_6/conv`` (a ReLU
                         op in the frozen graph) is the 1×1 branch: the sFID features.

Front ends (``preprocess``):
  ``"pytorch_fid"`` (default, matches the pytorch-fid package): x/255 → bilinear resize to 299
      with half-pixel centres (``F.interpolate(..., 'bilinear', align_corners=False)``, no
      antialias) → 2x − 1.
  ``"tf1"`` (matches the ADM TF graph's own front end): TF1 legacy ``ResizeBilinear``
      (align_corners=False, no half-pixel offset) on [0, 255] → (x − 128)/128.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
BN_EPS = 1e-3
PREPROCESS_MODES = ("pytorch_fid", "tf1")

_ACT = ("act_batch", None, None, "act_embed")
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Resizing (static interpolation matrices: exact PyTorch / TF1 index arithmetic, no antialias)


def bilinear_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """``[out_size, in_size]`` float32 weights of 1-D bilinear resampling.

    mode ``"half_pixel"``: PyTorch ``align_corners=False`` — src = (dst + 0.5)·in/out − 0.5,
    clamped at 0 (pytorch-fid). mode ``"tf1"``: TF1 legacy ``ResizeBilinear`` — src = dst·in/out.
    Both take floor(src) and the next index clamped to the edge, in float32 like the kernels.
    Weights are constants of the traced program (static shapes).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    if mode == "half_pixel":
        # PyTorch's CPU kernel evaluates scale·(dst + ½) − ½ as one fused multiply-add (one
        # rounding to float32); separate float32 ops put λ off by an ulp of src (≈1e-6 in the image)
        src = (np.float64(scale) * (dst + np.float32(0.5)).astype(np.float64) - 0.5).astype(np.float32)
        src = np.maximum(src, np.float32(0))
    elif mode == "tf1":
        src = dst * scale
    else:
        raise ValueError(f"resize mode {mode!r}; expected 'half_pixel' or 'tf1'.")
    lo = np.floor(src).astype(np.int64)
    lo = np.minimum(lo, in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    lam = (src - lo.astype(np.float32)).astype(np.float32)
    w = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(w, (rows, lo), np.float32(1) - lam)
    np.add.at(w, (rows, hi), lam)
    return w


def resize_bilinear(x_BHWC: jax.Array, size: tuple[int, int], mode: str = "half_pixel") -> jax.Array:
    """Bilinear resize of ``[B, H, W, C]`` float images to ``[B, size[0], size[1], C]``."""
    _, H, W, _ = x_BHWC.shape
    if (H, W) == tuple(size):
        return x_BHWC  # both conventions are the identity at scale 1
    wy = jnp.asarray(bilinear_matrix(H, size[0], mode))
    wx = jnp.asarray(bilinear_matrix(W, size[1], mode))
    x = jnp.einsum("oh,bhwc->bowc", wy, x_BHWC, precision=_HIGHEST)
    return jnp.einsum("pw,bowc->bopc", wx, x, precision=_HIGHEST)


def preprocess(images_BHWC: jax.Array, mode: str = "pytorch_fid", size: int = INPUT_SIZE) -> jax.Array:
    """uint8 (or float in [0, 255]) ``[B, H, W, 3 or 1]`` → float32 ``[B, size, size, 3]`` in ≈[−1, 1]."""
    x = images_BHWC.astype(jnp.float32)
    if x.shape[-1] == 1:  # grayscale: the same value in R, G and B
        x = jnp.repeat(x, 3, axis=-1)
    if mode == "pytorch_fid":
        x = resize_bilinear(x / 255.0, (size, size), "half_pixel")
        return 2.0 * x - 1.0
    if mode == "tf1":
        x = resize_bilinear(x, (size, size), "tf1")
        return (x - 128.0) * (1.0 / 128.0)
    raise ValueError(f"config.eval.inception_preprocess={mode!r}; expected one of {PREPROCESS_MODES}.")


# --------------------------------------------------------------------------------------------
# Layers


class FrozenBatchNorm(nn.Module):
    """Inference BatchNorm over the last axis with its running statistics as parameters."""

    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x):
        C = x.shape[-1]
        p = lambda name, init: self.param(name, nn.with_logical_partitioning(init, ("norm",)), (C,))
        scale, bias = p("scale", nn.initializers.ones), p("bias", nn.initializers.zeros)
        mean, var = p("mean", nn.initializers.zeros), p("var", nn.initializers.ones)
        inv = scale * jax.lax.rsqrt(var + self.eps)
        return x * inv + (bias - mean * inv)


class BasicConv2d(nn.Module):
    """conv (no bias) → FrozenBatchNorm → ReLU; ``padding`` is ((top, bottom), (left, right))."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, self.kernel, self.strides, padding=self.padding, use_bias=False,
                    precision=self.precision, name="conv",
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
                        ("height", "width", "conv_in", "conv_out")))(x)
        x = FrozenBatchNorm(name="bn")(x)
        return nn.with_logical_constraint(nn.relu(x), _ACT)


def _pad(ph: int, pw: int):
    return ((ph, ph), (pw, pw))


def _avg_pool_same(x):
    # TF's average pool divides by the number of real (unpadded) inputs
    return nn.avg_pool(x, (3, 3), (1, 1), padding=_pad(1, 1), count_include_pad=False)


def _max_pool_same(x):
    return nn.max_pool(x, (3, 3), (1, 1), padding=_pad(1, 1))


def _max_pool_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    """35×35 block: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avgpool→1×1 (64+64+96+pool_features)."""

    pool_features: int
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(64, name="branch1x1")(x)
        b5 = conv(48, name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=_pad(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """35→17 reduction: 3×3 s2 | 1×1→3×3→3×3 s2 | maxpool s2 (384+96+C_in)."""

    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(384, (3, 3), (2, 2), name="branch3x3")(x)
        bd = conv(64, name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """17×17 block with factorised 7×7 convs (4×192 = 768 channels out).

    Returns ``(out, branch1x1)`` so ``Mixed_6d``'s 1×1 branch can serve as the sFID features.
    """

    channels_7x7: int
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, name="branch1x1")(x)
        b7 = conv(c7, name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=_pad(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=_pad(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=_pad(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=_pad(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=_pad(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=_pad(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
    """17→8 reduction: 1×1→3×3 s2 | 1×1→1×7→7×1→3×3 s2 | maxpool s2 (320+192+C_in)."""

    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(192, name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
        b7 = conv(192, name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=_pad(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=_pad(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """8×8 block: 1×1 | 1×1→[1×3, 3×1] | 1×1→3×3→[1×3, 3×1] | pool→1×1 (2048 out).

    ``pool``: ``"avg"`` (FIDInceptionE_1, Mixed_7b) or ``"max"`` (FIDInceptionE_2, Mixed_7c).
    """

    pool: str = "avg"
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(320, name="branch1x1")(x)
        b3 = conv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, (1, 3), padding=_pad(0, 1), name="branch3x3_2a")(b3),
                              conv(384, (3, 1), padding=_pad(1, 0), name="branch3x3_2b")(b3)], -1)
        bd = conv(448, name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=_pad(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([conv(384, (1, 3), padding=_pad(0, 1), name="branch3x3dbl_3a")(bd),
                              conv(384, (3, 1), padding=_pad(1, 0), name="branch3x3dbl_3b")(bd)], -1)
        pooled = _avg_pool_same(x) if self.pool == "avg" else _max_pool_same(x)
        bp = conv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class LogitsNoBias(nn.Module):
    """``fc`` of the checkpoint: holds ``kernel`` [C, K] and ``bias`` [K] but returns ``x @ kernel``.

    The ADM evaluator computes its softmax from the MatMul weight alone; the bias is kept only so
    the state dict round-trips strictly.
    """

    features: int
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x_BC):
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("conv_in", "classes")), (x_BC.shape[-1], self.features))
        self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
                   (self.features,))
        return jnp.dot(x_BC, kernel, precision=self.precision)


# --------------------------------------------------------------------------------------------
# The network


class FIDInceptionV3(nn.Module):
    """``apply({'params': p}, images_BHWC)`` → ``{'pool3', 'logits', 'spatial'}`` (see module doc).

    images_BHWC: uint8 ``[B, H, W, 3]`` RGB (or float in [0, 255]); any H, W (resized to
    ``resize_to``; 299 for real evaluations, ≥ 75 works for smoke tests).
    """

    resize_to: int = INPUT_SIZE
    preprocess: str = "pytorch_fid"
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, images_BHWC):
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess={self.preprocess!r}; expected one of {PREPROCESS_MODES} "
                             "(config.eval.inception_preprocess).")
        x = preprocess(images_BHWC, self.preprocess, self.resize_to)
        x = nn.with_logical_constraint(x, _ACT)
        conv = functools.partial(BasicConv2d, precision=self.precision)
        x = conv(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=_pad(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_s2(x)
        x = conv(80, name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_s2(x)
        p = self.precision
        x = InceptionA(32, p, name="Mixed_5b")(x)
        x = InceptionA(64, p, name="Mixed_5c")(x)
        x = InceptionA(64, p, name="Mixed_5d")(x)
        x = InceptionB(p, name="Mixed_6a")(x)
        x, _ = InceptionC(128, p, name="Mixed_6b")(x)
        x, _ = InceptionC(160, p, name="Mixed_6c")(x)
        x, spatial = InceptionC(160, p, name="Mixed_6d")(x)
        x, _ = InceptionC(192, p, name="Mixed_6e")(x)
        x = InceptionD(p, name="Mixed_7a")(x)
        x = InceptionE("avg", p, name="Mixed_7b")(x)
        x = InceptionE("max", p, name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        logits = LogitsNoBias(NUM_CLASSES, p, name="fc")(pool3)
        spatial = spatial[..., :SPATIAL_CHANNELS]
        return {"pool3": pool3, "logits": logits,
                "spatial": spatial.reshape(spatial.shape[0], -1)}


def random_params(seed: int = 0) -> Any:
    """Random params in numpy (fast; ``model.init`` compiles the whole network): He-normal convs,
    BatchNorm with random statistics near identity, so activations stay O(1) through every block.
    For tests and smoke runs only; real evaluations load the published weights."""
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(abstract_params())
    out = {}
    for path, leaf in sorted(flat.items()):
        shape, name = leaf.shape, path[-1]
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            v = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif name == "scale":
            v = rng.uniform(0.8, 1.2, shape)
        elif name == "var":
            v = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            v = rng.normal(0.0, 0.1, shape)
        out[path] = v.astype(np.float32)
    return flax.traverse_util.unflatten_dict(out)


@functools.lru_cache(maxsize=1)
def _abstract_params_cached() -> Any:
    x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.uint8)
    return nn.meta.unbox(jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), x)["params"])


def abstract_params() -> Any:
    """Shapes/dtypes of the params tree (``jax.ShapeDtypeStruct`` leaves), without computing.
    They do not depend on the front end or the input size."""
    return _abstract_params_cached()


def feature_apply(model: FIDInceptionV3 | None = None):
    """``(params, images_BHWC uint8) -> {'pool', 'spatial', 'logits'}`` with the metric-side names
    used by ``cca_jax/evaluate.py`` (pool = pool3)."""
    model = model or FIDInceptionV3()

    def apply(params, images_BHWC):
        out = model.apply({"params": params}, images_BHWC)
        return {"pool": out["pool3"], "spatial": out["spatial"], "logits": out["logits"]}

    return apply
