"""VAR transformer: parity with the official outputs (fixtures) and unit tests of its pieces."""

import dataclasses
import functools
import math

import fixture_harness
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cca_jax.convert.var import expected_shapes, from_state_dict, to_state_dict
from cca_jax.models import matmul
from cca_jax.models.var import (FLOAT32_KERNELS, VAR, VARConfig, abstract_params, init_cache,
                                init_params, param_count)

TINY = dict(depth=2, embed_dim=64, num_heads=2, vocab_size=32, Cvae=4, num_classes=10,
            patch_nums=(1, 2, 3))


def tiny_cfg(**kw):
    return VARConfig(**{**TINY, **kw})


@functools.lru_cache(maxsize=None)
def _jit_forward(cfg, train=False, dtype=jnp.float32):
    model = VAR(cfg, dtype)
    return jax.jit(lambda p, lab, x, rng: model.apply({"params": p}, lab, x, train=train, rngs={"dropout": rng}))


def forward(cfg, params, label_B, x, *, train=False, rng=0, dtype=jnp.float32):
    return _jit_forward(cfg, train, dtype)(params, jnp.asarray(label_B), jnp.asarray(x), jax.random.key(rng))


def fixture_cfg(fx) -> VARConfig:
    return VARConfig.from_official_args(fx.meta["var_args"], fx.meta["vqvae_args"])


def noisy_params(cfg, seed=0, sigma=0.05):
    """Random params (N(0, sigma^2) everywhere; scale_mul around ln 4), built in numpy so that
    no init program is compiled; like the fixtures, gammas / biases / head are not ~0."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        v = rng.normal(size=x.shape).astype(np.float32) * sigma
        return v + np.float32(math.log(4.0)) if "scale_mul" in jax.tree_util.keystr(path) else v

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg))


def random_inputs(cfg, B=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, cfg.num_classes + 1, B)
    x = rng.normal(size=(B, cfg.L - cfg.first_l, cfg.Cvae)).astype(np.float32)
    return labels, x


# ------------------------------------------------------------------------------ parity
@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("var_model"))
def test_teacher_forcing_logits_match_official(fx):
    cfg = fixture_cfg(fx)
    params = from_state_dict(fx.state_dict("sd/"), cfg)
    a = fx.arrays
    logits = np.asarray(forward(cfg, params, a["fwd/label_B"], a["vae/x_BLCv_wo_first_l"]))
    assert logits.dtype == np.float32
    assert logits.shape == a["fwd/logits"].shape
    err = np.abs(logits - a["fwd/logits"]).max()
    assert err <= 1e-4, f"max abs logits error {err}"

    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    token_logp = np.take_along_axis(logp, a["vae/idx_BL"][..., None].astype(np.int64), -1)[..., 0]
    assert np.abs(token_logp - a["fwd/token_logp"]).max() <= 1e-4
    rel = np.abs(token_logp - a["fwd/token_logp"]).max() / np.abs(a["fwd/token_logp"]).max()
    assert rel <= 1e-3, f"token_logp relative error {rel}"
    sum_logp = token_logp.sum(-1)
    rel_sum = np.abs(sum_logp - a["fwd/sum_logp"]) / np.abs(a["fwd/sum_logp"])
    assert rel_sum.max() <= 1e-3, f"sum_logp relative error {rel_sum}"


@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("var_model"))
def test_cached_decode_matches_teacher_forcing_on_fixture(fx):
    """Scale-by-scale KV-cached decoding of the fixture's teacher-forcing input gives its logits."""
    cfg = fixture_cfg(fx)
    params = from_state_dict(fx.state_dict("sd/"), cfg)
    a = fx.arrays
    logits = decode_all(cfg, params, a["fwd/label_B"], a["vae/x_BLCv_wo_first_l"])
    err = np.abs(logits - a["fwd/logits"]).max()
    assert err <= 1e-4, f"max abs cached-decode logits error {err}"


@functools.lru_cache(maxsize=None)
def _jit_decode_all(cfg):
    model = VAR(cfg)

    def run(params, label_B, x_wo_first):
        caches = init_cache(cfg, label_B.shape[0])
        outs = []
        for si, (b, e) in enumerate(cfg.begin_ends):  # static loop over scales
            x = None if si == 0 else x_wo_first[:, b - cfg.first_l:e - cfg.first_l]
            lg, caches = model.apply({"params": params}, label_B, x, caches, si, method=VAR.decode_scale)
            outs.append(lg)
        return jnp.concatenate(outs, axis=1)

    return jax.jit(run)


