"""Order statistics by bitwise search: exact against lax.top_k and a numpy transcription."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cca_jax.sampling import select


def test_order_key_preserves_float_order_and_round_trips():
    x = jnp.array([-jnp.inf, -3e38, -2.5, -1e-30, -0.0, 0.0, 1e-30, 1.0, 1.0000001, 3e38, jnp.inf])
    key = np.asarray(select.order_key(x)).astype(np.int64)
    assert np.all(np.diff(key[[0, 1, 2, 3, 5, 6, 7, 8, 9, 10]]) > 0)
    assert key[4] == key[5]  # -0.0 == +0.0, as float comparison has it
    back = np.asarray(select.from_order_key(select.order_key(x)))
    np.testing.assert_array_equal(back, np.where(np.asarray(x) == 0, 0.0, np.asarray(x)))


@pytest.mark.parametrize("k", [1, 2, 37, 900, 4096])
def test_kth_largest_equals_lax_top_k(k):
    x = jax.random.normal(jax.random.key(k), (6, 4096)) * 3
    ties = jnp.round(x * 2) / 2  # many equal values
    negative = -jnp.abs(x) - 1
    special = x.at[:, :100].set(-jnp.inf).at[:, 100:110].set(-0.0).at[:, 110:120].set(0.0)
    for rows in (x, ties, negative, special):
        want = jax.lax.top_k(rows, k)[0][:, -1:]
        np.testing.assert_array_equal(np.asarray(jax.jit(select.kth_largest, static_argnums=1)(rows, k)),
                                      np.asarray(want))


def test_kth_largest_rejects_k_out_of_range():
    with pytest.raises(ValueError, match=r"k=0 must be in \[1, 5\]"):
        select.kth_largest(jnp.zeros((2, 5)), 0)


def _mass_cut_reference(x, p, mass):
    """Ascending stable sort; the first value whose running mass exceeds ``mass``."""
    order = np.argsort(x, kind="stable")
    cum = np.cumsum(p[order].astype(np.float64))
    above = np.flatnonzero(cum > mass)
    return x[order[above[0]]] if above.size else x.max()


@pytest.mark.parametrize("mass", [0.0, 0.04, 0.5, 0.9, 0.999])
def test_mass_cut_is_the_first_value_carrying_the_mass(mass):
    rng = np.random.default_rng(int(mass * 1000))
    x = (rng.standard_normal((5, 300)) * 2).astype(np.float32)
    x[1] = np.round(x[1])  # ties: the cut is a value, shared by its ties
    x[2, :250] = -np.inf  # filtered entries carry no mass
    p = np.exp(x - x.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
    got = np.asarray(select.mass_cut(jnp.asarray(x), jnp.asarray(p), mass))[:, 0]
    for r in range(x.shape[0]):
        assert got[r] == _mass_cut_reference(x[r], p[r], mass), r
