"""The sample job: ADM-format npz, label schemes, reproducibility and resume by chunks."""

import dataclasses
import re

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from etils import epath

from configs import common
from cca_jax import checkpoint
from cca_jax.models import llamagen as lg
from cca_jax.models import vq16
from cca_jax.sampling import job


def tiny_config(tmp_path):
    c = common.base_config()
    c.job = "sample"
    c.model.family = "llamagen"
    c.model.dim = 32
    c.model.n_layer = 1
    c.model.n_head = 2
    c.model.vocab_size = 16
    c.model.num_classes = 5
    c.model.block_size = 4  # 2x2 grid
    c.model.class_dropout_prob = 0.1
    c.tokenizer = vq16.default_config(codebook_size=16, codebook_embed_dim=4, z_channels=8,
                                      encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 1], ch=8,
                                      num_res_blocks=1, norm_groups=4, codebook_show_usage=False)
    c.sample.num_samples = 10
    c.sample.batch_size = 1  # x 8 devices -> chunks of 8
    c.sample.image_size_eval = 0
    c.sample.cfg_scale = 2.0
    c.mesh.data, c.mesh.fsdp = -1, 1
    cfg = lg.LlamaGenConfig.from_config(c.model)
    params = lg.init_params(cfg, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
    checkpoint.export_params(params, tmp_path / "params")
    c.sample.checkpoint = str(tmp_path / "params")
    tok_cfg = vq16.VQ16Config.from_config(c.tokenizer)
    tok = vq16.init_params(tok_cfg, jax.random.key(2))
    checkpoint.export_params(tok, tmp_path / "tok")
    return c, tok


def test_labels_schemes():
    b = job.sample_labels(50, 10, "balanced", 0)
    assert np.bincount(b, minlength=10).tolist() == [5] * 10
    assert not np.array_equal(b, np.sort(b))  # shuffled
    u = job.sample_labels(1000, 10, "uniform", 0)
    assert u.min() >= 0 and u.max() < 10 and len(np.unique(u)) == 10
    with pytest.raises(ValueError, match="config.sample.labels"):
        job.sample_labels(5, 2, "nope", 0)


def test_balanced_labels_spread_the_remainder():
    for n, c in ((1500, 1000), (100, 1000), (7, 3), (50000, 1000)):
        counts = np.bincount(job.sample_labels(n, c, "balanced", 1), minlength=c)
        assert counts.sum() == n and counts.max() - counts.min() <= 1, (n, c)
    # the classes that get one more are seeded, not always the low ids
    picks = {tuple(np.flatnonzero(np.bincount(job.sample_labels(100, 1000, "balanced", s),
                                              minlength=1000))) for s in range(3)}
    assert len(picks) == 3 and max(max(p) for p in picks) > 100


def test_params_fingerprint_sees_changed_weights():
    p = {"a": np.arange(10000, dtype=np.float32).reshape(100, 100), "b": np.ones(3, np.float32)}
    q = {"a": p["a"].copy(), "b": p["b"] + 1e-3}
    assert job.params_fingerprint(p) == job.params_fingerprint(jax.tree_util.tree_map(np.copy, p))
    assert job.params_fingerprint(p) != job.params_fingerprint(q)


def test_image_grid_shape():
    g = job.image_grid(np.ones((10, 4, 5, 3), np.uint8), cols=4)
    assert g.shape == (3 * 4, 4 * 5, 3)
    assert g[-4:, -5:].sum() == 0  # padding is black


def test_sample_job_writes_adm_npz_and_resumes(tmp_path):
    c, tok = tiny_config(tmp_path)
    workdir = epath.Path(tmp_path / "run")
    sampler = job.make_sampler(c, str(workdir), tokenizer_params=tok)
    labels = job.sample_labels(10, 5, "uniform", 0)
    out = workdir / "chunks"
    imgs = job.generate_samples(sampler, labels, out, seed=3, per_device_batch=1, progress=False)
    assert imgs.shape == (10, 4, 4, 3) and imgs.dtype == np.uint8
    chunks = sorted(out.glob("chunk_*.npz"))
    assert len(chunks) == 2  # ceil(10 / 8)
    # resume: remove one chunk, regenerate -> identical images (chunk k uses fold_in(seed, k))
    chunks[1].unlink()
    again = job.generate_samples(sampler, labels, out, seed=3, per_device_batch=1, progress=False)
    np.testing.assert_array_equal(again, imgs)
    other = job.generate_samples(sampler, labels, workdir / "other", seed=4, per_device_batch=1,
                                 progress=False)
    assert not np.array_equal(other, imgs)


def test_sample_job_run_end_to_end(tmp_path):
    c, tok = tiny_config(tmp_path)
    c.init.tokenizer_checkpoint = str(tmp_path / "tok")
    workdir = tmp_path / "run"
    path = job.run(c, str(workdir))
    with np.load(path) as z:
        assert z["arr_0"].shape == (10, 4, 4, 3) and z["arr_0"].dtype == np.uint8
        assert z["labels"].shape == (10,)
    assert (workdir / "samples" / "samples_10.png").exists()
    assert list((workdir / "tensorboard").glob("events.out.tfevents*"))


def test_samples_of_a_train_checkpoint_carry_its_step_to_the_eval_job(tmp_path):
    from cca_jax import evaluate
    c, tok = tiny_config(tmp_path)
    c.init.tokenizer_checkpoint = str(tmp_path / "tok")
    params = checkpoint.load_params(c.sample.checkpoint)
    c.sample.checkpoint = ""  # sample the newest train checkpoint of the workdir
    workdir = tmp_path / "run"
    with checkpoint.CheckpointManager(workdir) as mngr:
        mngr.save(12, {"step": 12, "params": params}, force=True)
    path = job.run(c, str(workdir))
    with np.load(path) as z:
        assert int(z[job.TRAIN_STEP_KEY]) == 12 and z["arr_0"].shape == (10, 4, 4, 3)
    assert evaluate._tensorboard_step(-1, path) == 12  # config.eval.step default: that step
    assert evaluate._tensorboard_step(5, path) == 5  # an explicit step wins
    plain = tmp_path / "plain.npz"
    np.savez(plain, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    assert evaluate._tensorboard_step(-1, str(plain)) == 0  # samples of another origin


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    c, _ = tiny_config(tmp_path)
    c.sample.checkpoint = ""
    with pytest.raises(ValueError, match="config.sample.checkpoint"):
        job.load_model_params(c, str(tmp_path / "empty"), job.families.from_config(c))


def test_resume_refuses_chunks_of_another_run(tmp_path):
    c, tok = tiny_config(tmp_path)
    sampler = job.make_sampler(c, str(tmp_path / "run"), tokenizer_params=tok)
    assert sampler.source == f"file {tmp_path / 'params'}"
    labels = job.sample_labels(10, 5, "uniform", 0)
    out = epath.Path(tmp_path / "chunks")
    settings = job.image_settings(c)
    job.generate_samples(sampler, labels, out, seed=3, per_device_batch=1, progress=False,
                         settings=settings)
    assert (out / job.MANIFEST).exists()
    with pytest.raises(ValueError, match="seed: 3 on disk, 4 now.*config.sample.name"):
        job.generate_samples(sampler, labels, out, seed=4, per_device_batch=1, progress=False,
                             settings=settings)
    c.sample.top_k = 2
    with pytest.raises(ValueError, match=r"settings.sample.top_k: 0 on disk, 2 now"):
        job.generate_samples(sampler, labels, out, seed=3, per_device_batch=1, progress=False,
                             settings=job.image_settings(c))
    with pytest.raises(ValueError, match="labels_sha256"):
        job.generate_samples(sampler, labels[::-1].copy(), out, seed=3, per_device_batch=1,
                             progress=False, settings=settings)
    retrained = dataclasses.replace(sampler, params=jax.tree_util.tree_map(lambda x: x * 1.01,
                                                                           sampler.params))
    with pytest.raises(ValueError, match="params_fingerprint"):
        job.generate_samples(retrained, labels, out, seed=3, per_device_batch=1, progress=False,
                             settings=settings)
    (out / job.MANIFEST).unlink()  # chunks nobody can vouch for
    with pytest.raises(ValueError, match="no run.json"):
        job.generate_samples(sampler, labels, out, seed=3, per_device_batch=1, progress=False,
                             settings=settings)


def test_resume_on_another_device_count_keeps_finished_images(tmp_path):
    c, tok = tiny_config(tmp_path)
    sampler = job.make_sampler(c, str(tmp_path / "run"), tokenizer_params=tok)
    labels = job.sample_labels(20, 5, "uniform", 0)
    out = epath.Path(tmp_path / "chunks")
    first = job.generate_samples(sampler, labels, out, seed=3, per_device_batch=1, progress=False)
    files = sorted(out.glob("chunk_*.npz"))
    assert [f.name for f in files] == [f"chunk_{i:08d}_p000.npz" for i in (0, 8, 16)]
    files[1].unlink()  # images 8..15 lost; resume with a global batch of 16 instead of 8
    again = job.generate_samples(sampler, labels, out, seed=3, per_device_batch=2, progress=False)
    keep = np.r_[0:8, 16:20]
    np.testing.assert_array_equal(again[keep], first[keep])
    assert again.shape == first.shape and len(list(out.glob("chunk_*.npz"))) == 3


def test_missing_images_are_an_error_not_black(tmp_path, monkeypatch):
    c, tok = tiny_config(tmp_path)
    sampler = job.make_sampler(c, str(tmp_path / "run"), tokenizer_params=tok)
    labels = job.sample_labels(10, 5, "uniform", 0)
    out = epath.Path(tmp_path / "chunks")
    job.generate_samples(sampler, labels, out, seed=3, per_device_batch=1, progress=False)
    sorted(out.glob("chunk_*.npz"))[0].unlink()
    # as on a multi-host run whose hosts do not share the workdir: the chunk seems done elsewhere
    monkeypatch.setattr(job, "_done_mask", lambda out_dir, n: np.ones(n, bool))
    with pytest.raises(RuntimeError, match="8 of 10 images are missing.*every host sees"):
        job.generate_samples(sampler, labels, out, seed=3, per_device_batch=1, progress=False)


def test_cache_block_len_setting_reaches_the_llamagen_sampler(tmp_path):
    c, tok = tiny_config(tmp_path)
    labels, rng = jnp.arange(4, dtype=jnp.int32), jax.random.key(7)
    images = {}
    for blk in (0, 2):  # one static cache; blocks of 2 slots (4 loops for the 4-token raster)
        c.sample.cache_block_len = blk
        s = job.make_sampler(c, str(tmp_path / "run"), tokenizer_params=tok)
        images[blk] = np.asarray(jax.jit(s.generate)(s.params, s.tokenizer_params, labels, rng))
        text = str(jax.make_jaxpr(s.generate)(s.params, s.tokenizer_params, labels, rng))
        assert ("f32[8,2,2,16]" in text) == (blk == 2)  # [2B, K, block, D] cache blocks
    np.testing.assert_array_equal(images[2], images[0])


def test_sample_dtype_reaches_the_llamagen_transformer_only(tmp_path):
    """config.sample.dtype (bf16 in the LlamaGen recipes, as the official FID sampler) runs the
    transformer in bf16; the VQ decoder stays float32 and the output uint8."""
    from configs import llamagen_common
    assert llamagen_common.cca_config("B", 256).sample.dtype == "bfloat16"
    c, tok = tiny_config(tmp_path)
    labels, rng = jnp.arange(4, dtype=jnp.int32), jax.random.key(7)
    c.sample.dtype = "bfloat16"
    s = job.make_sampler(c, str(tmp_path / "run"), tokenizer_params=tok)
    text = str(jax.make_jaxpr(s.generate)(s.params, s.tokenizer_params, labels, rng))
    assert re.search(r"bf16\[8,2,\d+,16\]", text)  # the [2B, K, slots, D] KV cache
    convs = re.findall(r"(\w+)\[[\d,]*\] = conv_general_dilated", text)
    assert convs and set(convs) == {"f32"}  # the VQ decoder
    img = np.asarray(jax.jit(s.generate)(s.params, s.tokenizer_params, labels, rng))
    assert img.dtype == np.uint8 and img.shape == (4, 4, 4, 3)
