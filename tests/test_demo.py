"""The embedded demo (cca_jax/demo): a smoke run of every stage at tiny size, and unit tests of
its digits classifier / feature network and its two tokenizers."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cca_jax.demo import classifier as clf
from cca_jax.demo import tokenizers as T


# ------------------------------------------------------------------------------ tokenizers

def test_pixel_tokenizer_round_trip_is_lossless_on_digits():
    from cca_jax.demo.pipeline import digits_uint8
    from cca_jax.data import digits

    x, _ = digits.load_digits_images(8, 1)
    tok = T.PixelTokenizer()
    ids = tok.encode(x)
    assert ids.shape == (1797, 64) and ids.dtype == np.int32
    assert ids.min() == 0 and ids.max() == 16
    from sklearn.datasets import load_digits
    np.testing.assert_array_equal(ids, load_digits().images.reshape(1797, 64).astype(np.int32))
    u8 = np.asarray(tok.decode_uint8(jnp.asarray(ids)))
    real_u8, _ = digits_uint8()
    assert u8.shape == (1797, 8, 8, 3) and u8.dtype == np.uint8
    np.testing.assert_array_equal(u8, real_u8)


def test_pixel_tokenizer_rejects_wrong_size():
    with pytest.raises(ValueError, match="8, 8"):
        T.PixelTokenizer().encode(np.zeros((2, 16, 16, 1), np.float32))


def _tiny_vq_cfg():
    from cca_jax.models import vqvae
    return vqvae.VQVAEConfig(vocab_size=16, z_channels=4, ch=8, ch_mult=(1,), num_res_blocks=1,
                             in_channels=1, using_sa=False, using_mid_sa=False, num_groups=4,
                             patch_nums=(1, 2, 4, 8))


def test_vqvae_quantize_ste_matches_inference_quantiser_and_passes_gradients():
    from cca_jax.models import vqvae
    cfg = _tiny_vq_cfg()
    params = vqvae.init_params(cfg, jax.random.key(0))
    f = jax.random.normal(jax.random.key(1), (3, 8, 8, 4))
    f_hat_st, loss, idx = T.quantize_ste(params, cfg, f)
    ref_idx = vqvae.f_to_idxBl_or_fhat(params, cfg, f, to_fhat=False)
    ref_fhat = vqvae.f_to_idxBl_or_fhat(params, cfg, f, to_fhat=True)[-1]
    for a, b in zip(idx, ref_idx):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(f_hat_st), np.asarray(ref_fhat), atol=1e-5)
    assert np.isfinite(float(loss)) and float(loss) > 0
    # straight-through: d sum(f_hat_st) / d f = 1 everywhere
    g = jax.grad(lambda x: jnp.sum(T.quantize_ste(params, cfg, x)[0]))(f)
    np.testing.assert_allclose(np.asarray(g), 1.0)
    # the codebook receives gradient from the vq loss
    gp = jax.grad(lambda p: T.quantize_ste(p, cfg, f)[1])(params)
    assert float(jnp.abs(gp["quantize"]["embedding"]).sum()) > 0


def test_train_vqvae_reduces_reconstruction_error():
    from cca_jax.data import digits
    from cca_jax.models import vqvae
    cfg = _tiny_vq_cfg()
    x, _ = digits.load_digits_images(8, 1)
    x = x[:256]
    p0 = T._seed_codebook(vqvae.init_params(cfg, jax.random.key(0)), cfg, x, np.random.default_rng(0))
    before = T.vqvae_report(p0, cfg, x)["recon_mse"]
    params, rep = T.train_vqvae(x, cfg, steps=60, batch_size=64, lr=3e-3, seed=0)
    assert rep["tokens_per_image"] == 1 + 4 + 16 + 64
    assert rep["recon_mse"] < 0.5 * before, (before, rep)
    assert 0 < rep["code_usage"] <= 1


# ------------------------------------------------------------------------------ classifier

def test_classifier_learns_digits_and_exposes_feature_net():
    from cca_jax.demo.pipeline import digits_uint8
    u8, y = digits_uint8()
    cfg = clf.ClassifierConfig(steps=150, features=16)
    params, rep = clf.train(u8, y, cfg)
    assert rep["holdout_accuracy"] > 0.85, rep
    assert rep["num_train"] + rep["num_holdout"] == 1797
    out = clf.apply(params, u8[:7], cfg)
    assert out["pool"].shape == (7, 16) and out["logits"].shape == (7, 10)
    # channel layout does not matter: grey [B, H, W] and RGB give the same features
    np.testing.assert_allclose(np.asarray(clf.apply(params, u8[:7, :, :, 0], cfg)["pool"]),
                               np.asarray(out["pool"]), rtol=1e-5, atol=1e-5)
    net = clf.feature_net(params, cfg)
    from cca_jax.demo import evaluation
    ref = evaluation.reference(net, u8, y)
    m = evaluation.evaluate(net, u8[:500], y[:500], ref, y)
    assert m["accuracy"] > 0.85
    assert 0 <= m["fid"] < 1.0 and m["cfid"] >= 0
    # shuffled labels: accuracy collapses, the marginal FID does not change
    m2 = evaluation.evaluate(net, u8[:500], np.roll(y[:500], 1), ref, y)
    assert m2["accuracy"] < 0.3
    assert m2["fid"] == pytest.approx(m["fid"], rel=1e-6)
    assert m2["cfid"] > m["cfid"]


def test_classifier_config_rejects_unknown_field():
    with pytest.raises(ValueError, match="unknown fields"):
        clf.ClassifierConfig.from_config({"hiden": 3})


# ------------------------------------------------------------------------------ smoke run

def _smoke_config(families="llamagen,var"):
    from configs import demo
    c = demo.get_config()
    c.demo.families = families
    c.demo.reference = "assets"
    c.demo.num_samples = 40
    c.demo.sample_batch = 24
    c.demo.classifier.steps = 30
    for fam in ("llamagen", "var"):
        f = c.demo[fam]
        f.cfg_scales = (2.0,)
        f.cca.lambdas = (10.0,)
        f.cca.steps = 2
        f.cca.batch_size = 16
    return c


def test_demo_smoke_run_writes_every_output(tmp_path):
    from cca_jax.demo import pipeline
    wd = tmp_path / "demo"
    results = pipeline.run(_smoke_config(), str(wd))

    for fam in ("llamagen", "var"):
        rows = results["families"][fam]
        assert [r["mode"] for r in rows] == ["base", "base_cfg2", "cca_lam10"]
        for r in rows:
            for k in ("fid", "cfid", "accuracy", "sec_per_image", "precision", "recall"):
                assert np.isfinite(r[k]), (fam, r["mode"], k)
            z = np.load(wd / "samples" / f"{fam}_{r['mode']}.npz")
            assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (40, 8, 8, 3)
            assert z["labels"].shape == (40,)
            np.testing.assert_array_equal(np.bincount(z["labels"], minlength=10), 4)
            assert (wd / "samples" / f"{fam}_{r['mode']}.png").exists()
        assert (wd / f"cca_{fam}_lam10" / "checkpoints").is_dir()
        assert (wd / "data" / fam / "token_dataset.json").exists()

    md = (wd / "results.md").read_text()
    for mode in ("base", "base_cfg2", "cca_lam10"):
        assert f"| {mode} |" in md
    saved = json.loads((wd / "results.json").read_text())
    assert set(saved["families"]) == {"llamagen", "var"} and saved["summary"]
    with open(wd / "tradeoff.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(wd / "tensorboard"))

    # a rerun reuses every finished stage (no training, no sampling)
    again = pipeline.run(_smoke_config(), str(wd))
    assert not any(k.endswith(("/cca", "/sample", "/data")) or k == "classifier"
                   for k in again["stage_seconds"]), again["stage_seconds"]
    assert again["families"]["var"][0]["fid"] == pytest.approx(results["families"]["var"][0]["fid"])