def decode_all(cfg, params, label_B, x_wo_first):
    """Logits of every scale from scale-by-scale KV-cached decoding of a teacher-forcing input."""
    return np.asarray(_jit_decode_all(cfg)(params, jnp.asarray(label_B), jnp.asarray(x_wo_first)))


# ------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("depth,params,keys,dpr", [
    (16, 310_283_520, 220, 0.0667), (20, 600_917_136, 272, 0.0833),
    (24, 1_033_399_360, 324, 0.1000), (30, 2_010_020_356, 402, 0.1250)])
def test_official_builder_sizes(depth, params, keys, dpr):
    cfg = VARConfig.from_depth(depth)
    assert (cfg.C, cfg.num_heads, cfg.head_dim, cfg.ffn_dim) == (64 * depth, depth, 64, 256 * depth)
    assert cfg.L == 680 and cfg.begin_ends[-1] == (424, 680)
    assert param_count(cfg) == params
    assert len(expected_shapes(cfg)) == keys
    assert round(cfg.drop_path_rate, 4) == dpr
    rates = cfg.drop_path_rates
    assert rates[0] == 0.0 and math.isclose(rates[-1], cfg.drop_path_rate, rel_tol=1e-6)


def test_config_from_config_dict():
    from configs import var_d20

    c = var_d20.get_config()
    cfg = VARConfig.from_config(c)
    assert cfg == VARConfig.from_config(c.model)
    assert (cfg.depth, cfg.C, cfg.num_heads, cfg.vocab_size, cfg.Cvae) == (20, 1280, 20, 4096, 32)
    assert math.isclose(cfg.drop_path_rate, 0.1 * 20 / 24)
    assert cfg.cond_drop_rate == 0.0 and cfg.attn_l2_norm and not cfg.shared_aln
    c.model.family = "llamagen"
    with pytest.raises(ValueError, match="family"):
        VARConfig.from_config(c)


# ------------------------------------------------------------------------------ mask / causality
def test_block_causal_mask_structure():
    cfg = VARConfig.from_depth(16)
    m = cfg.block_causal_mask()
    assert m.shape == (680, 680)
    counts = m.sum(-1)
    for (b, e) in cfg.begin_ends:  # every row of a scale sees all tokens of scales <= it
        assert (counts[b:e] == e).all()
    assert counts[0] == 1 and counts[1] == 5 and counts[-1] == 680
    lvl = cfg.lvl_1L()
    assert lvl[0] == 0 and (lvl[1:5] == 1).all() and lvl[-1] == 9


def test_model_is_block_causal_by_scale():
    cfg = tiny_cfg()
    params = noisy_params(cfg)
    labels, x = random_inputs(cfg)
    base = np.asarray(forward(cfg, params, labels, x))
    x2 = x.copy()
    b2, e2 = cfg.begin_ends[2]
    x2[:, b2 - cfg.first_l + 1] += 1.0  # second token of scale 2
    out = np.asarray(forward(cfg, params, labels, x2))
    np.testing.assert_array_equal(out[:, :b2], base[:, :b2])  # coarser scales unaffected
    assert (np.abs(out[:, b2:e2] - base[:, b2:e2]).max(-1) > 1e-6).all()  # whole scale sees it


def test_prefix_forward_equals_full_forward_prefix():
    cfg = tiny_cfg()
    params = noisy_params(cfg, 1)
    labels, x = random_inputs(cfg)
    full = np.asarray(forward(cfg, params, labels, x))
    end = cfg.begin_ends[1][1]
    pre = np.asarray(forward(cfg, params, labels, x[:, :end - cfg.first_l]))
    np.testing.assert_allclose(pre, full[:, :end], atol=1e-5)


@pytest.mark.parametrize("shared_aln", [False, True])
def test_cached_decode_equals_teacher_forcing(shared_aln):
    cfg = tiny_cfg(shared_aln=shared_aln)
    params = noisy_params(cfg, 2)
    labels, x = random_inputs(cfg)
    np.testing.assert_allclose(decode_all(cfg, params, labels, x), np.asarray(forward(cfg, params, labels, x)),
                               atol=1e-5)


