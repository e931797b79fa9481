"""LlamaGen sampler: greedy parity with the official generate(), cache == recompute, filtering."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixture_harness
from cca_jax.convert import llamagen as convert
from cca_jax.models import llamagen as lg
from cca_jax.sampling import llamagen as sampler

from test_llamagen import TINY, random_params


@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("llamagen_model"))
def test_greedy_generation_matches_official(fx):
    cfg = lg.LlamaGenConfig.from_model_args(fx.meta["model_args"])
    params = convert.from_state_dict(fx.state_dict("sd/"), cfg)
    labels = fx.arrays["gen/labels"]
    assert fx.meta["generation"], "fixture has no generation runs"
    for group, run in fx.meta["generation"].items():
        want = fx.group(group + "/")
        opts = sampler.SampleOptions(cfg_scale=float(run["cfg_scale"]),
                                     cfg_interval=int(run["cfg_interval"]), top_k=1)
        tokens, step_logits = sampler.generate(
            params, labels, jax.random.key(0), cfg=cfg, opts=opts,
            num_tokens=want["tokens"].shape[1], return_logits=True)
        np.testing.assert_array_equal(np.asarray(tokens), want["tokens"], err_msg=group)
        np.testing.assert_allclose(np.asarray(step_logits), want["step_logits"], atol=1e-4, rtol=0,
                                   err_msg=group)
        if not opts.guided:  # greedy KV-cached generation == argmax of the full forward
            full = jax.jit(lg.Transformer(cfg).apply)({"params": params}, labels, tokens[:, :-1])
            np.testing.assert_array_equal(np.asarray(jnp.argmax(full, -1)), want["tokens"])


def test_cached_generation_equals_full_recompute():
    opts = sampler.SampleOptions(cfg_scale=3.0, cfg_interval=4, temperature=0.7, top_k=20, top_p=0.9)
    cfg = dataclasses.replace(TINY, n_kv_head=2)
    params = random_params(cfg, sigma=0.2)
    labels = jnp.array([1, 7, cfg.null_class], jnp.int32)
    gen = lambda use_cache: sampler.generate(params, labels, jax.random.key(5), cfg=cfg, opts=opts,
                                             use_cache=use_cache, return_logits=True)
    (tok_c, log_c), (tok_r, log_r) = gen(True), gen(False)
    np.testing.assert_array_equal(np.asarray(tok_c), np.asarray(tok_r))
    np.testing.assert_allclose(np.asarray(log_c), np.asarray(log_r), atol=1e-4, rtol=0)
    assert len(np.unique(np.asarray(tok_c))) > 3  # not a degenerate constant sequence



@pytest.mark.parametrize("block_len", [8, 16])
def test_blocked_cache_generation_equals_one_static_cache(block_len):
    opts = sampler.SampleOptions(cfg_scale=2.0, temperature=0.8, top_k=30)
    cfg = dataclasses.replace(TINY, n_kv_head=2)
    params = random_params(cfg, sigma=0.2)
    labels = jnp.array([2, 5, 9], jnp.int32)
    gen = lambda blk: sampler.generate(params, labels, jax.random.key(3), cfg=cfg, opts=opts,
                                       return_logits=True, cache_block_len=blk)
    (tok_b, log_b), (tok_1, log_1) = gen(block_len), gen(0)
    np.testing.assert_array_equal(np.asarray(tok_b), np.asarray(tok_1))
    np.testing.assert_allclose(np.asarray(log_b), np.asarray(log_1), atol=1e-5, rtol=0)
    # the blocked run really decodes block by block: one loop per block, each reading a prefix
    jaxpr = lambda blk: str(jax.make_jaxpr(sampler.generate_fn(cfg, opts, cache_block_len=blk))(
        params, labels, jax.random.key(0)))
    text, text_1 = jaxpr(block_len), jaxpr(0)
    loops = lambda t: sorted(int(n) for n in re.findall(r"length=(\d+)", t) if int(n) != 32)
    assert loops(text_1) == [cfg.block_size - 1]  # (32: the top-k searches inside a step)
    segments = lg.decode_segments(0, (1, cfg.block_size), block_len)
    assert loops(text) == sorted(hi - lo for lo, hi, _ in segments)
    assert len(segments) == -(-cfg.block_size // block_len)  # the class slot + N - 1 inputs
    assert f"f32[6,{cfg.kv_heads},{block_len},{cfg.head_dim}]" in text
    assert f"f32[6,{cfg.kv_heads},{cfg.cache_len},{cfg.head_dim}]" not in text


def test_bf16_sampler_casts_kernels_once_and_cached_equals_recompute():
    opts = sampler.SampleOptions(cfg_scale=2.0, temperature=0.8, top_k=30)
    cfg = dataclasses.replace(TINY, n_kv_head=2)
    params = random_params(cfg, sigma=0.2)
    labels = jnp.array([2, 5, 9], jnp.int32)
    gen = lambda use_cache: sampler.generate(params, labels, jax.random.key(3), cfg=cfg, opts=opts,
                                             dtype=jnp.bfloat16, use_cache=use_cache, return_logits=True)
    (tok_c, log_c), (tok_r, log_r) = gen(True), gen(False)
    np.testing.assert_array_equal(np.asarray(tok_c), np.asarray(tok_r))
    # the logits come out of a bf16 head: a few bf16 ulps apart (summation order)
    np.testing.assert_allclose(np.asarray(log_c), np.asarray(log_r), atol=2e-2, rtol=2 ** -6)
    # the output kernel [dim, vocab] is cast to bf16 before the decode loop, not in every step
    jaxpr = jax.make_jaxpr(sampler.generate_fn(cfg, opts, dtype=jnp.bfloat16))(
        params, labels, jax.random.key(0)).jaxpr
    head = f"bf16[{cfg.dim},{cfg.vocab_size}] = convert_element_type"
    loops = [e for e in _all_eqns(jaxpr) if e.primitive.name in ("scan", "while")]
    assert loops and head in str(jaxpr) and not any(head in str(e.params) for e in loops)


def _all_eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


def test_out_of_range_labels_are_an_error_not_a_clamped_lookup():
    params = lg.init_params(TINY, jax.random.key(0))
    with pytest.raises(ValueError, match=rf"outside \[0, {TINY.num_classes}\]"):
        sampler.generate(params, jnp.array([1, TINY.num_classes + 1]), jax.random.key(0), cfg=TINY)
    no_null = dataclasses.replace(TINY, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="no null class"):
        sampler.generate(lg.init_params(no_null, jax.random.key(0)), jnp.array([no_null.num_classes]),
                         jax.random.key(0), cfg=no_null)


def test_default_cache_block_len():
    assert sampler.default_cache_block_len(24) == 0  # short caches stay one block
    assert sampler.default_cache_block_len(264) == 56  # BENCH-LLAMAGEN: 5 blocks
    for max_len in (128, 264, 584, 1032):
        blk = sampler.default_cache_block_len(max_len)
        assert blk % 8 == 0 and 0 < blk <= 64 + 8
        assert -(-max_len // blk) * blk - max_len < blk  # no empty trailing block

def test_guidance_free_runs_no_doubled_batch():
    cfg = TINY
    params = lg.init_params(cfg, jax.random.key(0))
    labels = jnp.arange(3, dtype=jnp.int32)
    S = cfg.cache_len
    for scale, batch in ((1.0, 3), (1.5, 6)):
        fn = sampler.generate_fn(cfg, sampler.SampleOptions(cfg_scale=scale))
        text = str(jax.make_jaxpr(fn)(params, labels, jax.random.key(0)))
        assert f"f32[{batch},{cfg.kv_heads},{S},{cfg.head_dim}]" in text
        if batch == 3:
            assert "f32[6," not in text
    no_null = dataclasses.replace(cfg, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="cfg_scale"):
        sampler.generate_fn(no_null, sampler.SampleOptions(cfg_scale=2.0))


def test_top_k_top_p_filtering_semantics():
    f = jax.jit(sampler.top_k_top_p_filter, static_argnums=(1, 2))
    logits = jnp.array([[1.0, 3.0, 2.0, 3.0, 0.0]])
    out = np.asarray(f(logits, 2, 1.0))  # the two 3.0s survive, everything below goes
    np.testing.assert_array_equal(np.isfinite(out), [[False, True, False, True, False]])
    out = np.asarray(f(logits, 3, 1.0))  # 3rd largest = 2.0: ties with the k-th value are kept
    np.testing.assert_array_equal(np.isfinite(out), [[False, True, True, True, False]])
    # top-p: probs 0.5, 0.3, 0.2 -> cumulative 0.5, 0.8, 1.0
    logits = jnp.log(jnp.array([[0.2, 0.5, 0.3]]))
    keep = lambda p: np.isfinite(np.asarray(f(logits, 0, p)))[0].tolist()
    assert keep(0.4) == [False, True, False]  # rank 0 always stays
    assert keep(0.6) == [False, True, True]  # the first token crossing top_p is kept
    assert keep(0.99) == [True, True, True]
    # top-k is applied before top-p: the renormalised top-2 (0.625, 0.375) keeps only rank 0 at 0.6
    assert np.isfinite(np.asarray(f(logits, 2, 0.6)))[0].tolist() == [False, True, False]


def test_sample_token_temperature_and_argmax():
    logits = jnp.array([[0.0, 1.0, 0.5], [2.0, 0.0, 1.9]])
    greedy = sampler.SampleOptions(sample_logits=False, temperature=3.0)
    np.testing.assert_array_equal(sampler.sample_token(logits, jax.random.key(0), greedy), [1, 0])
    draw = lambda opts, seed, n: np.asarray(jax.jit(jax.vmap(
        lambda k: sampler.sample_token(logits, k, opts)))(jax.random.split(jax.random.key(seed), n)))
    cold = sampler.SampleOptions(temperature=1e-6)  # clamped at 1e-5: effectively argmax
    assert np.all(draw(cold, 1, 64) == np.array([1, 0]))
    draws = draw(sampler.SampleOptions(temperature=1.0), 2, 2000)
    freq = (draws[:, 0][:, None] == np.arange(3)).mean(0)
    np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(logits[0])), atol=0.04)


def test_multinomial_never_draws_filtered_tokens_and_matches_probs():
    logits = jnp.array([[-jnp.inf, 0.0, jnp.log(3.0), -jnp.inf], [5.0, -jnp.inf, -jnp.inf, -jnp.inf]])
    draws = np.asarray(jax.jit(jax.vmap(sampler.multinomial, in_axes=(0, None)))(
        jax.random.split(jax.random.key(0), 4000), logits))
    assert set(np.unique(draws[:, 0])) == {1, 2} and np.all(draws[:, 1] == 0)
    assert abs((draws[:, 0] == 2).mean() - 0.75) < 0.03

