"""The eval job end to end (random-weight FID-Inception), feature extraction over the mesh, the
reference cache, the pluggable-feature API, the in-training hook and ADM's TF-graph path."""

from __future__ import annotations

import glob
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cca_jax import evaluate as E
from cca_jax import metrics as M
from cca_jax.convert import inception as convert
from cca_jax.convert.common import save_torch_file
from cca_jax.models import inception as inc
from configs.common import base_config


def _images(n, seed, size=32, channels=3):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def _toy_features(images):
    """A cheap jittable 'feature network': pooled colour statistics + a 3-class head."""
    x = images.astype(jnp.float32) / 255.0
    B = x.shape[0]
    pool = jnp.concatenate([x.mean((1, 2)), x.std((1, 2)), x[:, ::8, ::8].reshape(B, -1)[:, :10]], -1)
    spatial = x[:, ::4, ::4, 0].reshape(B, -1)
    logits = pool[:, :3] * 10.0
    return {"pool": pool, "spatial": spatial, "logits": logits}


def _read_scalars(logdir):
    """{tag: (step, value)} of the clu/TensorBoard event files in ``logdir``."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    out = {}
    for f in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        acc = event_accumulator.EventAccumulator(f, size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            ev = acc.Tensors(tag)[-1]
            out[tag] = (ev.step, float(tf.make_ndarray(ev.tensor_proto)))
    return out


# ---------------------------------------------------------------------------------- end to end


def test_eval_job_end_to_end(tmp_path):
    """Random-weight FID-Inception read from a .pth file, sharded over 8 devices.

    Input 75 px (the smallest Inception-v3 input) keeps it fast on CPU; the 299-px network is
    checked against pytorch-fid in test_inception.py.
    """
    params = inc.random_params(seed=1)
    weights = tmp_path / "pt_inception.pth"
    save_torch_file(convert.to_state_dict(params, num_batches_tracked=True), weights)
    samples, ref = _images(12, 0, 40), _images(10, 1, 40)
    np.savez(tmp_path / "samples.npz", arr_0=samples, labels=np.arange(12) % 3)
    np.savez(tmp_path / "ref.npz", arr_0=ref)

    config = base_config()
    config.job = "eval"
    config.eval.samples_npz = str(tmp_path / "samples.npz")
    config.eval.reference_npz = str(tmp_path / "ref.npz")
    config.eval.inception_weights = str(weights)
    config.eval.inception_preprocess = "pytorch_fid"
    config.eval.inception_resolution = 75
    config.eval.batch_size = 1  # 8 devices: 8 images per call, the last one padded
    config.eval.is_split_size = 5
    config.eval.fid_method = "eigh"  # 12 images: sqrtm's complex path on 2048² takes minutes
    config.eval.step = 7
    workdir = str(tmp_path / "work")
    results = E.run(config, workdir)

    expected = {"num_samples", "fid", "sfid", "inception_score", "precision", "recall"}
    assert set(results) == expected
    assert results["num_samples"] == 12
    assert all(np.isfinite(v) for v in results.values()), results
    assert results["fid"] > 0 and results["sfid"] > 0 and results["inception_score"] >= 1.0
    saved = json.loads((tmp_path / "work" / "eval" / "samples.json").read_text())
    assert saved["metrics"] == pytest.approx(results) and saved["step"] == 7
    assert saved["num_reference"] == 10 and "fid_inception" in saved["feature_net"]
    scalars = _read_scalars(os.path.join(workdir, "eval"))
    assert set(scalars) == expected
    for k, (step, v) in scalars.items():
        assert step == 7 and v == pytest.approx(results[k], rel=1e-6), k

    # the same numbers from unsharded features (one call) and the metric functions directly
    fwd = jax.jit(inc.feature_apply(inc.FIDInceptionV3(resize_to=75, preprocess="pytorch_fid")))
    both = {k: np.asarray(v) for k, v in fwd(params, np.concatenate([samples, ref])).items()}
    fs, fr = {k: v[:12] for k, v in both.items()}, {k: v[12:] for k, v in both.items()}
    direct = M.compute_all(fs, E.Reference.from_features(fr).as_dict(), split_size=5,
                           fid_method="eigh")
    for k in expected:
        assert results[k] == pytest.approx(direct[k], rel=1e-3, abs=1e-4), k

    # the reference features were cached and are reused
    caches = glob.glob(os.path.join(workdir, "eval_cache", "reference_*.npz"))
    assert len(caches) == 1
    cached = E.Reference.load(caches[0])
    np.testing.assert_allclose(cached.pool, fr["pool"], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- pluggable features


def test_compute_metrics_with_a_classifier_and_labels():
    """The digits-demo API: FID in a classifier's feature space + accuracy against the labels."""
    samples, ref = _images(24, 2), _images(20, 3)
    head = lambda pool: np.asarray(pool)[:, :3] * 10.0  # noqa: E731
    pool_only = lambda x: _toy_features(x)["pool"]  # noqa: E731
    labels = np.argmax(head(np.asarray(pool_only(samples))), axis=1)
    labels[:6] = (labels[:6] + 1) % 3  # 6 of 24 wrong
    out = E.compute_metrics(pool_only, samples, ref, logits_fn=head, labels=labels, batch_size=2)
    assert out["accuracy"] == pytest.approx(18 / 24)
    feats_s, feats_r = np.asarray(pool_only(samples)), np.asarray(pool_only(ref))
    assert out["fid"] == pytest.approx(M.fid_from_features(feats_s, feats_r), rel=1e-5)
    assert (out["precision"], out["recall"]) == M.precision_recall(feats_r, feats_s)
    assert "sfid" not in out and out["inception_score"] >= 1.0
    only = E.compute_metrics(pool_only, samples, ref, metrics=["fid"], batch_size=2)
    assert set(only) == {"num_samples", "fid"}
    with pytest.raises(ValueError, match="Unknown metrics"):
        E.compute_metrics(pool_only, samples, ref, metrics=["kid"])