# ------------------------------------------------------------------------------ train-mode stochasticity
def test_drop_path_only_in_train():
    cfg = tiny_cfg(drop_path_rate=0.5)
    params = noisy_params(cfg)
    labels, x = random_inputs(cfg, B=8)
    ref = np.asarray(forward(tiny_cfg(), params, labels, x))
    ev0 = np.asarray(forward(cfg, params, labels, x, rng=0))
    ev1 = np.asarray(forward(cfg, params, labels, x, rng=1))
    np.testing.assert_array_equal(ev0, ev1)
    np.testing.assert_allclose(ev0, ref, atol=1e-6)
    tr0 = np.asarray(forward(cfg, params, labels, x, train=True, rng=0))
    tr1 = np.asarray(forward(cfg, params, labels, x, train=True, rng=1))
    assert np.abs(tr0 - tr1).max() > 1e-4
    assert np.abs(tr0 - ev0).max() > 1e-4
    # rate 0 in train mode is deterministic and equals eval
    np.testing.assert_allclose(np.asarray(forward(tiny_cfg(), params, labels, x, train=True)), ref, atol=1e-6)
    # block 0 has rate 0 (linspace schedule)
    assert cfg.drop_path_rates == (0.0, 0.5)


def test_cond_drop_applies_in_eval_mode_too():
    # official VAR.forward drops labels whatever the mode: at rate 1 every row is the null class
    cfg = tiny_cfg(cond_drop_rate=1.0)
    params = noisy_params(cfg)
    labels, x = random_inputs(cfg)
    labels = np.array([1, 2, 3])
    null = np.full_like(labels, cfg.num_classes)
    want = np.asarray(forward(cfg, params, null, x))
    np.testing.assert_allclose(np.asarray(forward(cfg, params, labels, x, train=True)), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(forward(cfg, params, labels, x)), want, atol=1e-6)
    # at 0 < p < 1 an eval call without a dropout rng (deterministic) keeps the labels
    half = tiny_cfg(cond_drop_rate=0.5)
    apply = jax.jit(lambda p, lab: VAR(half).apply({"params": p}, lab, jnp.asarray(x)))
    assert np.abs(np.asarray(apply(params, labels)) - np.asarray(apply(params, null))).max() > 1e-5


# ------------------------------------------------------------------------------ variants
def test_shared_aln_equals_per_block_aln_with_identical_weights():
    """shared_aln with zero ada_gss == the per-block model whose every ada_lin is the shared one."""
    cfg = tiny_cfg()
    scfg = tiny_cfg(shared_aln=True)
    params = noisy_params(cfg, 4)
    shared = dict(params)
    shared["shared_ada_lin"] = params["blocks_0"]["ada_lin"]
    for i in range(cfg.depth):
        blk = dict(params[f"blocks_{i}"])
        del blk["ada_lin"]
        blk["ada_gss"] = jnp.zeros((6, cfg.C))
        shared[f"blocks_{i}"] = blk
        params[f"blocks_{i}"] = {**params[f"blocks_{i}"], "ada_lin": params["blocks_0"]["ada_lin"]}
    assert jax.tree_util.tree_structure(abstract_params(scfg)) == jax.tree_util.tree_structure(shared)
    labels, x = random_inputs(cfg)
    np.testing.assert_allclose(np.asarray(forward(scfg, shared, labels, x)),
                               np.asarray(forward(cfg, params, labels, x)), atol=1e-5)
    # ada_gss is added to the shared modulation
    shared2 = {**shared, "blocks_1": {**shared["blocks_1"], "ada_gss": jnp.ones((6, cfg.C)) * 0.1}}
    moved = np.asarray(forward(scfg, shared2, labels, x)) - np.asarray(forward(scfg, shared, labels, x))
    assert np.abs(moved).max() > 1e-4
    # converts both ways
    sd = to_state_dict(shared, scfg)
    assert sd["blocks.0.ada_gss"].shape == (1, 1, 6, cfg.C)
    assert sd["shared_ada_lin.1.weight"].shape == (6 * cfg.C, cfg.C)
    back = from_state_dict(sd, scfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, jax.tree_util.tree_map(np.asarray, shared))


def test_attn_l2_norm_scale_is_clamped_at_100():
    cfg = tiny_cfg()
    params = noisy_params(cfg)
    labels, x = random_inputs(cfg)

    def with_scale(v):
        p = jax.tree_util.tree_map(lambda a: a, params)
        for i in range(cfg.depth):
            p[f"blocks_{i}"]["attn"]["scale_mul"] = jnp.full((cfg.num_heads,), v)
        return np.asarray(forward(cfg, p, labels, x))

    np.testing.assert_array_equal(with_scale(math.log(100.0)), with_scale(10.0))
    assert np.abs(with_scale(math.log(4.0)) - with_scale(math.log(100.0))).max() > 1e-6


