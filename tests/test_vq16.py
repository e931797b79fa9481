"""LlamaGen VQ-16 tokenizer: parity with the official model, converter, checkpoint loading."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixture_harness
from cca_jax.convert import common, vq16 as convert
from cca_jax.models import vq16


def _nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def _all_outputs(cfg: vq16.VQ16Config):
    """One jitted function for every compared output (one compilation)."""
    def run(m: vq16.VQModel, img, codes, rand_codes):
        h = m.encode_h(img)
        z = m.quant_conv(h)
        quant, own_codes = m.quantize(z)
        return {"h": h, "quant_conv": z, "codes": own_codes.reshape(img.shape[0], -1),
                "quant": quant, "code_embed": m.code_embed(codes),
                "decode_code": m.decode_code(codes), "rand_decode": m.decode_code(rand_codes),
                "recon": m.decode(quant)}
    return jax.jit(lambda p, *a: vq16.VQModel(cfg).apply({"params": p}, *a, method=run))


@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("vq16_tokenizer"))
def test_parity_with_official(fx):
    cfg = vq16.VQ16Config.from_model_args(fx.meta["model_args"])
    params = convert.from_state_dict(fx.state_dict("sd/"), cfg)
    vq = fx.group("vq/")
    H = vq["img"].shape[2]
    assert cfg.tokens_per_image(H) == vq["codes"].shape[1]
    out = jax.device_get(_all_outputs(cfg)(params, jnp.asarray(_nhwc(vq["img"])),
                                          jnp.asarray(vq["codes"]), jnp.asarray(vq["rand_codes"])))
    codes = out["codes"]
    assert codes.dtype == np.int32 and codes.shape == vq["codes"].shape
    mismatch = codes != vq["codes"]
    assert not mismatch.any(), (f"{mismatch.sum()} codes differ; their official margins: "
                                f"{vq['code_margin'][mismatch][:8]}")
    # the public encode() path gives the same codes
    np.testing.assert_array_equal(
        np.asarray(vq16.encode(params, cfg, jnp.asarray(_nhwc(vq["img"])))), vq["codes"])
    for name, atol in (("h", 1e-4), ("quant_conv", 1e-4), ("quant", 1e-5), ("code_embed", 1e-5),
                       ("decode_code", 1e-4), ("rand_decode", 1e-4), ("recon", 1e-4)):
        np.testing.assert_allclose(out[name], _nhwc(vq[name]), atol=atol, rtol=0, err_msg=name)


@pytest.mark.parametrize("fx", fixture_harness.fixture_params("vq16_tokenizer"))
def test_converter_round_trip_is_exact(fx):
    cfg = vq16.VQ16Config.from_model_args(fx.meta["model_args"])
    sd = fx.state_dict("sd/")
    assert set(convert.expected_shapes(cfg)) == set(sd)
    assert len(sd) == fx.meta["state_dict_entries"]["sd"]
    params = convert.from_state_dict(sd, cfg)
    n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params))
    buffer = sd["quantize.codebook_used"].size
    assert n_params - buffer == fx.meta["derived"]["num_parameters"]
    back = convert.to_state_dict(params, cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == np.float32 and np.array_equal(back[k], sd[k]), k


def _tiny_cfg(**kw):
    return vq16.VQ16Config(codebook_size=64, codebook_embed_dim=4, encoder_ch_mult=(1, 2),
                           decoder_ch_mult=(1, 2), z_channels=8, ch=32, **kw)


def test_converter_is_strict():
    cfg = _tiny_cfg()
    sd = convert.to_state_dict(vq16.init_params(cfg, jax.random.PRNGKey(0)), cfg)
    assert "quantize.codebook_used" in sd and sd["quantize.codebook_used"].shape == (65536,)
    assert "encoder.conv_blocks.1.res.0.nin_shortcut.weight" in sd
    assert "decoder.conv_blocks.0.attn.2.proj_out.weight" in sd  # j = 0: lowest resolution
    missing = dict(sd)
    del missing["encoder.mid.1.q.weight"]
    with pytest.raises(common.CheckpointMismatchError, match=r"encoder\.mid\.1\.q\.weight"):
        convert.from_state_dict(missing, cfg)
    extra = dict(sd, **{"encoder.bogus.weight": np.zeros(3, np.float32)})
    with pytest.raises(common.CheckpointMismatchError, match="encoder.bogus.weight"):
        convert.from_state_dict(extra, cfg)
    wrong = dict(sd, **{"quantize.embedding.weight": np.zeros((65, 4), np.float32)})
    with pytest.raises(common.CheckpointMismatchError, match=r"\(65, 4\)"):
        convert.from_state_dict(wrong, cfg)
    no_usage = _tiny_cfg(codebook_show_usage=False)
    assert "quantize.codebook_used" not in convert.expected_shapes(no_usage)


def test_load_checkpoint_official_file_and_orbax(tmp_path):
    cfg = _tiny_cfg()
    params = vq16.init_params(cfg, jax.random.PRNGKey(1))
    sd = convert.to_state_dict(params, cfg)
    sd["quantize.codebook_used"][:5] = [3, 1, 4, 1, 5]  # usage history survives the round trip
    import torch
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()},
                "optimizer": {"state": {}}, "steps": 7}, path)
    loaded = convert.load_checkpoint(path, cfg)
    back = convert.to_state_dict(loaded, cfg)
    assert all(np.array_equal(back[k], sd[k]) for k in sd)

    from cca_jax import checkpoint
    odir = tmp_path / "orbax_params"
    checkpoint.export_params(loaded, odir)
    again = convert.load_checkpoint(odir, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(again),
                                                    jax.tree_util.tree_leaves(loaded)))


def test_tiny_tokenizer_shapes_and_codes():
    cfg = _tiny_cfg()
    assert cfg.downsample == 2 and cfg.tokens_per_image(16) == 64
    params = vq16.init_params(cfg, jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 16, 16, 3), minval=-1, maxval=1)
    codes = vq16.encode(params, cfg, x)
    assert codes.shape == (3, 64) and codes.dtype == jnp.int32
    assert 0 <= int(codes.min()) and int(codes.max()) < 64
    # nearest codes: no other normalised codebook row is closer than the chosen one
    z = jax.jit(lambda p, x: vq16.VQModel(cfg).apply(
        {"params": p}, x, method=vq16.VQModel.encode_latent))(params, x)
    zn = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    e = params["quantize"]["embedding"]
    en = e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    d = jnp.sum((zn.reshape(3, 64, 1, 4) - en[None, None]) ** 2, -1)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(jnp.argmin(d, -1)))
    img = vq16.decode_code(params, cfg, codes)
    assert img.shape == (3, 16, 16, 3) and bool(jnp.isfinite(img).all())
    with pytest.raises(ValueError, match="not a square"):
        vq16.decode_code(params, cfg, codes[:, :60])


def test_config_from_model_args_and_config():
    with pytest.raises(ValueError, match="Unknown VQ-16 tokenizer fields"):
        vq16.VQ16Config.from_model_args({"codebook_size": 8, "bogus": 1})
    c = vq16.default_config()
    assert c.family == "vq16" and c.codebook_size == 16384 and list(c.encoder_ch_mult) == [1, 1, 2, 2, 4]
    cfg = vq16.VQ16Config.from_config(c)
    assert cfg == vq16.VQ16Config() and cfg.downsample == 16 and cfg.tokens_per_image(384) == 576
    with pytest.raises(ValueError, match="norm_groups"):
        vq16.VQ16Config(ch=48)