def test_extract_features_pads_and_matches_unsharded():
    images = _images(13, 4)
    got = E.extract_features(_toy_features, images, batch_size=1, progress=False)  # 8 per call
    want = jax.jit(_toy_features)(images)
    assert got["pool"].shape == (13, 16)
    for k in want:
        np.testing.assert_allclose(got[k], np.asarray(want[k]), rtol=1e-6, atol=1e-6)
    # batches arriving in other sizes are re-batched
    got2 = E.extract_features(_toy_features, iter([images[:5], images[5:6], images[6:]]),
                              batch_size=1, progress=False)
    np.testing.assert_allclose(got2["pool"], got["pool"])


def test_fid_for_params_and_train_hook(tmp_path):
    calls = []

    def sample_fn(params, key):
        calls.append(key)
        seed = int(jax.random.randint(key, (), 0, 2 ** 30))
        return _images(5, seed) // np.uint8(params), np.arange(5) % 3

    ref = E.Reference.from_features(jax.tree_util.tree_map(np.asarray, _toy_features(_images(16, 9))))
    out = E.fid_for_params(2, sample_fn, _toy_features, ref, num_samples=12,
                           rng=jax.random.key(0), metrics=("fid", "accuracy"), batch_size=1)
    assert len(calls) == 3 and set(out) == {"num_samples", "fid", "accuracy"}
    assert out["num_samples"] == 12 and out["fid"] > 0

    np.savez(tmp_path / "ref.npz", arr_0=_images(16, 9))
    config = base_config()
    config.eval.reference_npz = str(tmp_path / "ref.npz")
    config.eval.train_num_samples = 10
    config.eval.batch_size = 1
    hook = E.make_train_eval_hook(config, str(tmp_path / "work"), sample_fn,
                                  features_fn=E.FeatureNet(lambda p, x: _toy_features(x), name="toy"))
    m1 = hook(1, step=100)
    assert set(m1) == {"eval/num_samples", "eval/fid"} and m1["eval/num_samples"] == 10
    assert glob.glob(str(tmp_path / "work" / "eval_cache" / "reference_*.npz"))
    m2 = hook(1, step=100)
    assert m2 == m1  # same step -> same keys -> same samples


# ---------------------------------------------------------------------------------- references


