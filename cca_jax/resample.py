"""PyTorch-exact image resampling as small matrix multiplies.

``torch.nn.functional.interpolate`` semantics (``../shared/spec/var.md`` §6). The bicubic weight
matrices are bit-identical to the float32 weights of torch's CPU kernel; only the summation order
differs (max abs error 1.9e-6 on N(0, 3²) inputs over 23 size pairs; area 4.8e-7;
tests/test_resample.py asserts 1e-5):

* ``bicubic`` (``align_corners=False``, no antialias, both directions): source coordinate
  ``x_src = (x_dst + 0.5)·in/out − 0.5`` (never clamped), 4 taps ``floor(x_src) − 1 … + 2`` whose
  indices are clamped into ``[0, in − 1]`` (edge replication; weights of clamped taps add up on
  the border pixel), Keys kernel with ``A = −0.75``. ``jax.image.resize('cubic')`` is *not* this
  (A = −0.5 and antialiasing when shrinking).
* ``area`` = ``adaptive_avg_pool2d``: output cell ``o`` averages input indices
  ``[floor(o·in/out), ceil((o+1)·in/out))`` — the windows overlap when ``out`` does not divide
  ``in``; works for shrinking and enlarging alike.

Each mode is one ``[out, in]`` float32 weight matrix per axis, computed once with numpy per
``(in, out)`` pair (cached; bicubic replays torch's float32 operation order, area uses 1/count)
and applied separably: width first, then height (the order PyTorch's
CPU kernel combines its taps in). Everything is static-shape and jit friendly.

Layouts: the resize functions take ``layout="NHWC"`` (default; ``[..., H, W, C]``) or
``layout="NCHW"`` (``[..., C, H, W]``, PyTorch's). Leading dimensions are arbitrary.

LlamaGen's evaluation images (``../shared/spec/sampling.md`` §1.7): :func:`llamagen_eval_uint8`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

BICUBIC_A = -0.75  # PyTorch's cubic convolution constant (OpenCV's too); PIL/JAX use -0.5

_LAYOUTS = ("NHWC", "NCHW")


def _fma32(a, b, c):
    """float32 fused multiply-add (the product of two float32s is exact in float64)."""
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def _cubic_weights(t: np.ndarray, A: float = BICUBIC_A) -> np.ndarray:
    """Keys kernel weights ``[..., 4]`` (taps at offsets -1, 0, 1, 2) for fractions ``t``, float32.

    The operation order — and where PyTorch's CPU build fuses multiply-adds — follows
    ``get_cubic_upsample_coefficients``: ``x1 = t``, ``x2 = 1 - t``, the outer taps evaluated at
    ``x1 + 1`` and ``x2 + 1`` (so ``2 - t`` is rounded twice). This reproduces torch's float32
    weights bit for bit on every size pair tested (tests/test_resample.py), which keeps the
    multi-scale VQ residuals — and so the nearest-code decisions — as close to torch as possible.
    """
    f = np.float32
    A = f(A)
    t = np.asarray(t, f)

    def near(x):  # |x| <= 1: ((A + 2) x - (A + 3)) x x + 1
        a = (A + f(2)) * x - (A + f(3))
        return (a * x) * x + f(1)

    def far(x):  # 1 < |x| < 2: ((A x - 5A) x + 8A) x - 4A
        a = _fma32(A, x, -f(5) * A)
        b = _fma32(a, x, f(8) * A)
        return b * x - f(4) * A

    x2 = f(1) - t
    return np.stack([far(t + f(1)), near(t), near(x2), far(x2 + f(1))], axis=-1).astype(f)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out_size, in_size]`` float32 weights of PyTorch bicubic (align_corners=False, A=-0.75).

    Row ``o`` holds the 4 tap weights of output pixel ``o``; taps falling outside the input are
    clamped to the border pixel, so their weights add to it (PyTorch's index clamping). The
    source coordinate is computed like torch's CPU kernel in float32:
    ``src = fma(in/out, o + 0.5, -0.5)``.
    """
    _check_sizes(in_size, out_size, "bicubic")
    f = np.float32
    scale = f(in_size) / f(out_size)
    src = _fma32(scale, np.arange(out_size, dtype=f) + f(0.5), f(-0.5))
    base = np.floor(src)
    w = _cubic_weights(src - base)  # [out, 4]
    idx = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
    m = np.zeros((out_size, in_size), f)
    for j in range(4):  # sequential float32 adds, in tap order, where clamped taps coincide
        m[np.arange(out_size), idx[:, j]] += w[:, j]
    return m


