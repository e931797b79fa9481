"""VQVAE checkpoint conversion: official key layout, strictness, exact round trips."""

import logging

import jax
import numpy as np
import pytest
import torch

import fixture_harness
from cca_jax.convert import common
from cca_jax.convert import vqvae as convert_vqvae
from cca_jax.models import vqvae

TINY = vqvae.VQVAEConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                         patch_nums=(1, 2, 3, 4))


def _tiny_sd():
    params = vqvae.init_params(TINY, jax.random.PRNGKey(0))
    sd = convert_vqvae.to_state_dict(params, TINY)
    sd["quantize.ema_vocab_hit_SV"] = np.arange(4 * 16, dtype=np.float32).reshape(4, 16)
    return sd


def _torch_save(sd, path):
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)


def test_official_layout_of_vae_ch160v4096z32():
    # var.md §4.4: 324 keys, 108,948,355 parameters (+ the (10, 4096) usage buffer)
    shapes = convert_vqvae.expected_shapes(vqvae.VQVAEConfig())
    assert len(shapes) == 324
    n = sum(int(np.prod(s)) for k, s in shapes.items() if k != "quantize.ema_vocab_hit_SV")
    assert n == 108_948_355
    assert shapes["quantize.ema_vocab_hit_SV"] == (10, 4096)
    assert shapes["quantize.embedding.weight"] == (4096, 32)
    assert shapes["quant_conv.weight"] == shapes["post_quant_conv.weight"] == (32, 32, 3, 3)
    assert shapes["encoder.conv_in.weight"] == (160, 3, 3, 3)
    assert shapes["encoder.down.4.attn.1.qkv.weight"] == (1920, 640, 1, 1)
    assert shapes["encoder.down.2.block.0.nin_shortcut.weight"] == (320, 160, 1, 1)
    assert shapes["encoder.down.3.downsample.conv.weight"] == (320, 320, 3, 3)
    assert "encoder.down.4.downsample.conv.weight" not in shapes
    assert shapes["encoder.mid.attn_1.proj_out.weight"] == (640, 640, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (32, 640, 3, 3)
    assert shapes["decoder.up.4.attn.2.norm.weight"] == (640,)
    assert shapes["decoder.up.3.block.0.nin_shortcut.weight"] == (320, 640, 1, 1)
    assert shapes["decoder.up.1.block.0.nin_shortcut.weight"] == (160, 320, 1, 1)
    assert shapes["decoder.up.1.upsample.conv.weight"] == (160, 160, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert shapes["decoder.conv_out.weight"] == (3, 160, 3, 3)
    for k in range(4):
        assert shapes[f"quantize.quant_resi.qresi_ls.{k}.weight"] == (32, 32, 3, 3)


@pytest.mark.parametrize("share,quant_resi,want", [
    (4, 0.5, [f"quantize.quant_resi.qresi_ls.{k}.{w}" for k in range(4) for w in ("weight", "bias")]),
    (2, 0.5, [f"quantize.quant_resi.qresi_ls.{k}.{w}" for k in range(2) for w in ("weight", "bias")]),
    (1, 0.5, ["quantize.quant_resi.qresi.weight", "quantize.quant_resi.qresi.bias"]),
    (0, 0.5, [f"quantize.quant_resi.{k}.{w}" for k in range(4) for w in ("weight", "bias")]),
    (4, 0.0, []),
])
def test_phi_key_layout_per_sharing_mode(share, quant_resi, want):
    cfg = vqvae.VQVAEConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                            patch_nums=(1, 2, 3, 4), share_quant_resi=share, quant_resi=quant_resi)
    got = sorted(k for k in convert_vqvae.expected_shapes(cfg) if "quant_resi" in k)
    assert got == sorted(want)


@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("var_model"))
def test_fixture_state_dict_round_trip_is_exact(fx):
    cfg = vqvae.VQVAEConfig.from_official_args(fx.meta["vqvae_args"])
    sd = fx.state_dict("vae_sd/")
    assert len(sd) == fx.meta["state_dict_entries"]["vae_sd"]
    back = convert_vqvae.to_state_dict(convert_vqvae.from_state_dict(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == np.float32 and back[k].shape == sd[k].shape, k
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_load_torch_file_and_save_official_round_trip(tmp_path):
    sd = _tiny_sd()
    path = tmp_path / "vae.pth"
    _torch_save(sd, path)
    params = convert_vqvae.load_checkpoint(path, TINY)
    np.testing.assert_array_equal(params["quantize"]["embedding"], sd["quantize.embedding.weight"])
    np.testing.assert_array_equal(params["encoder"]["conv_in"]["kernel"],
                                  sd["encoder.conv_in.weight"].transpose(2, 3, 1, 0))
    out = tmp_path / "back.pth"
    convert_vqvae.save_official(params, TINY, out)
    loaded = torch.load(out, map_location="cpu", weights_only=True)
    assert set(loaded) == set(sd)  # bare state dict, official keys only
    for k, v in sd.items():
        np.testing.assert_array_equal(loaded[k].numpy(), v, err_msg=k)


def test_orbax_params_dir_round_trip(tmp_path):
    from cca_jax import checkpoint
    sd = _tiny_sd()
    params = convert_vqvae.from_state_dict(sd, TINY)
    checkpoint.export_params(params, tmp_path / "params")
    back = convert_vqvae.load_checkpoint(tmp_path / "params", TINY)
    for k, v in convert_vqvae.to_state_dict(back, TINY).items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_mismatches_name_the_keys(tmp_path):
    sd = _tiny_sd()
    bad = dict(sd)
    del bad["decoder.up.1.block.0.conv2.weight"]
    bad["encoder.extra.weight"] = np.zeros(3, np.float32)
    bad["quantize.embedding.weight"] = np.zeros((17, 4), np.float32)
    path = tmp_path / "bad.pth"
    _torch_save(bad, path)
    with pytest.raises(common.CheckpointMismatchError) as e:
        convert_vqvae.load_checkpoint(path, TINY)
    msg = str(e.value)
    assert "decoder.up.1.block.0.conv2.weight" in msg
    assert "encoder.extra.weight" in msg
    assert "quantize.embedding.weight" in msg and "(17, 4)" in msg

    # a checkpoint for another tokenizer size fails, naming its keys
    other = vqvae.VQVAEConfig(vocab_size=16, z_channels=4, ch=64, ch_mult=(1, 2), num_res_blocks=1,
                              patch_nums=(1, 2, 3, 4))
    with pytest.raises(common.CheckpointMismatchError, match=r"decoder\.conv_in\.weight: checkpoint shape \(64, 4, 3, 3\)"):
        convert_vqvae.from_state_dict(sd, other)

    params = convert_vqvae.from_state_dict(sd, TINY)
    del params["quantize"]["quant_resi"]["phi_3"]
    with pytest.raises(common.CheckpointMismatchError, match="quantize/quant_resi/phi_3"):
        convert_vqvae.to_state_dict(params, TINY)


def test_usage_buffer_of_other_scale_count_is_replaced_like_official(caplog):
    sd = _tiny_sd()
    sd["quantize.ema_vocab_hit_SV"] = np.ones((10, 16), np.float32)  # 10 scales, model has 4
    with caplog.at_level(logging.WARNING):
        params = convert_vqvae.from_state_dict(sd, TINY)
    assert "ema_vocab_hit_SV" in caplog.text
    np.testing.assert_array_equal(params["quantize"]["ema_vocab_hit_SV"], np.zeros((4, 16), np.float32))
    sd["quantize.ema_vocab_hit_SV"] = np.ones((4, 17), np.float32)  # wrong vocab: strict error
    with pytest.raises(common.CheckpointMismatchError, match="ema_vocab_hit_SV"):
        convert_vqvae.from_state_dict(sd, TINY)