def test_reference_file_stats_recompute_and_directory(tmp_path):
    from PIL import Image

    imgs = _images(12, 5)
    mu, sigma = np.full(16, 0.5, np.float32), np.eye(16) * 2.0
    np.savez(tmp_path / "adm_ref.npz", arr_0=imgs, mu=mu, sigma=sigma)
    net = E.FeatureNet(lambda p, x: _toy_features(x), name="toy")
    feats = jax.tree_util.tree_map(np.asarray, _toy_features(imgs))
    ref = E.load_reference(str(tmp_path / "adm_ref.npz"), net, batch_size=1, progress=False)
    np.testing.assert_array_equal(ref.mu, mu)  # ADM: the file's statistics win
    np.testing.assert_array_equal(ref.sigma, sigma)
    np.testing.assert_allclose(ref.pool, feats["pool"], rtol=1e-5)  # P/R still from arr_0
    assert ref.mu_s is not None  # spatial stats computed from arr_0 (the file has none)
    ref2 = E.load_reference(str(tmp_path / "adm_ref.npz"), net, batch_size=1, stats="recompute",
                            progress=False)
    np.testing.assert_allclose(ref2.mu, feats["pool"].mean(0), rtol=1e-5)
    assert not np.allclose(ref2.sigma, sigma)

    # a directory of images: ADM centre crop (box halving, bicubic, crop)
    d = tmp_path / "imgs"
    d.mkdir()
    big = _images(3, 6, size=80)
    for i, im in enumerate(big):
        Image.fromarray(np.concatenate([im, im[:, :20]], 1)).save(d / f"{i}.png")  # 80x100
    ref3 = E.load_reference(str(d), net, batch_size=1, image_size=32, progress=False,
                            cache_dir=str(tmp_path / "cache"))
    assert ref3.pool.shape == (3, 16)
    want = E.center_crop_arr(Image.open(d / "0.png"), 32)
    assert want.shape == (32, 32, 3)
    np.testing.assert_allclose(ref3.pool[0], np.asarray(_toy_features(want[None])["pool"][0]),
                               rtol=1e-5)
    assert E.load_reference(str(d), net, image_size=32, cache_dir=str(tmp_path / "cache")
                            ).source.endswith(".npz")  # second time: from the cache


def test_npz_reader_streams_and_explains_bad_files(tmp_path):
    imgs = _images(7, 7)
    np.savez_compressed(tmp_path / "c.npz", arr_0=imgs, labels=np.arange(7))
    r = E.NpzArrayReader(str(tmp_path / "c.npz"))
    assert r.shape == (7, 32, 32, 3) and len(r) == 7
    batches = list(r.batches(3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), imgs)
    assert sorted(E.npz_keys(str(tmp_path / "c.npz"))) == ["arr_0", "labels"]
    with pytest.raises(KeyError, match="arr_0"):
        E.NpzArrayReader(str(tmp_path / "c.npz"), "images")
    with pytest.raises(FileNotFoundError, match="samples_npz"):
        E.NpzArrayReader(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "f.npz", arr_0=imgs.astype(np.float32))
    config = base_config()
    config.eval.samples_npz = str(tmp_path / "f.npz")
    config.eval.reference_npz = str(tmp_path / "c.npz")
    config.eval.inception_weights = "/nonexistent/pt_inception.pth"
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        E.run(config, str(tmp_path / "w"))
    config.eval.inception_weights = ""
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        E.run(config, str(tmp_path / "w"))


