"""VAR next-scale sampler: greedy parity with the official sampler, cache == recompute, filters."""

import functools
import re

import fixture_harness
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cca_jax.convert import vqvae as vq_conv
from cca_jax.convert.var import from_state_dict
from cca_jax.models import vqvae
from cca_jax.models.var import VARConfig
from cca_jax.sampling import var as vs


_LOADED = {}


def _load(fx):
    if fx.path not in _LOADED:
        _LOADED[fx.path] = _load_uncached(fx)
    return _LOADED[fx.path]


def _load_uncached(fx):
    cfg = VARConfig.from_official_args(fx.meta["var_args"], fx.meta["vqvae_args"])
    vq_cfg = vqvae.VQVAEConfig.from_official_args(fx.meta["vqvae_args"])
    params = from_state_dict(fx.state_dict("sd/"), cfg)
    vq_params = vq_conv.from_state_dict(fx.state_dict("vae_sd/"), vq_cfg)
    return cfg, vq_cfg, params, vq_params


def _gen_runs(fx):
    """(name, cfg) of every recorded generation (gen/cfg<c>/...)."""
    return sorted((name, float(v["cfg"])) for name, v in fx.meta["generation"].items())


def _cases():
    out = []
    for p in fixture_harness.fixture_params("var_model"):
        fx = p.values[0]
        for name, cfg in _gen_runs(fx):
            out.append(pytest.param(fx, name, cfg, id=f"{p.id}:{name}"))
    return out


@pytest.mark.parity
@pytest.mark.parametrize("fx,name,cfg_scale", _cases())
def test_greedy_generation_matches_official(fx, name, cfg_scale):
    cfg, vq_cfg, params, vq_params = _load(fx)
    a = fx.arrays
    labels = a["gen/label_B"]
    opts = vs.VARSampleOptions(cfg=cfg_scale, top_k=1, top_p=0.0)
    out = vs.generate(params, vq_params, labels, jax.random.key(0), cfg=cfg, vq_cfg=vq_cfg, opts=opts,
                      return_logits=True, layout="NCHW")
    np.testing.assert_array_equal(np.asarray(out["idx_BL"]), a[f"{name}/idx_BL"])
    err = np.abs(np.asarray(out["logits_BLV"]) - a[f"{name}/logits_BLV"]).max()
    assert err <= 1e-4, f"guided logits max abs error {err}"
    img_err = np.abs(np.asarray(out["img"]) - a[f"{name}/img"]).max()
    assert img_err <= 1e-4, f"image max abs error {img_err}"


@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("var_model"))
def test_recompute_without_cache_equals_cached_and_official(fx):
    """Recomputing every prefix of scales with the block-causal forward (no KV cache) gives the
    official greedy samples too (checked on the most guided run: both halves of the batch)."""
    cfg, vq_cfg, params, vq_params = _load(fx)
    a = fx.arrays
    name, cfg_scale = max(_gen_runs(fx), key=lambda r: r[1])
    opts = vs.VARSampleOptions(cfg=cfg_scale, top_k=1, top_p=0.0, use_cache=False)
    rec = vs.generate(params, vq_params, a["gen/label_B"], jax.random.key(0), cfg=cfg, vq_cfg=vq_cfg,
                      opts=opts, return_logits=True, decode=False)
    np.testing.assert_array_equal(np.asarray(rec["idx_BL"]), a[f"{name}/idx_BL"])
    err = np.abs(np.asarray(rec["logits_BLV"]) - a[f"{name}/logits_BLV"]).max()
    assert err <= 1e-4, f"recompute guided logits max abs error {err}"


@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("var_model"))
def test_guidance_free_runs_no_doubled_batch(fx):
    cfg, vq_cfg, params, vq_params = _load(fx)
    B = 7
    labels = jnp.arange(B, dtype=jnp.int32)

    def batch_dims(opts):
        fn = functools.partial(vs._generate, cfg=cfg, vq_cfg=vq_cfg, opts=opts, dtype=jnp.float32,
                               decode=False, return_logits=False, layout="NHWC")
        text = str(jax.make_jaxpr(fn)(params, vq_params, labels, jax.random.key(0)))
        # leading dims of the KV caches [rows, L, H, D]
        pattern = rf"f32\[(\d+),{cfg.L},{cfg.num_heads},{cfg.head_dim}\]"
        return {int(m) for m in re.findall(pattern, text)}

    assert batch_dims(vs.VARSampleOptions(cfg=0.0, top_k=1)) == {B}
    assert batch_dims(vs.VARSampleOptions(cfg=1.5, top_k=1)) == {2 * B}


@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("var_model"))
def test_stochastic_options_run(fx):
    """top-k/top-p sampling draws inside the filtered set; more_smooth runs; cfg > 0 changes
    nothing at the first scale (t = 0 there)."""
    cfg, vq_cfg, params, vq_params = _load(fx)
    labels = jnp.array([1, 2, 3, 4], jnp.int32)
    key = jax.random.key(3)
    plain = vs.generate(params, vq_params, labels, key, cfg=cfg, vq_cfg=vq_cfg, decode=False,
                        opts=vs.VARSampleOptions(cfg=0.0, top_k=5, top_p=0.9), return_logits=True)
    smooth = vs.generate(params, vq_params, labels, key, cfg=cfg, vq_cfg=vq_cfg, decode=False, return_logits=True,
                         opts=vs.VARSampleOptions(cfg=2.0, top_k=5, top_p=0.9, more_smooth=True))
    idx = np.asarray(plain["idx_BL"])
    assert idx.min() >= 0 and idx.max() < cfg.vocab_size
    # sampled tokens are inside the top-k of their logits
    top5 = np.argsort(-np.asarray(plain["logits_BLV"]), axis=-1)[..., :5]
    assert (top5 == idx[..., None]).any(-1).all()
    # guidance ramps from t = 0 at the first scale
    first = cfg.first_l
    np.testing.assert_allclose(np.asarray(smooth["logits_BLV"])[:, :first],
                               np.asarray(plain["logits_BLV"])[:, :first], atol=1e-6)
    assert np.abs(np.asarray(smooth["logits_BLV"])[:, first:] - np.asarray(plain["logits_BLV"])[:, first:]).max() > 1e-4
    # more_smooth mixes codebook rows: f_hat is finite and not made of the hard codes
    f_hat = np.asarray(smooth["f_hat"])
    assert np.isfinite(f_hat).all() and np.abs(f_hat - np.asarray(plain["f_hat"])).max() > 1e-4