def test_official_init():
    cfg = VARConfig(depth=2, embed_dim=256, num_heads=4, vocab_size=64, Cvae=4, num_classes=10,
                    patch_nums=(1, 2, 4), init_adaln=0.5, init_adaln_gamma=1e-3, init_head=0.02)
    p = init_params(cfg, jax.random.key(0))
    std = math.sqrt(1 / (3 * 256))
    a = p["blocks_1"]["attn"]
    np.testing.assert_allclose(a["scale_mul"], math.log(4.0), rtol=1e-6)
    assert not np.any(a["q_bias"]) and not np.any(a["v_bias"]) and not np.any(p["head"]["bias"])
    np.testing.assert_allclose(np.std(a["query"]["kernel"]), std, rtol=0.05)
    np.testing.assert_allclose(np.std(a["proj"]["kernel"]), std / 2, rtol=0.05)  # / sqrt(2 depth)
    np.testing.assert_allclose(np.std(p["blocks_0"]["ffn"]["fc2"]["kernel"]), std / 2, rtol=0.05)
    ada = np.asarray(p["blocks_0"]["ada_lin"]["kernel"])
    np.testing.assert_allclose(np.std(ada[:, :2]), std * 1e-3, rtol=0.05)
    np.testing.assert_allclose(np.std(ada[:, 2:]), std * 0.5, rtol=0.05)
    np.testing.assert_allclose(np.std(p["head"]["kernel"]), std * 0.02, rtol=0.05)
    np.testing.assert_allclose(np.std(p["head_nm"]["ada_lin"]["kernel"]), std * 0.5, rtol=0.05)
    np.testing.assert_allclose(np.std(p["class_emb"]["embedding"]), std, rtol=0.1)
    assert np.abs(np.asarray(p["pos_1LC"])).max() <= 2.0
    # a negative init_head leaves the head at the plain init (official: no rescale)
    unscaled = init_params(dataclasses.replace(cfg, init_head=-1.0), jax.random.key(0))
    np.testing.assert_allclose(np.std(unscaled["head"]["kernel"]), std, rtol=0.05)


def test_from_official_args_uses_the_constructor_defaults():
    cfg = VARConfig.from_official_args({"depth": 2, "embed_dim": 128, "num_heads": 2})
    assert cfg.attn_l2_norm is False and cfg.cond_drop_rate == 0.1  # VAR.__init__'s defaults
    cfg = VARConfig.from_official_args({"depth": 2, "embed_dim": 128, "num_heads": 2,
                                        "attn_l2_norm": True, "cond_drop_rate": 0.0})
    assert cfg.attn_l2_norm is True and cfg.cond_drop_rate == 0.0


def test_remat_same_logits_and_grads():
    cfg = tiny_cfg(drop_path_rate=0.3)
    params = noisy_params(cfg)
    labels, x = random_inputs(cfg)

    def loss(p, remat):
        out = VAR(cfg, remat=remat).apply({"params": p}, labels, x, train=True, rngs={"dropout": jax.random.key(5)})
        return jnp.sum(jax.nn.log_softmax(out)[..., 0])

    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(p, False)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(p, True)))(params)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = tiny_cfg()
    params = noisy_params(cfg, 4)
    labels, x = random_inputs(cfg)
    f32 = np.asarray(forward(cfg, params, labels, x))
    bf16 = forward(cfg, params, labels, x, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.float32
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(params))
    # bf16 has ~3 significant digits: errors are a small fraction of the logit spread
    assert np.abs(np.asarray(bf16) - f32).max() < 0.05 * np.abs(f32).max()
    assert np.abs(np.asarray(bf16) - f32).max() > 0  # it really ran in bf16


def test_kernels_cast_once_give_the_bf16_forward_bit_for_bit():
    """The sampler casts the kernels to bf16 once, except those VAR multiplies in float32
    (FLOAT32_KERNELS); the bf16 logits are then identical, with per-block and shared AdaLN."""
    for shared_aln in (False, True):
        cfg = tiny_cfg(shared_aln=shared_aln)
        params = noisy_params(cfg, 4)
        labels, x = random_inputs(cfg)
        cast = matmul.cast_kernels(params, jnp.bfloat16, keep=FLOAT32_KERNELS)
        assert cast["word_embed"]["kernel"].dtype == cast["head_nm"]["ada_lin"]["kernel"].dtype == jnp.float32
        assert cast["head"]["kernel"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(forward(cfg, cast, labels, x, dtype=jnp.bfloat16),
                                      forward(cfg, params, labels, x, dtype=jnp.bfloat16))


def test_bfloat16_gradients_run_and_track_float32():
    """Mixed-precision backward of every layer, batch 8: the AdaLN weight gradient contracts
    over the 8 samples, a product XLA:CPU's bf16 kernels decline (it used to stop the run with
    "Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32")."""
    cfg = tiny_cfg(num_heads=4, vocab_size=64)
    params = noisy_params(cfg, 6)
    labels, x = random_inputs(cfg, B=8, seed=6)

    def grads(dtype):
        def loss(p):
            out = VAR(cfg, dtype).apply({"params": p}, labels, x, train=False)
            return jnp.mean(jax.nn.log_softmax(out)[..., 0])
        return jax.jit(jax.grad(loss))(params)

    g32, g16 = grads(jnp.float32), grads(jnp.bfloat16)
    for path, a in jax.tree_util.tree_flatten_with_path(g16)[0]:
        b = np.asarray(functools.reduce(lambda t, k: t[k.key], path, g32))
        a = np.asarray(a)
        assert a.dtype == np.float32, path
        cos = np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)
        assert cos > 0.99, (jax.tree_util.keystr(path), cos)


