"""VAR multi-scale VQVAE: parity with the official fixtures and internal consistency."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixture_harness
from cca_jax.convert import vqvae as convert_vqvae
from cca_jax.models import vqvae

# jitted once per module so every test reuses the compiled programs (cfg / flags static)
_img_to_idxBl = jax.jit(vqvae.img_to_idxBl, static_argnums=(1, 3))
_var_input = jax.jit(vqvae.idxBl_to_var_input, static_argnums=1)
_to_img = jax.jit(vqvae.idxBl_to_img, static_argnums=(1, 3, 4, 5))
_next_input = jax.jit(vqvae.next_autoregressive_input, static_argnums=(1, 2))
_embed_to_fhat = jax.jit(vqvae.embed_to_fhat, static_argnums=(1, 3, 4))


@functools.partial(jax.jit, static_argnums=(1, 3))
def _encode_and_idx(params, cfg, img, layout):
    f = vqvae.encode(params, cfg, img, layout)
    return f, vqvae.f_to_idxBl_or_fhat(params, cfg, f, to_fhat=False)


FIXTURES = fixture_harness.fixture_params("var_model")
_LOADED: dict = {}


def _load(fx):
    """(cfg, params) of the fixture's VQVAE; hyper-parameters only from its json."""
    if fx.path not in _LOADED:
        cfg = vqvae.VQVAEConfig.from_official_args(fx.meta["vqvae_args"])
        params = convert_vqvae.from_state_dict(fx.state_dict("vae_sd/"), cfg)
        _LOADED[fx.path] = cfg, jax.tree_util.tree_map(jnp.asarray, params)
    return _LOADED[fx.path]


def _split(cfg, idx_BL):
    return [jnp.asarray(idx_BL[:, b:e]) for b, e in cfg.begin_ends]


# ------------------------------------------------------------------------------- parity

@pytest.mark.parity
@pytest.mark.parametrize("fx", FIXTURES)
def test_encoder_and_indices_match_official(fx):
    cfg, params = _load(fx)
    vae = fx.group("vae/")
    assert list(vae["scale_lengths"]) == [p * p for p in cfg.patch_nums]
    f, idx = _encode_and_idx(params, cfg, vae["img"], "NCHW")
    np.testing.assert_allclose(np.asarray(f).transpose(0, 3, 1, 2), vae["f_BChw"], atol=1e-4, rtol=0)
    idx = np.concatenate([np.asarray(i) for i in idx], 1)
    bad = np.argwhere(idx != vae["idx_BL"])
    assert bad.size == 0, (
        f"{len(bad)} indices differ, first at (b, l) = {bad[:5].tolist()}, official margins there "
        f"{vae['vq_dist_margin'][tuple(bad[:5].T)].tolist()}")