def test_eval_job_checks_its_inputs_before_sampling(tmp_path, monkeypatch):
    def no_sampling(config, workdir):
        raise AssertionError("sampled before checking the eval config")

    monkeypatch.setattr(E, "_samples_from_checkpoint", no_sampling)
    config = base_config()
    config.eval.samples_npz = ""
    config.eval.reference_npz = ""
    with pytest.raises(ValueError, match="config.eval.reference_npz is empty"):
        E.run(config, str(tmp_path / "w"))
    config.eval.reference_npz = str(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    with pytest.raises(FileNotFoundError, match="config.eval.reference_npz=.*does not exist"):
        E.run(config, str(tmp_path / "w"))
    np.savez(tmp_path / "VIRTUAL_imagenet256_labeled.npz", arr_0=_images(4, 8))
    config.eval.inception_weights = ""
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        E.run(config, str(tmp_path / "w"))


def test_adm_network_names():
    assert E._is_adm_network("adm_tf_graph:abc")
    assert E._is_adm_network("fid_inception:pt_inception-2015-12-05:tf1:299")
    assert not E._is_adm_network("fid_inception:pt_inception-2015-12-05:pytorch_fid:299")
    assert not E._is_adm_network("fid_inception:pt_inception-2015-12-05:tf1:342")


def test_eval_job_samples_from_the_sample_job_when_no_npz(tmp_path, monkeypatch):
    import cca_jax.sampling as sampling_pkg

    monkeypatch.setitem(sys.modules, "cca_jax.sampling.job", None)  # not importable
    monkeypatch.delattr(sampling_pkg, "job", raising=False)
    config = base_config()
    with pytest.raises(RuntimeError, match="samples_npz"):
        E._samples_from_checkpoint(config, str(tmp_path))

    fake = types.ModuleType("cca_jax.sampling.job")

    def run(cfg, workdir):
        path = os.path.join(workdir, "samples.npz")
        os.makedirs(workdir, exist_ok=True)
        np.savez(path, arr_0=_images(4, 8))
        return path

    fake.run = run
    monkeypatch.setitem(sys.modules, "cca_jax.sampling.job", fake)
    monkeypatch.setattr(sampling_pkg, "job", fake, raising=False)
    assert E._samples_from_checkpoint(config, str(tmp_path)) == str(tmp_path / "samples.npz")
    fake.run = lambda cfg, workdir: None
    with pytest.raises(RuntimeError, match="not the path"):
        E._samples_from_checkpoint(config, str(tmp_path))


# ----------------------------------------------------------------------------- ADM's TF graph


def _tiny_adm_graph(path, w_conv, w_fc):
    """A frozen graph with the tensor names ADM's evaluator uses (ExpandDims → ResizeBilinear →
    Sub/Mul → mixed_6/conv (ReLU) → pool_3 → softmax/logits/MatMul)."""
    import tensorflow as tf

    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, None, None, 3], name="ExpandDims")
        y = tf.compat.v1.image.resize_bilinear(x, [9, 9], align_corners=False, name="ResizeBilinear")
        y = tf.multiply(tf.subtract(y, 128.0, name="Sub"), 1.0 / 128.0, name="Mul")
        conv = tf.nn.conv2d(y, tf.constant(w_conv), strides=1, padding="VALID", name="mixed_6/Conv2D")
        conv = tf.nn.relu(conv, name="mixed_6/conv")
        pool = tf.reduce_mean(conv, axis=[1, 2], keepdims=True, name="pool_3")
        flat = tf.reshape(pool, [-1, w_fc.shape[0]], name="pool_3/_reshape")
        tf.matmul(flat, tf.constant(w_fc), name="softmax/logits/MatMul")
    with open(path, "wb") as f:
        f.write(g.as_graph_def().SerializeToString())


def test_adm_tf_graph_feature_net(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    w_conv = rng.normal(size=(3, 3, 3, 10)).astype(np.float32)
    w_fc = rng.normal(size=(10, 6)).astype(np.float32)
    _tiny_adm_graph(tmp_path / "graph.pb", w_conv, w_fc)
    net = E.tf_graph_feature_net(str(tmp_path / "graph.pb"))
    imgs = _images(5, 1, size=12)
    out = E.extract_features(net, imgs, batch_size=2, progress=False)

    x = tf.compat.v1.image.resize_bilinear(imgs.astype(np.float32), [9, 9], align_corners=False)
    conv = tf.nn.relu(tf.nn.conv2d((x - 128.0) / 128.0, w_conv, 1, "VALID")).numpy()
    pool = conv.mean((1, 2))
    np.testing.assert_allclose(out["pool"], pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["spatial"], conv[..., :7].reshape(5, -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["logits"], pool @ w_fc, rtol=1e-5, atol=1e-5)  # no bias
    with pytest.raises(FileNotFoundError, match="tf_graph"):
        E.tf_graph_feature_net(str(tmp_path / "missing.pb"))
