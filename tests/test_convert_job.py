"""The convert job end to end: official files -> Orbax params dirs -> official files, per family."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch

from cca_jax import checkpoint as ckpt
from cca_jax.convert import common
from cca_jax.convert import job
from configs.common import base_config
from fixture_harness import REPO_ROOT, fixture_params


# ------------------------------------------------------------------------------ helpers

def _save_official(sd: dict, path, wrap: str | None) -> str:
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    torch.save({wrap: tensors} if wrap else tensors, path)
    return os.fspath(path)


def _config(**sections) -> ml_collections.ConfigDict:
    c = base_config()
    c.job = "convert"
    for name, d in sections.items():
        c[name] = ml_collections.ConfigDict(d)
    return c


def _llamagen_model(fx) -> dict:
    args = dict(fx.meta["model_args"])
    args.pop("model_type", None)
    return dict(family="llamagen", **args)


def _var_sections(fx) -> tuple[dict, dict]:
    vq = dict(fx.meta["vqvae_args"])
    va = dict(fx.meta["var_args"])
    model = dict(family="var", vocab_size=vq["vocab_size"], Cvae=vq["z_channels"],
                 **{k: va[k] for k in ("depth", "embed_dim", "num_heads", "mlp_ratio", "num_classes",
                                       "patch_nums", "norm_eps", "shared_aln", "attn_l2_norm",
                                       "cond_drop_rate", "drop_rate", "attn_drop_rate",
                                       "drop_path_rate")})
    vq.pop("test_mode", None)
    return model, dict(family="vqvae", **vq)


def _assert_same_state_dict(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        g = got[k].numpy() if hasattr(got[k], "numpy") else got[k]
        assert g.shape == want[k].shape, k
        np.testing.assert_array_equal(g, want[k], err_msg=k)


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same_tree(got, want):
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("fx", fixture_params("llamagen_model"))
def test_llamagen_official_to_orbax_and_back(fx, tmp_path):
    from cca_jax.convert import llamagen as conv
    from cca_jax.models.llamagen import LlamaGenConfig
    sd = fx.state_dict("sd/")
    src = _save_official(sd, tmp_path / "c2i.pt", "model")
    cfg = _config(model=_llamagen_model(fx))
    cfg.init.reference_checkpoint = src
    out = job.run(cfg, tmp_path / "a")
    assert out == {"model": str(tmp_path / "a" / "params")}
    mcfg = LlamaGenConfig.from_config(cfg.model)
    # the Orbax dir holds exactly what the converter makes of the official file
    _assert_same_tree(ckpt.load_params(out["model"]), conv.from_state_dict(sd, mcfg))
    meta = ckpt.params_metadata(out["model"])
    assert meta["family"] == "llamagen" and meta["model"]["dim"] == fx.meta["model_args"]["dim"]
    assert meta["source"] == src
    # the converters' and samplers' loader reads the dir
    _assert_same_tree(conv.load_checkpoint(out["model"], mcfg), conv.from_state_dict(sd, mcfg))

    back = _config(model=_llamagen_model(fx))
    back.convert.direction = "to_official"
    back.convert.source = out["model"]
    official = job.run(back, tmp_path / "b")["model"]
    assert official == str(tmp_path / "b" / "model.pt")
    loaded = torch.load(official, weights_only=True)
    assert list(loaded) == ["model"]  # the DDP layout the official loaders read
    _assert_same_state_dict(loaded["model"], sd)


@pytest.mark.parametrize("fx", fixture_params("llamagen_model"))
def test_llamagen_train_workdir_to_bare_official_file(fx, tmp_path):
    from cca_jax.convert import llamagen as conv
    from cca_jax.models.llamagen import LlamaGenConfig
    sd = fx.state_dict("sd/")
    cfg = _config(model=_llamagen_model(fx))
    params = conv.from_state_dict(sd, LlamaGenConfig.from_config(cfg.model))
    state = {"step": np.int32(5), "params": params,
             "opt_state": jax.tree_util.tree_map(np.zeros_like, params)}
    with ckpt.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(5, state, force=True)
    cfg.convert.direction = "to_official"
    cfg.convert.source = str(tmp_path / "run")
    cfg.convert.wrap = "none"  # FSDP-style bare state dict (XXL / 3B files)
    official = job.run(cfg, tmp_path / "out")["model"]
    _assert_same_state_dict(torch.load(official, weights_only=True), sd)


@pytest.mark.parametrize("fx", fixture_params("var_model"))
def test_var_and_vqvae_round_trip(fx, tmp_path):
    model, tok = _var_sections(fx)
    sd, vae_sd = fx.state_dict("sd/"), fx.state_dict("vae_sd/")
    cfg = _config(model=model, tokenizer=tok)
    cfg.init.reference_checkpoint = _save_official(sd, tmp_path / "var_d2.pth", None)
    cfg.init.tokenizer_checkpoint = _save_official(vae_sd, tmp_path / "vae.pth", None)
    out = job.run(cfg, tmp_path / "a")
    assert sorted(out) == ["model", "tokenizer"]
    assert ckpt.params_metadata(out["tokenizer"])["family"] == "vqvae"

    back = _config(model=model, tokenizer=tok)
    back.convert.direction = "to_official"
    back.convert.source = out["model"]
    back.init.tokenizer_checkpoint = out["tokenizer"]
    files = job.run(back, tmp_path / "b")
    assert files == {"model": str(tmp_path / "b" / "model.pth"),
                     "tokenizer": str(tmp_path / "b" / "tokenizer.pth")}
    _assert_same_state_dict(torch.load(files["model"], weights_only=True), sd)  # bare, as VAR's
    _assert_same_state_dict(torch.load(files["tokenizer"], weights_only=True), vae_sd)


@pytest.mark.parametrize("fx", fixture_params("vq16_tokenizer"))
def test_vq16_tokenizer_only(fx, tmp_path):
    from cca_jax.convert import vq16 as conv
    from cca_jax.models.vq16 import VQ16Config
    sd = fx.state_dict("sd/")
    cfg = _config(tokenizer=dict(family="vq16", **fx.meta["model_args"]))
    cfg.model.family = "llamagen"
    cfg.init.tokenizer_checkpoint = _save_official(sd, tmp_path / "vq_ds16_c2i.pt", "model")
    out = job.run(cfg, tmp_path / "a")
    assert out == {"tokenizer": str(tmp_path / "a" / "tokenizer_params")}
    tcfg = VQ16Config.from_config(cfg.tokenizer)
    _assert_same_tree(ckpt.load_params(out["tokenizer"]), conv.from_state_dict(sd, tcfg))
    back = _config(tokenizer=dict(family="vq16", **fx.meta["model_args"]))
    back.convert.direction = "to_official"
    back.init.tokenizer_checkpoint = out["tokenizer"]
    official = job.run(back, tmp_path / "b")["tokenizer"]
    _assert_same_state_dict(torch.load(official, weights_only=True)["model"], sd)


@pytest.mark.parametrize("fx", fixture_params("llamagen_model"))
def test_errors_name_the_config_field(fx, tmp_path):
    sd = fx.state_dict("sd/")
    src = _save_official(sd, tmp_path / "c2i.pt", "model")
    cfg = _config(model=_llamagen_model(fx))
    with pytest.raises(ValueError, match="config.init.reference_checkpoint"):
        job.run(cfg, tmp_path / "w")  # nothing to convert
    cfg.init.reference_checkpoint = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="config.init.reference_checkpoint"):
        job.run(cfg, tmp_path / "w")
    cfg.init.reference_checkpoint = src
    cfg.convert.direction = "sideways"
    with pytest.raises(ValueError, match="config.convert.direction"):
        job.run(cfg, tmp_path / "w")
    cfg.convert.direction = "to_orbax"
    wrong = _config(model=dict(_llamagen_model(fx), dim=2 * fx.meta["model_args"]["dim"]))
    wrong.init.reference_checkpoint = src
    with pytest.raises(common.CheckpointMismatchError, match=r"(?s)wqkv.weight: checkpoint shape.*config.model"):
        job.run(wrong, tmp_path / "w")
    job.run(cfg, tmp_path / "w")
    with pytest.raises(FileExistsError, match="config.convert.overwrite"):
        job.run(cfg, tmp_path / "w")
    cfg.convert.overwrite = True
    assert job.run(cfg, tmp_path / "w") == {"model": str(tmp_path / "w" / "params")}


@pytest.mark.parametrize("fx", fixture_params("llamagen_model"))
def test_gs_sources_and_outputs_go_through_local_copies(fx, tmp_path):
    """gs:// stand-in: etils' mock backend maps gs://b/... to a local "bucket" dir."""
    from etils.epath import testing as epath_testing
    bucket = tmp_path / "bucket"

    def local(p):
        s = os.fspath(p)
        return s.replace("gs://", f"{bucket}/", 1) if s.startswith("gs://") else s

    def one(orig, p, *a, **k):
        return orig(local(p), *a, **k)

    def two(orig, p, q, *a, **k):
        return orig(local(p), local(q), *a, **k)

    sd = fx.state_dict("sd/")
    (bucket / "b").mkdir(parents=True)
    _save_official(sd, bucket / "b" / "c2i.pt", "model")
    mocks = {name: one for name in ("exists", "isdir", "open", "makedirs", "mkdir", "stat",
                                    "listdir", "glob", "remove", "rmtree", "walk")}
    from unittest import mock
    from etils.epath import gpath
    # with TensorFlow installed etils sends gs:// to tf.io.gfile, which the mock does not cover
    with mock.patch.object(gpath, "_is_tf_installed", lambda: False), \
            epath_testing.mock_epath(copy=two, rename=two, replace=two, **mocks):
        cfg = _config(model=_llamagen_model(fx))
        cfg.init.reference_checkpoint = "gs://b/c2i.pt"
        out = job.run(cfg, tmp_path / "a")
        back = _config(model=_llamagen_model(fx))
        back.convert.direction = "to_official"
        back.convert.source = out["model"]
        assert job.run(back, "gs://b/out") == {"model": "gs://b/out/model.pt"}
    _assert_same_state_dict(torch.load(bucket / "b" / "out" / "model.pt", weights_only=True)["model"], sd)


@pytest.mark.parametrize("fx", fixture_params("llamagen_model"))
def test_main_runs_the_convert_job(fx, tmp_path):
    sd = fx.state_dict("sd/")
    src = _save_official(sd, tmp_path / "c2i.pt", "model")
    (tmp_path / "model.json").write_text(json.dumps(_llamagen_model(fx)))
    (tmp_path / "recipe.py").write_text(
        "import json, ml_collections\nfrom configs.common import base_config\n\n"
        "def get_config():\n    c = base_config()\n    c.job = 'convert'\n"
        f"    c.model = ml_collections.ConfigDict(json.load(open({str(tmp_path / 'model.json')!r})))\n"
        f"    c.init.reference_checkpoint = {src!r}\n    return c\n")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    p = subprocess.run([sys.executable, "-m", "cca_jax.main", f"--config={tmp_path / 'recipe.py'}",
                        f"--workdir={tmp_path / 'w'}"], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert ckpt.is_params_dir(tmp_path / "w" / "params")
    assert ckpt.params_metadata(tmp_path / "w" / "params")["family"] == "llamagen"