@pytest.mark.parity
@pytest.mark.parametrize("fx", FIXTURES)
def test_teacher_forcing_input_matches_official(fx):
    cfg, params = _load(fx)
    vae = fx.group("vae/")
    want = vae["x_BLCv_wo_first_l"]
    x_from_list = np.asarray(_var_input(params, cfg, _split(cfg, vae["idx_BL"])))
    x_from_BL = np.asarray(_var_input(params, cfg, jnp.asarray(vae["idx_BL"])))
    assert x_from_list.shape == want.shape == (vae["idx_BL"].shape[0], cfg.L - cfg.first_l, cfg.Cvae)
    np.testing.assert_allclose(x_from_list, want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(x_from_BL, x_from_list)


@pytest.mark.parity
@pytest.mark.parametrize("fx", FIXTURES)
def test_idxBl_to_img_matches_official(fx):
    """decoded_img (last_one), decoded_img_per_scale (sample 0, last_one=False) and every
    gen/*/img (= (idxBl_to_img + 1) / 2), decoded in one batch so the decoder compiles once."""
    cfg, params = _load(fx)
    vae = fx.group("vae/")
    gens = sorted({k.split("/")[1] for k in fx.arrays if k.startswith("gen/") and k.endswith("/img")})
    idx_all = np.concatenate([vae["idx_BL"]] + [fx.arrays[f"gen/{g}/idx_BL"] for g in gens], 0)
    per_scale = _to_img(params, cfg, _split(cfg, idx_all), True, False, "NCHW")
    assert len(per_scale) == cfg.num_scales
    per_scale = np.stack([np.asarray(x) for x in per_scale])  # [S, B, 3, H, W]
    last = per_scale[-1]
    assert last.min() >= -1.0 and last.max() <= 1.0

    B = vae["idx_BL"].shape[0]
    np.testing.assert_allclose(last[:B], vae["decoded_img"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(per_scale[:, 0], vae["decoded_img_per_scale"], atol=1e-4, rtol=0)
    for g in gens:
        n = fx.arrays[f"gen/{g}/idx_BL"].shape[0]
        np.testing.assert_allclose((last[B:B + n] + 1) / 2, fx.arrays[f"gen/{g}/img"], atol=1e-4, rtol=0)
        B += n


@pytest.mark.parity
@pytest.mark.parametrize("fx", FIXTURES)
def test_sampler_pieces_reproduce_teacher_forcing(fx):
    """get_next_autoregressive_input over all scales gives the idxBl_to_var_input sequence and
    the f̂ that idxBl_to_img decodes (var.md §2.4 equivalence)."""
    cfg, params = _load(fx)
    vae = fx.group("vae/")
    idx_list = _split(cfg, vae["idx_BL"])
    B = idx_list[0].shape[0]
    f_hat = vqvae.empty_fhat(cfg, B)
    nexts = []
    for si in range(cfg.num_scales):
        f_hat, nxt = _next_input(params, cfg, si, f_hat, vqvae.lookup_codes(params, idx_list[si]))
        nexts.append(np.asarray(nxt))
    assert nexts[-1].shape == (B, cfg.latent_size ** 2, cfg.Cvae)
    np.testing.assert_allclose(np.concatenate(nexts[:-1], 1), vae["x_BLCv_wo_first_l"], atol=1e-5, rtol=0)
    ms_h = [vqvae.lookup_codes(params, i).reshape(B, p, p, cfg.Cvae) for i, p in zip(idx_list, cfg.patch_nums)]
    np.testing.assert_allclose(np.asarray(f_hat), np.asarray(_embed_to_fhat(params, cfg, ms_h, True, True)),
                               atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- Φ table

def test_phi_table_standard_ten_scales():
    assert vqvae.VQVAEConfig().phi_table == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert vqvae.phi_table(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)


def test_phi_table_ties_follow_float64_like_official():
    # s = 2 and 7 of 10 are exact ties (5/36 to both ticks); float64 rounding picks the later conv
    ticks = vqvae.phi_ticks(4)
    d = np.abs(ticks - 2 / 9)
    assert abs(d[0] - d[1]) < 1e-15 and d[1] < d[0]
    d = np.abs(ticks - 7 / 9)
    assert abs(d[2] - d[3]) < 1e-15 and d[3] < d[2]


@pytest.mark.parametrize("S,share,counts,want", [
    (4, 4, 0, (0, 1, 2, 3)),
    (2, 4, 0, (0, 3)),
    (6, 4, 0, (0, 0, 1, 2, 3, 3)),
    (10, 1, 0, (0,) * 10),
    (10, 0, 0, tuple(range(10))),
    (5, 0, 3, (0, 0, 1, 2, 2)),
    (10, 2, 0, (0, 0, 0, 0, 0, 1, 1, 1, 1, 1)),
    (13, 3, 0, (0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2)),  # float64 ties at 4/12, 8/12
])
def test_phi_table_other_patch_nums(S, share, counts, want):
    # independent evaluation of the official rule: nearest tick to si/(S-1), first on ties
    K = (counts or S) if share == 0 else (1 if share == 1 else share)
    ticks = (np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4
             else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K))
    ref = tuple(int(np.argmin(np.abs(ticks - si / (S - 1)))) for si in range(S))
    assert ref == want
    assert vqvae.phi_table(S, share, counts) == want


def test_phi_identity_when_quant_resi_zero():
    cfg = vqvae.VQVAEConfig(quant_resi=0.0, patch_nums=(1, 2))
    assert cfg.phi_table == (-1, -1) and cfg.num_phi == 0


# ------------------------------------------------------------------ small random model

TINY = vqvae.VQVAEConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                         patch_nums=(1, 2, 3, 4))


@functools.lru_cache(maxsize=None)
def _tiny_params():
    return vqvae.init_params(TINY, jax.random.PRNGKey(0))


def _tiny_images(B=2):
    return jax.random.uniform(jax.random.PRNGKey(1), (B, TINY.image_size, TINY.image_size, 3),
                              minval=-1.0, maxval=1.0)


def test_tiny_shapes_layouts_and_consistency():
    cfg, params = TINY, _tiny_params()
    assert cfg.image_size == 8 and cfg.L == 30 and cfg.begin_ends[-1] == (14, 30)
    img = _tiny_images()
    idx = _img_to_idxBl(params, cfg, img, "NHWC")
    assert [i.shape for i in idx] == [(2, p * p) for p in cfg.patch_nums]
    assert all(i.dtype == jnp.int32 for i in idx)
    idx_nchw = _img_to_idxBl(params, cfg, jnp.transpose(img, (0, 3, 1, 2)), "NCHW")
    for a, b in zip(idx, idx_nchw):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # f_to_idxBl_or_fhat(to_fhat) accumulates exactly what embed_to_fhat rebuilds from indices
    fhats = jax.jit(lambda p, x: vqvae.f_to_idxBl_or_fhat(p, cfg, vqvae.encode(p, cfg, x), True))(params, img)
    ms_h = [vqvae.lookup_codes(params, i).reshape(2, p, p, cfg.Cvae) for i, p in zip(idx, cfg.patch_nums)]
    rebuilt = _embed_to_fhat(params, cfg, ms_h, True, False)
    for a, b in zip(fhats, rebuilt):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)

    imgs = _to_img(params, cfg, idx, True, False, "NHWC")
    last = _to_img(params, cfg, idx, True, True, "NCHW")
    assert len(imgs) == cfg.num_scales and last.shape == (2, 3, cfg.image_size, cfg.image_size)
    np.testing.assert_allclose(np.asarray(imgs[-1]), np.asarray(last).transpose(0, 2, 3, 1), atol=1e-6)
    assert float(jnp.abs(last).max()) <= 1.0
    # fhat_to_img of the final f̂ is the last_one image
    np.testing.assert_allclose(np.asarray(jax.jit(vqvae.fhat_to_img, static_argnums=(1, 3))(
        params, cfg, fhats[-1], "NCHW")), np.asarray(last), atol=1e-6)

    # experimental progressive branch: one image per scale at that scale's resolution
    prog = _to_img(params, cfg, idx, False, False, "NHWC")
    assert [x.shape[1] for x in prog] == [p * cfg.downsample for p in cfg.patch_nums]


def test_tiny_teacher_forcing_equals_sampler_accumulation():
    cfg, params = TINY, _tiny_params()
    idx = _img_to_idxBl(params, cfg, _tiny_images(), "NHWC")
    x = _var_input(params, cfg, idx)
    f_hat, nexts = vqvae.empty_fhat(cfg, 2), []
    for si in range(cfg.num_scales - 1):
        f_hat, nxt = _next_input(params, cfg, si, f_hat, vqvae.lookup_codes(params, idx[si]))
        nexts.append(nxt)
    np.testing.assert_array_equal(np.asarray(jnp.concatenate(nexts, 1)), np.asarray(x))


def test_nearest_codes_formula_and_first_index_ties():
    cfg = TINY
    E = jnp.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 3.0, 0]])
    params = {"quantize": {"embedding": E}}
    z = jnp.array([[0.9, 0.1, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 2.0, 0], [0, 0, 1.4, 0]])
    # row 0: codes 0 and 2 tie -> 0; row 1: codes 0, 1, 2 tie -> 0; row 2: 3·e2 is nearest;
    # row 3: d = 2.96 to codes 0-2 and 2.56 to code 3 -> 3
    np.testing.assert_array_equal(np.asarray(vqvae.nearest_codes(params, cfg, z)), [0, 0, 3, 3])


