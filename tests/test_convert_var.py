"""Official VAR state dicts <-> Flax params: strict loading, exact round trips, files on disk."""

import fixture_harness
import jax
import numpy as np
import pytest

from cca_jax.convert.common import CheckpointMismatchError, save_torch_file
from cca_jax.convert.var import (decay_mask, expected_shapes, from_state_dict, load_checkpoint,
                                 official_buffers, official_keys, to_state_dict)
from cca_jax.models.var import VARConfig, abstract_params

TINY = dict(depth=2, embed_dim=64, num_heads=2, vocab_size=32, Cvae=4, num_classes=10, patch_nums=(1, 2, 3))


def random_params(cfg, seed=0):
    """Random params in numpy (no init program to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32), abstract_params(cfg))


def fixture_cfg(fx):
    return VARConfig.from_official_args(fx.meta["var_args"], fx.meta["vqvae_args"])


def assert_sd_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("var_model"))
def test_fixture_state_dict_round_trip_is_exact(fx):
    cfg = fixture_cfg(fx)
    sd = fx.state_dict("sd/")
    assert len(sd) == len(expected_shapes(cfg)) == fx.meta["state_dict_entries"]["sd"]
    params = from_state_dict(sd, cfg)
    shapes = jax.tree_util.tree_map(np.shape, params)
    assert shapes == jax.tree_util.tree_map(lambda x: tuple(x.shape), abstract_params(cfg))
    back = to_state_dict(params, cfg)
    # the official buffers come back too (lvl_1L int64, the -inf bias), so the official
    # VAR.load_state_dict(strict=True) accepts the export
    assert_sd_equal(back, {k: np.asarray(v) for k, v in sd.items()})


@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("var_model"))
def test_load_official_files_bare_and_wrapped(fx, tmp_path):
    cfg = fixture_cfg(fx)
    sd = fx.state_dict("sd/")
    want = from_state_dict(sd, cfg)
    save_torch_file(sd, tmp_path / "var.pth")
    assert_trees_equal(load_checkpoint(tmp_path / "var.pth", cfg), want)
    save_torch_file(sd, tmp_path / "ar-ckpt-last.pth", wrap="trainer")  # CCA trainer file
    assert_trees_equal(load_checkpoint(tmp_path / "ar-ckpt-last.pth", cfg), want)


@pytest.mark.parametrize("variant", [dict(), dict(shared_aln=True), dict(attn_l2_norm=False)])
def test_random_params_round_trip(variant):
    cfg = VARConfig(**TINY, **variant)
    params = random_params(cfg, 0)
    sd = to_state_dict(params, cfg)
    assert set(sd) == set(expected_shapes(cfg))
    assert ("blocks.0.attn.scale_mul_1H11" in sd) == cfg.attn_l2_norm
    assert ("shared_ada_lin.1.weight" in sd) == cfg.shared_aln
    assert_trees_equal(from_state_dict(sd, cfg), params)


def test_layout_of_split_tensors():
    """q|k|v rows, head-major, and the 6 AdaLN chunks land where the official code reads them."""
    cfg = VARConfig(**TINY)
    params = random_params(cfg, 1)
    sd = to_state_dict(params, cfg)
    C, D = cfg.C, cfg.head_dim
    W = sd["blocks.1.attn.mat_qkv.weight"]
    a = params["blocks_1"]["attn"]
    # row C + h*D + d of mat_qkv is key head h, dim d; column = input feature
    np.testing.assert_array_equal(W[C + 1 * D + 3], a["key"]["kernel"][:, 1, 3])
    np.testing.assert_array_equal(W[2 * C + 5], a["value"]["kernel"][:, 0, 5])
    ada = sd["blocks.0.ada_lin.1.weight"]
    np.testing.assert_array_equal(ada[4 * C + 7], params["blocks_0"]["ada_lin"]["kernel"][:, 4, 7])  # shift1
    np.testing.assert_array_equal(sd["head_nm.ada_lin.1.bias"][C:], params["head_nm"]["ada_lin"]["bias"][1])


def test_buffers_are_the_official_ones():
    cfg = VARConfig(**TINY)
    buf = official_buffers(cfg)
    assert buf["lvl_1L"].dtype == np.int64 and buf["lvl_1L"].tolist() == [[0] + [1] * 4 + [2] * 9]
    bias = buf["attn_bias_for_masking"][0, 0]
    assert bias[0, 0] == 0 and np.isneginf(bias[0, 1]) and (bias[-1] == 0).all()
    assert np.isneginf(bias[4, 5]) and bias[5, 4] == 0


def test_mismatches_name_the_keys():
    cfg = VARConfig(**TINY)
    sd = to_state_dict(random_params(cfg), cfg)

    bad = dict(sd)
    del bad["blocks.1.ffn.fc2.bias"]
    bad["blocks.2.attn.q_bias"] = np.zeros(cfg.C, np.float32)
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.1\.ffn\.fc2\.bias") as e:
        from_state_dict(bad, cfg)
    assert "blocks.2.attn.q_bias" in str(e.value)

    bad = dict(sd)
    bad["head.weight"] = np.zeros((cfg.vocab_size + 1, cfg.C), np.float32)
    with pytest.raises(CheckpointMismatchError, match=r"head\.weight"):
        from_state_dict(bad, cfg)

    bad = dict(sd)
    del bad["lvl_1L"]  # the official strict loader requires the buffers as well
    with pytest.raises(CheckpointMismatchError, match="lvl_1L"):
        from_state_dict(bad, cfg)

    bad = dict(sd)
    bad["blocks.0.attn.zero_k_bias"] = np.ones(cfg.C, np.float32)
    with pytest.raises(CheckpointMismatchError, match="zero_k_bias"):
        from_state_dict(bad, cfg)

    # same L, other scale split (a file made for other patch_nums): the level buffer differs
    bad = dict(sd)
    bad["lvl_1L"] = np.array([[0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]], np.int64)
    with pytest.raises(CheckpointMismatchError, match="lvl_1L"):
        from_state_dict(bad, cfg)

    with pytest.raises(CheckpointMismatchError, match="pos_1LC"):  # config with more tokens
        from_state_dict(sd, VARConfig(**{**TINY, "patch_nums": (1, 2, 4)}))


def test_orbax_params_dir(tmp_path):
    from cca_jax import checkpoint as ckpt_lib

    cfg = VARConfig(**TINY)
    params = random_params(cfg, 2)
    ckpt_lib.export_params(params, tmp_path / "params")
    assert_trees_equal(load_checkpoint(tmp_path / "params", cfg), params)
    with pytest.raises(Exception, match="depth|match|shape|blocks_2"):
        load_checkpoint(tmp_path / "params", VARConfig(**{**TINY, "depth": 3}))


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth", VARConfig(**TINY))


def test_decay_mask_follows_var_filter_params():
    cfg = VARConfig(**TINY, shared_aln=True)
    keys = official_keys(cfg)
    mask = decay_mask(cfg)
    flat = dict(zip(jax.tree_util.tree_leaves(keys), jax.tree_util.tree_leaves(mask)))
    decayed = {k for k, v in flat.items() if v}
    assert decayed == {"word_embed.weight", "class_emb.weight", "head.weight", "head_nm.ada_lin.1.weight",
                       "shared_ada_lin.1.weight"} | {
        f"blocks.{i}.{n}" for i in range(cfg.depth)
        for n in ("attn.mat_qkv.weight", "attn.proj.weight", "ffn.fc1.weight", "ffn.fc2.weight")}
    assert set(flat) | set(official_buffers(cfg)) == set(expected_shapes(cfg))