def test_bad_input_shape_names_the_fields():
    cfg = tiny_cfg()
    params = noisy_params(cfg)
    with pytest.raises(ValueError, match="Cvae"):
        VAR(cfg).apply({"params": params}, jnp.zeros((1,), jnp.int32), jnp.zeros((1, cfg.L - 1, cfg.Cvae + 1)))


def test_params_carry_logical_axis_names():
    from cca_jax.models.var import init_boxed
    from cca_jax.sharding import LOGICAL_RULES
    from flax import linen as nn

    boxed = jax.eval_shape(lambda k: init_boxed(tiny_cfg(shared_aln=True), k), jax.random.key(0))
    specs = nn.get_partition_spec(boxed)
    known = {name for name, _ in LOGICAL_RULES}
    leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda s: hasattr(s, "index"))
    shapes = jax.tree_util.tree_leaves(nn.meta.unbox(boxed))
    assert len(leaves) == len(shapes)
    for spec, shape in zip(leaves, shapes):
        assert len(spec) == len(shape.shape)
        assert {n for n in spec if n is not None} <= known


@pytest.mark.parametrize("depth,lam,accum,group,dpr,end_ratio,wd_end,fid", [
    (16, 50, 4, 8, 0.0, 0.1, -1.0, "4.03"), (20, 50, 8, 4, 0.1 * 20 / 24, 0.1, -1.0, "3.02"),
    (24, 100, 8, 4, 0.1, 0.01, -1.0, "2.63"), (30, 1000, 16, 2, 0.125, 0.01, 0.08, "2.54")])
def test_recipe_configs(depth, lam, accum, group, dpr, end_ratio, wd_end, fid):
    import importlib

    from cca_jax.models.vqvae import VQVAEConfig

    mod = importlib.import_module(f"configs.var_d{depth}")
    assert f"FID {fid}" in mod.__doc__
    c = mod.get_config("/ckpts")
    cfg = VARConfig.from_config(c)
    assert (cfg.depth, cfg.C, cfg.num_heads, cfg.L) == (depth, 64 * depth, depth, 680)
    assert math.isclose(cfg.drop_path_rate, dpr) and cfg.cond_drop_rate == 0.0
    vq = VQVAEConfig.from_config(c.tokenizer)
    assert (vq.vocab_size, vq.z_channels, vq.ch, vq.share_quant_resi, vq.patch_nums) == (
        cfg.vocab_size, cfg.Cvae, 160, 4, cfg.patch_nums)
    assert (c.loss.beta, c.loss.lambda_, c.loss.uncond_ratio, c.loss.uncond_zero_form) == (0.02, lam, 0.1, "var")
    assert (c.loss.negatives, c.loss.roll_group) == ("group_roll", group)
    o = c.optim
    assert (o.lr, o.schedule, o.decay_rule, o.grad_clip, o.accum, o.grad_accum_steps) == (
        2e-5, "var_lin0", "var", 2.0, "mean", accum)
    assert (o.weight_decay, o.weight_decay_end, o.end_ratio, o.warmup_start) == (0.05, wd_end, end_ratio, 0.005)
    # VAR counts ceil(1281167 / (per-GPU batch * 8)) micro-iterations per epoch, warm-up 1/50 of them
    iters = math.ceil(1_281_167 / (group * 8))
    assert o.schedule_steps == iters / accum and o.warmup_steps == round(iters / 50) / accum
    assert c.train.global_batch_size == 256 and c.train.num_epochs == 1.0
    assert c.init.reference_checkpoint == f"/ckpts/var_d{depth}.pth"
    assert c.init.tokenizer_checkpoint == "/ckpts/vae_ch160v4096z32.pth"
    assert (c.sample.cfg_scale, c.sample.top_k, c.sample.top_p) == (0.0, 900, 0.96)