def test_runs_sharded_under_logical_rules():
    from cca_jax import sharding
    cfg, params = TINY, _tiny_params()
    img = _tiny_images(8)
    want = np.concatenate([np.asarray(i) for i in _img_to_idxBl(params, cfg, img, "NHWC")], 1)
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
    with sharding.use_mesh(mesh):
        img_s = jax.device_put(img, sharding.batch_sharding(mesh, 4))
        got = jax.jit(lambda p, x: jnp.concatenate(vqvae.img_to_idxBl(p, cfg, x), 1))(params, img_s)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_config_from_config_dict_and_errors():
    import ml_collections
    from configs import var_common
    t = var_common.tokenizer_config()
    cfg = vqvae.VQVAEConfig.from_config(t)
    assert cfg == vqvae.VQVAEConfig() and cfg.image_size == 256 and cfg.L == 680
    root = ml_collections.ConfigDict({"tokenizer": t.to_dict()})
    assert vqvae.VQVAEConfig.from_config(root) == cfg
    bad = t.to_dict()
    bad["image_size"] = 512
    with pytest.raises(ValueError, match="image_size"):
        vqvae.VQVAEConfig.from_config(bad)
    with pytest.raises(ValueError, match="unknown"):
        vqvae.VQVAEConfig.from_official_args({"v_patch_nums": (1, 2), "bogus": 1})
    with pytest.raises(ValueError, match="at least 2 scales"):
        vqvae.VQVAEConfig(patch_nums=(16,))
    with pytest.raises(ValueError, match="GroupNorm"):
        vqvae.VQVAEConfig(ch=48)
    with pytest.raises(ValueError, match="tokenizer needs 8x8"):
        vqvae.encode(_tiny_params(), TINY, jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="L=30"):
        vqvae.idxBl_to_var_input(_tiny_params(), TINY, jnp.zeros((1, 29), jnp.int32))


def test_params_carry_logical_axis_names():
    boxed = vqvae.abstract_params(TINY)
    specs = jax.tree_util.tree_leaves(
        __import__("flax").linen.get_partition_spec(boxed),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    allowed = {"conv_in", "conv_out", "height", "width", "norm", "vocab", "scales"}
    assert specs and all(len(s) > 0 and set(s) <= allowed for s in specs)
