"""LlamaGen c2i GPT: parity with the official fixtures, sizes, RoPE, KV cache, dropout, dtype."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

import fixture_harness
from cca_jax import sharding
from cca_jax.convert import llamagen as convert
from cca_jax.models import attention as attn_lib
from cca_jax.models import llamagen as lg
from cca_jax.models import matmul

TINY = lg.LlamaGenConfig(dim=64, n_layer=2, n_head=4, vocab_size=96, num_classes=10,
                         block_size=16, class_dropout_prob=0.1, token_dropout_p=0.0,
                         resid_dropout_p=0.0, ffn_dropout_p=0.0)


def random_params(cfg, seed=0, sigma=0.05):
    """Official init plus noise, so that the zero-initialised head is not zero."""
    @jax.jit
    def perturb(key):
        params = lg.init_params(cfg, key)
        leaves, tree = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        return tree.unflatten([x + sigma * jax.random.normal(k, x.shape)
                               for x, k in zip(leaves, keys)])

    return perturb(jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
    return jax.jit(model.apply, static_argnums=(3,))


def forward(model, params, labels, idx, train=False, seed=0):
    """Teacher-forcing apply, jitted once per model (compiles dominate the test time)."""
    return np.asarray(_jitted_apply(model)({"params": params}, labels, idx, train,
                                           rngs={"dropout": jax.random.key(seed)}))


def random_batch(cfg, B=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, cfg.num_classes, B).astype(np.int32)
    tokens = rng.integers(0, cfg.vocab_size, (B, cfg.block_size)).astype(np.int32)
    return jnp.asarray(labels), jnp.asarray(tokens)


# ---- parity with the official implementation ---------------------------------------------------

@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("llamagen_model", "llamagen_gqa_tf"))
def test_teacher_forcing_parity(fx):
    cfg = lg.LlamaGenConfig.from_model_args(fx.meta["model_args"])
    params = convert.from_state_dict(fx.state_dict("sd/"), cfg)
    tf = fx.group("tf/")
    model = lg.Transformer(cfg)
    cond, idx, targets = (jnp.asarray(tf[k]) for k in ("cond_idx", "idx", "targets"))

    logits = jax.jit(model.apply)({"params": params}, cond, idx)
    assert logits.dtype == jnp.float32
    assert logits.shape == tf["logits"].shape
    np.testing.assert_allclose(np.asarray(logits), tf["logits"], atol=1e-4, rtol=0)

    logp = jax.nn.log_softmax(logits, axis=-1)
    token_logp = np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_logp, tf["token_logp"], atol=1e-4, rtol=0)
    sum_logp = token_logp.sum(-1)
    rel = np.abs(sum_logp - tf["sum_logp"]) / np.abs(tf["sum_logp"])
    assert rel.max() <= 1e-3, rel
    ce = -token_logp.mean()
    np.testing.assert_allclose(ce, tf["loss_mean_ce"], rtol=1e-4)

    # train mode with every dropout at 0 is the same function (the fixture's own call pattern)
    no_drop = dataclasses.replace(cfg, token_dropout_p=0.0, attn_dropout_p=0.0, resid_dropout_p=0.0,
                                  ffn_dropout_p=0.0, drop_path_rate=0.0)
    train_logits = forward(lg.Transformer(no_drop), params, cond, idx, True, seed=3)
    np.testing.assert_allclose(train_logits, tf["logits"], atol=1e-4, rtol=0)


# ---- sizes -------------------------------------------------------------------------------------

# (n_layer, n_head, dim, ffn hidden, params) from the spec table (verified on the official code)
OFFICIAL_SIZES = {
    "GPT-B": (12, 12, 768, 2048, 110_888_448),
    "GPT-L": (24, 16, 1024, 2816, 342_910_976),
    "GPT-XL": (36, 20, 1280, 3584, 774_699_520),
    "GPT-XXL": (48, 24, 1536, 4096, 1_410_972_672),
    "GPT-3B": (24, 32, 3200, 8704, 3_096_659_200),
    "GPT-XXXL": (48, 40, 2560, 6912, 3_893_027_840),
}


@pytest.mark.parametrize("size", sorted(OFFICIAL_SIZES))
def test_official_sizes(size):
    n_layer, n_head, dim, ffn, count = OFFICIAL_SIZES[size]
    cfg = lg.LlamaGenConfig(dim=dim, n_layer=n_layer, n_head=n_head, block_size=576)
    assert cfg.ffn_hidden_dim == ffn
    assert lg.param_count(cfg) == count
    shapes = convert.expected_shapes(cfg)
    assert len(shapes) == 4 + 7 * n_layer
    assert shapes["cls_embedding.embedding_table.weight"] == (1001, dim)


def test_recipe_configs_build_the_official_sizes():
    import importlib
    for name, size in [("b", "GPT-B"), ("l", "GPT-L"), ("xl", "GPT-XL"), ("xxl", "GPT-XXL"),
                       ("3b", "GPT-3B")]:
        for px in (256, 384):
            c = importlib.import_module(f"configs.llamagen_{name}_{px}").get_config()
            cfg = lg.LlamaGenConfig.from_config(c.model)
            n_layer, n_head, dim, ffn, _ = OFFICIAL_SIZES[size]
            assert (cfg.n_layer, cfg.n_head, cfg.dim, cfg.ffn_hidden_dim) == (n_layer, n_head, dim, ffn)
            assert cfg.block_size == (px // 16) ** 2 and cfg.class_rows == 1001
            assert c.optim.accum == "sum" and c.optim.grad_accum_steps == 16


def test_ffn_multiplier_and_config_errors():
    cfg = lg.LlamaGenConfig(dim=1024, n_head=16, n_layer=1, ffn_dim_multiplier=1.3)
    assert cfg.ffn_hidden_dim == lg.find_multiple(int(1.3 * 2730), 256) == 3584
    assert lg.LlamaGenConfig(dim=64, n_head=4, n_layer=1, class_dropout_prob=0.0).class_rows == 1000
    with pytest.raises(ValueError, match="perfect square"):
        lg.LlamaGenConfig(dim=64, n_head=4, n_layer=1, block_size=15)
    with pytest.raises(ValueError, match="bogus"):
        lg.LlamaGenConfig.from_model_args({"dim": 64, "n_head": 4, "n_layer": 1, "bogus": 1})
    with pytest.raises(ValueError, match="block_size"):
        lg.LlamaGenConfig.from_config({"family": "llamagen", "image_size": 256, "block_size": 576})


# ---- RoPE --------------------------------------------------------------------------------------

def test_rope_table_3b_head_dim_100():
    table = lg.rope_table(24, 100, 10000.0, 1)
    assert table.shape == (577, 50, 2) and table.dtype == np.float32
    assert np.all(table[0] == 0)  # class slot: zeros, not an identity rotation
    f = 10000.0 ** (-np.arange(25) * 2 / 50)
    i, j = 5, 17
    angles = table[1 + i * 24 + j]
    np.testing.assert_allclose(angles[:25, 0], np.cos(i * f), atol=2e-6)  # first half: row
    np.testing.assert_allclose(angles[:25, 1], np.sin(i * f), atol=2e-6)
    np.testing.assert_allclose(angles[25:, 0], np.cos(j * f), atol=2e-6)  # second half: column
    np.testing.assert_allclose(angles[25:, 1], np.sin(j * f), atol=2e-6)


def test_rope_rotates_interleaved_pairs_and_zeroes_class_slot():
    table = jnp.asarray(lg.rope_table(4, 8, 10000.0, 1))  # [17, 4, 2]
    x = jax.random.normal(jax.random.key(0), (1, 17, 2, 8))
    y = np.asarray(jax.jit(lg.apply_rope)(x, table))
    assert np.all(y[:, 0] == 0)
    xn = np.asarray(x)
    c, s = np.asarray(table[6, 1, 0]), np.asarray(table[6, 1, 1])
    np.testing.assert_allclose(y[0, 6, 1, 2], xn[0, 6, 1, 2] * c - xn[0, 6, 1, 3] * s, rtol=1e-6)
    np.testing.assert_allclose(y[0, 6, 1, 3], xn[0, 6, 1, 3] * c + xn[0, 6, 1, 2] * s, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(y[:, 1:], axis=-1), np.linalg.norm(xn[:, 1:], axis=-1),
                               rtol=1e-5)


# ---- KV-cached decode shares the blocks and equals the full forward ------------------------------

def test_cached_decode_equals_full_forward():
    cfg = dataclasses.replace(TINY, n_kv_head=2)  # GQA: the cache holds K < H heads
    params = random_params(cfg)
    labels, tokens = random_batch(cfg)
    model = lg.Transformer(cfg)
    full = np.asarray(jax.jit(model.apply)({"params": params}, labels, tokens[:, :-1]))

    decode = jax.jit(lambda c, i, p: model.apply({"params": params}, None, i, cache=c, index=p))
    prefill = jax.jit(lambda c, lab, i: model.apply({"params": params}, lab, i, cache=c, index=0))
    cache = lg.init_cache(cfg, labels.shape[0])
    assert cache[0].k.shape == (3, cfg.kv_heads, cfg.cache_len, cfg.head_dim)  # head-major
    logits, cache = prefill(cache, labels, None)
    steps = [np.asarray(logits[:, 0])]
    for t in range(cfg.block_size - 1):
        logits, cache = decode(cache, tokens[:, t:t + 1], t + 1)
        steps.append(np.asarray(logits[:, 0]))
    np.testing.assert_allclose(np.stack(steps, 1), full, atol=1e-5, rtol=0)

    # a multi-position prefill window (class slot + 7 tokens), then one decode step
    cache = lg.init_cache(cfg, labels.shape[0])
    logits, cache = prefill(cache, labels, tokens[:, :7])
    np.testing.assert_allclose(np.asarray(logits), full[:, :8], atol=1e-5, rtol=0)
    logits, _ = decode(cache, tokens[:, 7:8], 8)
    np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, 8], atol=1e-5, rtol=0)

    # the shared sequence-major KVCache works too (same values, other memory layout)
    plain = tuple(attn_lib.KVCache.zeros(3, cfg.cache_len, cfg.kv_heads, cfg.head_dim)
                  for _ in range(cfg.n_layer))
    logits, plain = prefill(plain, labels, tokens[:, :7])
    np.testing.assert_allclose(np.asarray(logits), full[:, :8], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(plain[1].k), np.asarray(cache[1].k.transpose(0, 2, 1, 3)),
                               atol=1e-6)


# ---- dropout, label dropout, drop path ------------------------------------------------------------

def test_dropout_only_in_train_mode():
    cfg = dataclasses.replace(TINY, token_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1,
                              attn_dropout_p=0.1, drop_path_rate=0.2)
    params = random_params(cfg)
    labels, tokens = random_batch(cfg)
    model = lg.Transformer(cfg)
    run = lambda train, seed: forward(model, params, labels, tokens[:, :-1], train, seed)
    ev = run(False, 0)
    np.testing.assert_array_equal(ev, run(False, 1))  # eval ignores the rng
    tr0, tr1 = run(True, 0), run(True, 1)
    np.testing.assert_array_equal(tr0, run(True, 0))  # reproducible from the key
    assert np.abs(tr0 - ev).max() > 1e-3
    assert np.abs(tr0 - tr1).max() > 1e-3


def test_label_dropout_uses_the_null_row():
    cfg = dataclasses.replace(TINY, class_dropout_prob=1.0)  # every label dropped in train mode
    params = random_params(cfg)
    labels, tokens = random_batch(cfg)
    model = lg.Transformer(cfg)
    train = forward(model, params, labels, tokens[:, :-1], True)
    null = forward(model, params, jnp.full_like(labels, cfg.null_class), tokens[:, :-1])
    cond = forward(model, params, labels, tokens[:, :-1])
    np.testing.assert_allclose(train, null, atol=1e-6)
    assert np.abs(cond - null).max() > 1e-3


def test_drop_path_per_sample():
    from cca_jax.models.layers import DropPath, drop_path_rates
    x = jnp.ones((4000, 3, 2))
    y = np.asarray(jax.jit(lambda x, k: DropPath(0.25).apply({}, x, deterministic=False,
                                                            rngs={"dropout": k}))(x, jax.random.key(0)))
    per_sample = y[:, 0, 0]
    np.testing.assert_allclose(np.unique(per_sample), [0.0, 1 / 0.75], rtol=1e-6)
    assert np.all(y == y[:, :1, :1])  # whole sample dropped or kept
    assert abs((per_sample == 0).mean() - 0.25) < 0.03
    np.testing.assert_array_equal(DropPath(0.25).apply({}, x, deterministic=True), x)
    assert drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])


# ---- init, precision, remat, logical axes, sharding -------------------------------------------

def test_official_init():
    cfg = dataclasses.replace(TINY, dim=128, n_head=4, vocab_size=512)
    p = lg.init_params(cfg, jax.random.key(0))
    assert np.all(np.asarray(p["output"]["kernel"]) == 0)
    assert np.all(np.asarray(p["layers_1"]["ffn_norm"]["weight"]) == 1)
    for w in (p["tok_embeddings"]["embedding"], p["layers_0"]["feed_forward"]["w2"]["kernel"],
              p["cls_embedding"]["embedding_table"]["embedding"]):
        assert abs(float(np.std(np.asarray(w))) - 0.02) < 0.002
    assert p["cls_embedding"]["embedding_table"]["embedding"].shape == (11, 128)


def test_bf16_compute_keeps_fp32_params_and_logits():
    params = random_params(TINY)
    labels, tokens = random_batch(TINY)
    ref = forward(lg.Transformer(TINY), params, labels, tokens[:, :-1])
    out = forward(lg.Transformer(TINY, dtype=jnp.bfloat16), params, labels, tokens[:, :-1])
    assert out.dtype == np.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    err = np.abs(np.asarray(out) - np.asarray(ref)).max()
    assert 0 < err < 0.05 * np.abs(np.asarray(ref)).max()


def test_kernels_cast_once_give_the_bf16_forward_bit_for_bit():
    """The sampler casts the dense kernels to bf16 once (matmul.cast_kernels); every kernel
    must be one the bf16 model casts anyway, so the logits are identical."""
    params = random_params(dataclasses.replace(TINY, n_kv_head=2))
    cfg = dataclasses.replace(TINY, n_kv_head=2)
    labels, tokens = random_batch(cfg)
    cast = matmul.cast_kernels(params, jnp.bfloat16)
    kinds = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_flatten_with_path(cast)[0]}
    assert all(dt == jnp.bfloat16 for k, dt in kinds.items() if k.endswith("['kernel']"))
    assert all(dt == jnp.float32 for k, dt in kinds.items() if not k.endswith("['kernel']"))
    model = lg.Transformer(cfg, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(forward(model, cast, labels, tokens[:, :-1]),
                                  forward(model, params, labels, tokens[:, :-1]))
    assert matmul.cast_kernels(params, jnp.float32) is params


def test_remat_same_values_and_grads():
    params = random_params(TINY)
    labels, tokens = random_batch(TINY)

    def loss(p, remat):
        logits = lg.Transformer(TINY, remat=remat).apply({"params": p}, labels, tokens[:, :-1], True,
                                                         rngs={"dropout": jax.random.key(0)})
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=(1,))
    (l0, g0), (l1, g1) = (grad(params, r) for r in (False, True))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_every_param_has_known_logical_axes():
    known = {name for name, _ in sharding.LOGICAL_RULES}
    boxed = jax.eval_shape(lambda k: lg.init_params(TINY, k, boxed=True), jax.random.key(0))
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == len(x.value.shape) and set(x.names) <= known, x.names


def test_sharded_init_and_forward_match_unsharded():
    cfg = dataclasses.replace(TINY, dim=128, n_head=4)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = sharding.sharded_init(lambda k: lg.init_params(cfg, k, boxed=True), mesh,
                                   jax.random.key(0))
    assert params["layers_0"]["feed_forward"]["w1"]["kernel"].sharding.spec == P("fsdp", "tensor")
    ref = lg.init_params(cfg, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(params["tok_embeddings"]["embedding"]),
                                  np.asarray(ref["tok_embeddings"]["embedding"]))
    params = jax.tree_util.tree_map(lambda x: x + 0.01, params)
    ref = jax.tree_util.tree_map(lambda x: x + 0.01, ref)
    labels, tokens = random_batch(cfg, B=4)
    model = lg.Transformer(cfg)
    with sharding.use_mesh(mesh):
        out = jax.jit(lambda p, c, t: model.apply({"params": p}, c, t))(params, labels, tokens[:, :-1])
    np.testing.assert_allclose(np.asarray(out), forward(model, ref, labels, tokens[:, :-1]), atol=1e-5)


@pytest.mark.parametrize("first_slot,steps,block_len", [(0, (1, 16), 8), (0, (1, 256), 56),
                                                         (3, (0, 10), 4), (0, (5, 6), 8)])
def test_decode_segments_put_every_step_in_its_block(first_slot, steps, block_len):
    segs = lg.decode_segments(first_slot, steps, block_len)
    covered = [i for lo, hi, _ in segs for i in range(lo, hi)]
    assert covered == list(range(*steps))
    for lo, hi, active in segs:
        assert all((first_slot + i) // block_len == active - 1 for i in range(lo, hi))


def test_blocked_cache_writes_only_its_active_block():
    cache = lg.BlockedKVCache.zeros(2, 20, 1, 4, block_len=8)
    assert len(cache.blocks) == 3 and cache.max_len == 8
    kv = jnp.ones((2, 1, 1, 4))
    c = cache.with_active(2).update(kv, 2 * kv, 9)  # position 9 = slot 1 of block 1
    assert c.max_len == 16 and len(c.kv_blocks()) == 2
    assert float(jnp.sum(c.blocks[0].k)) == 0 and float(jnp.sum(c.blocks[2].k)) == 0
    np.testing.assert_array_equal(np.asarray(c.blocks[1].v[:, 0, 1]), 2 * np.ones((2, 4)))
    with pytest.raises(ValueError, match="active=4 blocks; the cache has 3"):
        cache.with_active(4)