@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("var_model"))
def test_label_forms_of_the_official_sampler(fx):
    """label_B as an int (all images that class; negative = unconditional) or None (random
    classes); labels out of range are an error, not a silently clamped embedding lookup."""
    cfg, vq_cfg, params, vq_params = _load(fx)
    gen = functools.partial(vs.generate, params, vq_params, cfg=cfg, vq_cfg=vq_cfg, decode=False,
                            opts=vs.VARSampleOptions(cfg=1.5, top_k=1))
    key = jax.random.key(4)
    by_int, by_array = gen(3, key, batch=4), gen(np.full(4, 3), key)
    np.testing.assert_array_equal(np.asarray(by_int["idx_BL"]), np.asarray(by_array["idx_BL"]))
    np.testing.assert_array_equal(np.asarray(gen(-1, key, batch=4)["label_B"]), [cfg.num_classes] * 4)
    drawn = gen(None, key, batch=4)
    labels = np.asarray(drawn["label_B"])
    assert labels.shape == (4,) and labels.min() >= 0 and labels.max() < cfg.num_classes
    np.testing.assert_array_equal(np.asarray(drawn["idx_BL"]), np.asarray(gen(None, key, batch=4)["idx_BL"]))
    with pytest.raises(ValueError, match="outside"):
        gen(np.array([0, 1, 2, cfg.num_classes + 1]), key)


# ------------------------------------------------------------------------------ filtering semantics
def official_filter(logits, top_k, top_p):
    """numpy transcription of the documented sample_with_top_k_top_p_ semantics (sampling.md §2.2)."""
    x = logits.astype(np.float64).copy()
    if top_k > 0:
        kth = np.sort(x, axis=-1)[..., -top_k][..., None]
        x[x < kth] = -np.inf
    if top_p > 0:
        order = np.argsort(x, axis=-1, kind="stable")
        s = np.take_along_axis(x, order, -1)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        rm = np.cumsum(p, -1) <= 1 - top_p
        rm[..., -1] = False
        mask = np.zeros_like(rm)
        np.put_along_axis(mask, order, rm, -1)
        x[mask] = -np.inf
    return x


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (3, 0.0), (0, 0.7), (4, 0.5), (1, 0.96), (10, 0.999)])
def test_top_k_top_p_filter_matches_official_semantics(top_k, top_p):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(2, 5, 16)) * 2).astype(np.float32)
    logits[0, 0, [3, 7]] = logits[0, 0].max() + 1.0  # a tie at the top survives top-k=1
    got = np.asarray(vs.top_k_top_p_filter(jnp.asarray(logits), top_k, top_p))
    want = official_filter(logits, top_k, top_p)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(got)])
    if top_k == 1:
        assert np.isfinite(got[0, 0, [3, 7]]).all()


def test_options_from_config():
    from configs import var_d16

    opts = vs.VARSampleOptions.from_config(var_d16.get_config().sample)
    assert opts == vs.VARSampleOptions(cfg=0.0, top_k=900, top_p=0.96, more_smooth=False)
    assert not opts.guided


def test_categorical_draws_follow_the_distribution():
    logits = jnp.log(jnp.array([0.1, 0.0, 0.2, 0.7, 0.0]))  # zero-probability entries at -inf
    draws = np.asarray(vs.categorical(jax.random.key(0), jnp.broadcast_to(logits, (4, 10000, 5))))
    assert draws.shape == (4, 10000) and draws.dtype == np.int32
    freq = np.bincount(draws.ravel(), minlength=5) / draws.size
    assert freq[1] == 0 and freq[4] == 0
    np.testing.assert_allclose(freq[[0, 2, 3]], [0.1, 0.2, 0.7], atol=0.01)
    greedy = vs.top_k_top_p_filter(jnp.array([[0.3, 2.0, -1.0, 1.9]]), top_k=1)
    assert np.asarray(vs.categorical(jax.random.key(1), jnp.broadcast_to(greedy, (100, 4)))).tolist() == [1] * 100


@pytest.mark.parametrize("top_k", [0, 3, 6])
def test_top_p_ties_at_the_boundary_are_cut_in_index_order(top_k):
    # equal logits on both sides of the top-p cut: a stable ascending sort (torch's order for
    # small V) removes the lowest-index ones first
    np.testing.assert_array_equal(
        np.isfinite(np.asarray(vs.top_k_top_p_filter(jnp.array([[0.0, 1, 1, 1, 2]]), 0, 0.6))),
        [[False, False, False, True, True]])
    rng = np.random.default_rng(1)
    logits = rng.integers(0, 4, size=(400, 12)).astype(np.float32)  # many ties
    # (cut values that no partial sum hits exactly: at exact equality the float32 rounding of
    # the cumulative sum decides, and this float64 transcription rounds differently)
    for top_p in (0.35, 0.55, 0.73, 0.87, 0.95):
        got = np.asarray(vs.top_k_top_p_filter(jnp.asarray(logits), top_k, top_p))
        want = official_filter(logits, top_k, top_p)
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"top_p={top_p}")
