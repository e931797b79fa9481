"""Order statistics of float32 rows without sorting: a bitwise search over order-preserving keys.

Top-k and top-p filtering only need a threshold per row (the k-th largest logit; the smallest
logit the nucleus keeps), not the sorted values. XLA:CPU's ``lax.top_k`` with a large k is a
partial sort per row and its sort is slow: at VAR's top-k 900 of V = 4096 over 2048 rows,
``lax.top_k`` takes 0.36-1.1 s and a sort 1.2 s, while the 32 counting passes here take 0.1 s
(``python -m cca_jax.bench.filter``). The results are exact: the search returns a key that is
present in the row.

Each float32 maps to a uint32 :func:`order_key` with the same order (``-0.0`` folded into
``+0.0``, as float comparison does), and :func:`largest_key_where` finds, bit by bit from the top,
the largest key for which a monotone predicate holds: 32 reductions over the row.

Shapes: ``[..., V]`` rows; thresholds come back ``[..., 1]``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

_SIGN = 0x80000000


def order_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with ``x < y  <=>  key(x) < key(y)`` for non-NaN values."""
    x = jnp.where(x == 0, jnp.float32(0), x.astype(jnp.float32))
    b = jax.lax.bitcast_convert_type(x, jnp.int32)
    # negative floats order backwards in their magnitude bits: flip those
    b = jnp.where(b < 0, b ^ jnp.int32(0x7FFFFFFF), b)
    return jax.lax.bitcast_convert_type(b, jnp.uint32) ^ jnp.uint32(_SIGN)


def from_order_key(key: jax.Array) -> jax.Array:
    """Inverse of :func:`order_key` (uint32 -> float32)."""
    b = jax.lax.bitcast_convert_type(key ^ jnp.uint32(_SIGN), jnp.int32)
    b = jnp.where(b < 0, b ^ jnp.int32(0x7FFFFFFF), b)
    return jax.lax.bitcast_convert_type(b, jnp.float32)


def largest_key_where(holds: Callable[[jax.Array], jax.Array], shape: tuple[int, ...]) -> jax.Array:
    """The largest uint32 ``c`` (per row, ``shape``) with ``holds(c)`` true, for a predicate that
    is true up to some key and false above it (``holds(0)`` must be true)."""
    def body(i, prefix):
        cand = prefix | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(holds(cand), cand, prefix)

    return jax.lax.fori_loop(0, 32, body, jnp.zeros(shape, jnp.uint32))


def kth_largest(x: jax.Array, k: int) -> jax.Array:
    """``[..., 1]``: the k-th largest value of each row of ``x [..., V]`` (1 <= k <= V), equal to
    ``lax.top_k(x, k)[0][..., -1:]``."""
    V = x.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"k={k} must be in [1, {V}].")
    key = order_key(x)
    kth = largest_key_where(lambda c: jnp.sum(key >= c, -1, keepdims=True) >= k,
                            x.shape[:-1] + (1,))
    return from_order_key(kth)


def mass_cut(x: jax.Array, probs: jax.Array, mass: jax.Array | float) -> jax.Array:
    """``[..., 1]``: the smallest value ``b`` of each row with ``sum(probs[x <= b]) > mass``
    (the first value an ascending cumulative sum of ``probs`` carries above ``mass``), or the
    row's largest value where none does (float rounding at ``mass`` near 1).

    Ties at ``b`` are left to the caller (they share one probability each).
    """
    key = order_key(x)
    rows = x.shape[:-1] + (1,)
    below = largest_key_where(
        lambda c: jnp.sum(jnp.where(key <= c, probs, 0.0), -1, keepdims=True) <= mass, rows)
    first_above = jnp.min(jnp.where(key > below, key, jnp.uint32(0xFFFFFFFF)), -1, keepdims=True)
    return from_order_key(jnp.minimum(first_above, jnp.max(key, -1, keepdims=True)))
