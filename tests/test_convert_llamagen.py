"""Official LlamaGen state dicts / .pt files <-> params: strict, safe, exact round trip."""

import argparse
import dataclasses

import numpy as np
import pytest
import torch

import fixture_harness
from cca_jax.convert import common
from cca_jax.convert import llamagen as convert
from cca_jax.models import llamagen as lg


def _fixture_cfg_sd(fx):
    return lg.LlamaGenConfig.from_model_args(fx.meta["model_args"]), fx.state_dict("sd/")


def _assert_sd_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == np.float32 and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("llamagen_model", "llamagen_gqa_tf"))
def test_fixture_state_dict_round_trip(fx):
    cfg, sd = _fixture_cfg_sd(fx)
    params = convert.from_state_dict(sd, cfg)
    assert params["layers_0"]["attention"]["wqkv"]["kernel"].shape == (
        cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim)
    assert params["cls_embedding"]["embedding_table"]["embedding"].shape[0] == cfg.num_classes + 1
    _assert_sd_equal(convert.to_state_dict(params, cfg), sd)


@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("llamagen_model"))
def test_torch_files_with_and_without_wrapper(fx, tmp_path):
    cfg, sd = _fixture_cfg_sd(fx)
    tensors = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
    # DDP layout: {"model", "optimizer", "steps", "args": argparse.Namespace} -> needs safe unpickling
    ddp = tmp_path / "c2i_ddp.pt"
    torch.save({"model": tensors, "optimizer": {"state": {}}, "steps": 5000,
                "args": argparse.Namespace(gpt_model="GPT-B", lr=1e-4)}, ddp)
    # FSDP layout: bare state dict, with a freqs_cis entry and KV-cache buffers taken after sampling
    bare = tmp_path / "consolidated.pth"
    extra = {"freqs_cis": torch.zeros(cfg.block_size + 1, cfg.head_dim // 2, 2),
             "layers.0.attention.kv_cache.k_cache": torch.zeros(2, cfg.n_head, 24, cfg.head_dim),
             "layers.0.attention.kv_cache.v_cache": torch.zeros(2, cfg.n_head, 24, cfg.head_dim)}
    torch.save({**tensors, **extra}, bare)
    for path in (ddp, bare):
        params = convert.load_checkpoint(path, cfg)
        _assert_sd_equal(convert.to_state_dict(params, cfg), sd)

    # export: the official loader (strict load of the "model" entry) sees the same tensors
    out = tmp_path / "export.pt"
    convert.save_official(params, cfg, out)
    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == {"model"}
    _assert_sd_equal({k: v.numpy() for k, v in loaded["model"].items()}, sd)
    convert.save_official(params, cfg, tmp_path / "bare.pt", wrap=None)
    loaded = torch.load(tmp_path / "bare.pt", weights_only=True)
    _assert_sd_equal({k: v.numpy() for k, v in loaded.items()}, sd)


def test_mismatches_name_the_keys():
    cfg = lg.LlamaGenConfig(dim=64, n_layer=2, n_head=4, vocab_size=32, num_classes=10, block_size=16)
    rng = np.random.default_rng(0)
    sd = {k: rng.standard_normal(s).astype(np.float32)
          for k, s in convert.expected_shapes(cfg).items()}
    convert.from_state_dict(sd, cfg)  # sanity: the exact layout loads

    bigger = dataclasses.replace(cfg, n_layer=3)  # wrong size config
    with pytest.raises(common.CheckpointMismatchError, match=r"layers\.2\.attention\.wqkv\.weight"):
        convert.from_state_dict(sd, bigger)
    wider = dataclasses.replace(cfg, dim=128)
    with pytest.raises(common.CheckpointMismatchError,
                       match=r"cls_embedding\.embedding_table\.weight: checkpoint shape \(11, 64\), "
                             r"model expects \(11, 128\)"):
        convert.from_state_dict(sd, wider)
    no_null = dataclasses.replace(cfg, class_dropout_prob=0.0)  # 10-row table expected
    with pytest.raises(common.CheckpointMismatchError, match=r"cls_embedding\.embedding_table\.weight"):
        convert.from_state_dict(sd, no_null)

    missing = dict(sd)
    del missing["layers.1.ffn_norm.weight"]
    with pytest.raises(common.CheckpointMismatchError, match=r"missing.*layers\.1\.ffn_norm\.weight"):
        convert.from_state_dict(missing, cfg)
    extra = {**sd, "module.output.weight": sd["output.weight"]}
    with pytest.raises(common.CheckpointMismatchError, match=r"unexpected.*module\.output\.weight"):
        convert.from_state_dict(extra, cfg)
    # the weights of a 4x4-grid model fit a 6x6 config; only a RoPE table in the file tells
    rope = np.zeros((1 + cfg.block_size, cfg.head_dim // 2, 2), np.float32)
    convert.from_state_dict({**sd, "freqs_cis": rope}, cfg)
    with pytest.raises(common.CheckpointMismatchError, match=r"freqs_cis \(17, 8, 2\).*block_size"):
        convert.from_state_dict({**sd, "freqs_cis": rope}, dataclasses.replace(cfg, block_size=36))


def test_orbax_params_dir(tmp_path):
    from cca_jax import checkpoint
    cfg = lg.LlamaGenConfig(dim=32, n_layer=1, n_head=2, vocab_size=16, num_classes=4, block_size=4)
    rng = np.random.default_rng(1)
    sd = {k: rng.standard_normal(s).astype(np.float32)
          for k, s in convert.expected_shapes(cfg).items()}
    params = convert.from_state_dict(sd, cfg)
    checkpoint.export_params(params, tmp_path / "params")
    _assert_sd_equal(convert.to_state_dict(convert.load_checkpoint(tmp_path / "params", cfg), cfg), sd)
    with pytest.raises(common.CheckpointMismatchError, match="output.weight"):
        convert.load_checkpoint(tmp_path / "params", dataclasses.replace(cfg, vocab_size=32))


def test_gs_urls_are_read_and_written_through_epath(tmp_path, monkeypatch):
    """gs:// checkpoints (files and Orbax dirs) never go through pathlib, which would turn
    ``gs://b`` into ``gs:/b``: a fake bucket maps the URLs onto tmp_path."""
    from etils import epath
    from cca_jax import checkpoint

    real_as_path = checkpoint.as_path
    seen = []

    def fake_as_path(path):
        s = str(path)
        if s.startswith("gs://"):
            seen.append(s)
            return epath.Path(tmp_path / "bucket" / s[len("gs://"):])
        assert "gs:/" not in s, f"a gs:// URL was mangled into {s}"
        return real_as_path(path)

    monkeypatch.setattr(checkpoint, "as_path", fake_as_path)
    cfg = lg.LlamaGenConfig(dim=32, n_layer=1, n_head=2, vocab_size=16, num_classes=4, block_size=4)
    rng = np.random.default_rng(2)
    sd = {k: rng.standard_normal(s).astype(np.float32)
          for k, s in convert.expected_shapes(cfg).items()}
    convert.save_official(convert.from_state_dict(sd, cfg), cfg, "gs://b/llamagen/c2i.pt")
    assert (tmp_path / "bucket" / "b" / "llamagen" / "c2i.pt").is_file()
    _assert_sd_equal(convert.to_state_dict(convert.load_checkpoint("gs://b/llamagen/c2i.pt", cfg), cfg), sd)
    checkpoint.export_params(convert.from_state_dict(sd, cfg), "gs://b/llamagen/params")
    _assert_sd_equal(convert.to_state_dict(convert.load_checkpoint("gs://b/llamagen/params", cfg), cfg), sd)
    assert "gs://b/llamagen/params" in seen
    with pytest.raises(FileNotFoundError, match="gs://b/missing.pt"):
        convert.load_checkpoint("gs://b/missing.pt", cfg)


def test_official_layout_per_size():
    # the FSDP-trained sizes ship bare state dicts, the others {"model": sd} (spec §7.2)
    from configs import llamagen_common
    for size in ("B", "L", "XL", "XXL", "3B"):
        cfg = lg.LlamaGenConfig.from_config(llamagen_common.model_config(size, 384))
        want = None if size in llamagen_common.FSDP_SIZES else "model"
        assert convert.official_wrap(cfg) == want, size
    from cca_jax.convert import job
    xxl = lg.LlamaGenConfig.from_config(llamagen_common.model_config("XXL", 384))
    fam = job.MODEL_FAMILIES["llamagen"]
    assert job._resolve_wrap("auto", fam, xxl) is None
    assert job._resolve_wrap("model", fam, xxl) == "model"  # an explicit setting wins
