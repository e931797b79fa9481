"""The shared attention core: softmax attention, GQA, masks and the static-size KV cache."""

import jax
import jax.numpy as jnp
import numpy as np

from cca_jax.models import attention


def _naive(q, k, v, mask):
    """Reference in float64 numpy: q [B, L, H, D], k/v [B, S, H, D], mask [L, S]."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhls,bshd->blhd", p, v)


def test_causal_gqa_attention_matches_reference():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    B, L, H, K, D = 2, 5, 4, 2, 8
    q = jax.random.normal(kq, (B, L, H, D))
    k = jax.random.normal(kk, (B, L, K, D))
    v = jax.random.normal(kv, (B, L, K, D))
    out = jax.jit(lambda q, k, v: attention.attend(q, k, v, mask=attention.causal_mask(L)))(q, k, v)
    # GQA: query head h uses key/value head h // (H // K)
    k_rep, v_rep = np.repeat(np.asarray(k), H // K, axis=2), np.repeat(np.asarray(v), H // K, axis=2)
    ref = _naive(q, k_rep, v_rep, np.tril(np.ones((L, L), bool)))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    assert out.shape == (B, L, H, D) and out.dtype == jnp.float32


def test_kv_cache_update_and_masks():
    cache = attention.KVCache.zeros(1, 8, 2, 4)
    new = jnp.ones((1, 3, 2, 4))
    cache = jax.jit(lambda c, x, i: c.update(x, 2 * x, i))(cache, new, 2)
    k = np.asarray(cache.k)
    assert np.all(k[:, 2:5] == 1) and np.all(k[:, :2] == 0) and np.all(k[:, 5:] == 0)
    assert np.all(np.asarray(cache.v)[:, 2:5] == 2) and cache.max_len == 8

    causal = np.asarray(attention.cached_mask(2, 3, 8, causal=True))[0, 0]
    np.testing.assert_array_equal(causal, np.arange(8)[None, :] <= (2 + np.arange(3))[:, None])
    block = np.broadcast_to(np.asarray(attention.cached_mask(2, 3, 8, causal=False)), (1, 1, 3, 8))
    np.testing.assert_array_equal(block[0, 0], np.broadcast_to(np.arange(8) < 5, (3, 8)))


def test_cached_attention_ignores_unwritten_slots():
    """A query over a padded cache equals attention over only the written prefix."""
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (1, 1, 2, 4))
    k = jax.random.normal(kk, (1, 6, 2, 4))
    v = jax.random.normal(kv, (1, 6, 2, 4))
    cache = attention.KVCache.zeros(1, 16, 2, 4).update(k, v, 0)
    garbage = attention.KVCache(k=cache.k.at[:, 6:].set(1e3), v=cache.v.at[:, 6:].set(1e3))
    out = attention.attend(q, garbage.k, garbage.v, mask=attention.cached_mask(5, 1, 16, causal=True))
    np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, np.ones((1, 6), bool)), atol=1e-5)


def test_level_blocks_cut_only_at_level_changes():
    level = np.repeat(np.arange(5), [1, 4, 9, 16, 25])
    assert attention.level_blocks(level) == ((0, 1), (1, 5), (5, 14), (14, 30), (30, 55))
    assert attention.level_blocks(level, min_rows=10) == ((0, 14), (14, 30), (30, 55))
    assert attention.level_blocks(level, min_rows=100) == ((0, 55),)
    with np.testing.assert_raises(ValueError):
        attention.level_blocks([0, 2, 1])


def test_block_causal_equals_full_mask_values_and_grads():
    level = np.repeat(np.arange(4), [1, 4, 9, 16])
    L = len(level)
    q, k, v, ct = (jax.random.normal(jax.random.key(i), (2, L, 4, 8)) for i in range(4))
    mask = jnp.asarray(level[:, None] >= level[None, :])[None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * ct)

    full = loss(lambda q, k, v: attention.attend(q, k, v, mask=mask))
    for rows in (1, 6, 64):
        blocked = loss(lambda q, k, v: attention.attend_block_causal(q, k, v, level, min_rows=rows))
        np.testing.assert_allclose(blocked(q, k, v), full(q, k, v), rtol=1e-5)
        for g_b, g_f in zip(jax.grad(blocked, (0, 1, 2))(q, k, v), jax.grad(full, (0, 1, 2))(q, k, v)):
            np.testing.assert_allclose(g_b, g_f, rtol=1e-4, atol=1e-5)
    with np.testing.assert_raises(ValueError):
        attention.attend_block_causal(q, k, v, level[:-1])


def test_attend_runs_head_major_and_equals_the_sequence_major_products():
    """The products run on ``[B, H, L, D]`` operands (batch, head leading: plain batched GEMMs on
    CPU) and give what the same products on the ``[B, L, H, D]`` operands give: the forward bit
    for bit, the gradients up to float32 summation order."""
    from cca_jax.bench.attention import sequence_major_attend

    B, L, H, D = 2, 7, 3, 8
    q, k, v, ct = (jax.random.normal(jax.random.key(i), (B, L, H, D)) for i in range(4))
    mask = attention.causal_mask(L)
    ours = lambda q, k, v: attention.attend(q, k, v, mask=mask)
    base = lambda q, k, v: sequence_major_attend(q, k, v, mask)
    grad = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * ct), argnums=(0, 1, 2)))
    np.testing.assert_array_equal(np.asarray(jax.jit(ours)(q, k, v)), np.asarray(jax.jit(base)(q, k, v)))
    for a, b in zip(grad(ours)(q, k, v), grad(base)(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    dots = [e for e in jax.make_jaxpr(ours)(q, k, v).jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2
    for e in dots:
        (_, _), (batch_a, batch_b) = e.params["dimension_numbers"]
        assert tuple(batch_a) == (0, 1) and tuple(batch_b) == (0, 1), e.params["dimension_numbers"]
        assert [x.aval.shape[:2] for x in e.invars] == [(B, H), (B, H)]