def area_bounds(in_size: int, out_size: int) -> list[tuple[int, int]]:
    """PyTorch adaptive-pooling windows ``[start, end)``: ``floor(o·in/out)``, ``ceil((o+1)·in/out)``."""
    _check_sizes(in_size, out_size, "area")
    return [((o * in_size) // out_size, -((-(o + 1) * in_size) // out_size)) for o in range(out_size)]


@functools.lru_cache(maxsize=None)
def area_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out_size, in_size]`` float32 averaging weights of ``mode='area'`` (adaptive avg pool)."""
    m = np.zeros((out_size, in_size), np.float64)
    for o, (s, e) in enumerate(area_bounds(in_size, out_size)):
        m[o, s:e] = 1.0 / (e - s)
    return m.astype(np.float32)


def _check_sizes(in_size, out_size, mode):
    if int(in_size) < 1 or int(out_size) < 1:
        raise ValueError(f"{mode} resize from {in_size} to {out_size} pixels: both sizes must be >= 1.")


def _hw_axes(ndim: int, layout: str) -> tuple[int, int]:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {_LAYOUTS}.")
    if ndim < 3:
        raise ValueError(f"resize needs an array with at least 3 dims ([..., H, W, C] or [..., C, H, W]), got {ndim}.")
    return (ndim - 3, ndim - 2) if layout == "NHWC" else (ndim - 2, ndim - 1)


def _out_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def apply_separable(x: jax.Array, m_h: np.ndarray | None, m_w: np.ndarray | None,
                    layout: str = "NHWC") -> jax.Array:
    """Applies ``[out, in]`` matrices along the width then the height axis (None = identity).

    Computed in float32 at HIGHEST matmul precision whatever the backend (TPU defaults to bf16
    passes, which would break the 1e-5 parity of the resampled values).
    """
    ax_h, ax_w = _hw_axes(x.ndim, layout)
    dtype = x.dtype
    x = x.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    if m_w is not None:
        x = jnp.moveaxis(jnp.tensordot(x, jnp.asarray(m_w), axes=((ax_w,), (1,)), precision=hi), -1, ax_w)
    if m_h is not None:
        x = jnp.moveaxis(jnp.tensordot(x, jnp.asarray(m_h), axes=((ax_h,), (1,)), precision=hi), -1, ax_h)
    return x.astype(dtype)


def resize_bicubic(x: jax.Array, size: int | Sequence[int], layout: str = "NHWC") -> jax.Array:
    """``F.interpolate(x, size, mode='bicubic', align_corners=False)`` (no antialias).

    x: ``[..., H, W, C]`` (NHWC) or ``[..., C, H, W]`` (NCHW); returns the same layout with
    ``(H, W)`` replaced by ``size`` (an int or ``(h, w)``). Values are not clamped (overshoot
    beyond the input range is PyTorch's behaviour too). Same size in and out is the identity.
    """
    ax_h, ax_w = _hw_axes(x.ndim, layout)
    oh, ow = _out_hw(size)
    ih, iw = x.shape[ax_h], x.shape[ax_w]
    m_h = None if ih == oh else bicubic_matrix(ih, oh)
    m_w = None if iw == ow else bicubic_matrix(iw, ow)
    return apply_separable(x, m_h, m_w, layout)


def resize_area(x: jax.Array, size: int | Sequence[int], layout: str = "NHWC") -> jax.Array:
    """``F.interpolate(x, size, mode='area')`` = ``adaptive_avg_pool2d(x, size)``; layouts as
    :func:`resize_bicubic`."""
    ax_h, ax_w = _hw_axes(x.ndim, layout)
    oh, ow = _out_hw(size)
    ih, iw = x.shape[ax_h], x.shape[ax_w]
    m_h = None if ih == oh else area_matrix(ih, oh)
    m_w = None if iw == ow else area_matrix(iw, ow)
    return apply_separable(x, m_h, m_w, layout)


def upsample_nearest2x(x: jax.Array, layout: str = "NHWC") -> jax.Array:
    """``F.interpolate(x, scale_factor=2, mode='nearest')``: every pixel replicated 2×2."""
    ax_h, ax_w = _hw_axes(x.ndim, layout)
    return jnp.repeat(jnp.repeat(x, 2, axis=ax_h), 2, axis=ax_w)


def llamagen_to_uint8(x: jax.Array) -> jax.Array:
    """The official sample scripts' float → uint8 rule: ``clamp(127.5·x + 128.0, 0, 255)`` then a
    truncating cast (so effectively round-half-up of ``127.5·(x + 1)``). Shape unchanged."""
    # torch rounds 127.5·x before adding 128; under jit XLA:CPU fuses x·127.5 + 128 into one FMA,
    # which on a rounding boundary truncates to one gray level less. 128·x and 0.5·x are exact, so
    # their difference is 127.5·x rounded once, fused or not.
    x = x.astype(jnp.float32)
    y = jnp.clip((x * jnp.float32(128.0) - x * jnp.float32(0.5)) + jnp.float32(128.0), 0.0, 255.0)
    return y.astype(jnp.uint8)  # y >= 0, so the float -> int conversion truncates like torch's .to(uint8)


def llamagen_eval_uint8(x: jax.Array, size: int | None = 256, layout: str = "NHWC") -> jax.Array:
    """LlamaGen/CCA evaluation image: tokenizer output → ``[B, size, size, 3]`` uint8 (HWC order).

    Mirrors ``sample_c2i_ddp.py`` / ``LlamaGen_sample_ddp.py`` (``sampling.md`` §1.7):
    ``x = decode_code(...)`` is a float image ≈[-1, 1], **not** clamped; if the decode size differs
    from ``size`` (384 → 256 in every paper run) it is resized with PyTorch bicubic (A = −0.75,
    align_corners False, no antialias) *on the float image*, so overshoot past ±1 is kept until
    the uint8 conversion; then :func:`llamagen_to_uint8` (clamp to [0, 255] after ``127.5·x + 128``,
    truncating cast). ``size=None`` skips the resize. ``layout`` is the layout of ``x``; the
    result is always NHWC (what the official scripts save as PNG).
    """
    if size is not None:
        x = resize_bicubic(x, size, layout)
    if layout == "NCHW":
        x = jnp.moveaxis(x, -3, -1)
    return llamagen_to_uint8(x)
