"""Tokenize job end to end: ImageFolder / TFDS imagenet2012 (mocked) / digits → shards → reader."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from cca_jax.convert import vq16 as convert_vq16
import fixture_harness
from cca_jax.data import digits, preprocess, reader, sources, tokenize, tokenizers, writer
from cca_jax.models import vq16
from configs import tokenize_common

TINY = dict(codebook_size=64, codebook_embed_dim=4, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
            z_channels=8, ch=32)
SIZE = 16  # view side: 8x8 = 64 tokens with the tiny (downsample 2) tokenizer
WNIDS = ["n03000134", "n01440764", "n02102040"]  # sorted: n01440764 (0), n02102040 (1), n03000134 (2)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    cfg = vq16.VQ16Config(**TINY)
    params = vq16.init_params(cfg, jax.random.PRNGKey(0))
    path = tmp_path_factory.mktemp("ckpt") / "vq_tiny.pt"
    convert_vq16.save_official(params, cfg, path)
    return cfg, params, str(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet") / "train"
    g = np.random.default_rng(0)
    sizes = [(23, 31), (40, 29), (64, 48), (18, 18), (35, 52), (20, 44), (50, 21)]
    k = 0
    for w, wnid in enumerate(WNIDS):
        d = root / wnid
        d.mkdir(parents=True)
        for j in range(2 + (w == 1)):
            h, wd = sizes[k % len(sizes)]
            k += 1
            Image.fromarray(g.integers(0, 256, (h, wd, 3), dtype=np.uint8)).save(
                d / f"{wnid}_{j}.JPEG", quality=90)
        (d / "notes.txt").write_text("not an image")
    nested = root / WNIDS[0] / "extra"
    nested.mkdir()
    Image.fromarray(g.integers(0, 256, (30, 30), dtype=np.uint8)).convert("L").save(nested / "grey.jpeg")
    return str(root)


def _job_config(tokenizer_path, out, **tok):
    c = tokenize_common.tokenize_config(name="tiny", views="ten_crop", image_size=SIZE)
    c.tokenizer.family = "vq16"
    for k, v in TINY.items():
        c.tokenizer[k] = list(v) if isinstance(v, tuple) else v
    c.init.tokenizer_checkpoint = tokenizer_path
    c.data.path = out
    c.tokenize.update(images_per_shard=3, encode_batch_per_device=4, num_workers=2, progress=False)
    c.tokenize.update(**tok)
    return c


def _train_config(out, meta):
    import ml_collections
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"vocab_size": 64, "block_size": 64, "num_classes": 1000})
    c.tokenizer = ml_collections.ConfigDict({"family": "vq16"})
    c.train = ml_collections.ConfigDict({"global_batch_size": meta["num_records"]})
    c.data = ml_collections.ConfigDict({"source": "shards", "path": out, "shuffle_seed": 0,
                                        "views": "all", "on_bad_record": "error", "prefetch": 0,
                                        "tokenizer_checksum": meta["tokenizer"]["checksum"]})
    return c


def test_imagefolder_to_shards_to_batches(tiny_tokenizer, image_folder, tmp_path):
    cfg, params, ckpt = tiny_tokenizer
    src = sources.ImageFolderSource(image_folder)
    assert src.class_names == sorted(WNIDS) and src.num_images == 8
    assert [os.path.basename(p) for p in src.paths[:4]] == [
        "n01440764_0.JPEG", "n01440764_1.JPEG", "n01440764_2.JPEG", "n02102040_0.JPEG"]
    assert src.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert src.paths[-1].endswith(os.path.join("extra", "grey.jpeg"))  # sorted walk: subdir last

    out = str(tmp_path / "tokens")
    meta = tokenize.run(_job_config(ckpt, out, input_dir=image_folder), str(tmp_path / "work"))
    assert meta["num_images"] == 8 and meta["num_views"] == 10 and meta["num_records"] == 80
    assert meta["tokens_per_example"] == 64 and meta["token_dtype"] == "int16"
    assert meta["vocab_size"] == 64 and meta["resolution"] == SIZE and meta["patch_nums"] is None
    assert meta["tokenizer"]["family"] == "vq16" and meta["tokenizer"]["name"] == "llamagen_vq16"
    assert meta["tokenizer"]["checksum"] == vq16.params_checksum(params)
    assert len(meta["shards"]) == 3 and meta["preprocessing"]["crop_size"] == 17

    # direct encoding of the official views of every image
    views = preprocess.LlamaGenTenCrop(SIZE, 1.1)
    x = np.concatenate([views(preprocess.load_rgb(p), i) for i, p in enumerate(src.paths)])
    direct = np.asarray(vq16.encode(params, cfg, x)).reshape(8, 10, 64)

    # records in order (image-major, view-minor), each the encoding of its view, right label
    exs = reader.ShardStore(out).read(np.arange(80))
    for rid, e in enumerate(exs):
        i, v = divmod(rid, 10)
        assert (e["image_index"], e["view"], e["label"]) == (i, v, src.labels[i])
        np.testing.assert_array_equal(e["tokens"], direct[i, v])
    # the training reader serves exactly these (tokens, label) pairs
    it = reader.make_dataset(_train_config(out, meta), process_index=0, process_count=1)
    batch = next(it)
    assert batch["tokens"].shape == (80, 64) and batch["tokens"].dtype == np.int32
    got = sorted((t.tobytes(), int(lab)) for t, lab in zip(batch["tokens"], batch["labels"]))
    want = sorted((direct[i, v].astype(np.int32).tobytes(), int(src.labels[i]))
                  for i in range(8) for v in range(10))
    assert got == want
    # the stored tokens decode back to what the direct codes decode to
    stored = np.stack([e["tokens"] for e in exs[:5]]).astype(np.int32)
    dec = np.asarray(vq16.decode_code(params, cfg, stored))
    ref = np.asarray(vq16.decode_code(params, cfg, direct.reshape(80, 64)[:5]))
    assert dec.shape == (5, SIZE, SIZE, 3) and np.isfinite(dec).all() and np.array_equal(dec, ref)

    # resumable: a lost shard is rewritten identically, the others are left alone
    f1 = os.path.join(out, meta["shards"][1]["file"])
    before = open(f1, "rb").read()
    other = os.path.join(out, meta["shards"][0]["file"])
    mtime = os.stat(other).st_mtime_ns
    os.remove(f1)
    os.remove(os.path.join(out, writer.METADATA_FILE))
    meta2 = tokenize.run(_job_config(ckpt, out, input_dir=image_folder), str(tmp_path / "work"))
    assert open(f1, "rb").read() == before and os.stat(other).st_mtime_ns == mtime
    assert meta2["shards"] == meta["shards"]
    with pytest.raises(ValueError, match="different tokenize job"):
        tokenize.run(_job_config(ckpt, out, input_dir=image_folder, crop_range=1.05),
                     str(tmp_path / "work"))


def test_bad_image_is_named(tiny_tokenizer, tmp_path):
    *_, ckpt = tiny_tokenizer
    root = tmp_path / "train" / "n0"
    root.mkdir(parents=True)
    (root / "broken.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.JPEG"):
        tokenize.run(_job_config(ckpt, str(tmp_path / "o"), input_dir=str(tmp_path / "train")),
                     str(tmp_path))


def test_tfds_imagenet2012_mock_with_var_views(tiny_tokenizer, tmp_path):
    import tensorflow_datasets as tfds
    *_, ckpt = tiny_tokenizer
    out = str(tmp_path / "tokens")
    c = _job_config(ckpt, out, input="tfds", tfds_data_dir=str(tmp_path / "tfds"),
                    views="var_random_crops", num_views=2, crop_seed=3)
    with tfds.testing.mock_data(num_examples=5):
        src = sources.TfdsSource("imagenet2012", "train", str(tmp_path / "tfds"))
        assert src.num_images == 5 and src.num_classes == 1000
        expected = [(i, lab) for i, _, lab, _ in src.read_range(0, 5)]
        meta = tokenize.run(c, str(tmp_path / "work"))
    assert meta["num_images"] == 5 and meta["num_views"] == 2 and meta["num_classes"] == 1000
    assert meta["source"]["kind"] == "tfds" and meta["preprocessing"]["kind"] == "var_random_crops"
    store = reader.ShardStore(out)
    exs = store.read(np.arange(10))
    assert [(e["image_index"], e["view"]) for e in exs] == [(i, v) for i in range(5) for v in range(2)]
    assert [e["label"] for e in exs[::2]] == [lab for _, lab in expected]


class _PoolTokenizer:
    """Demo-style tokenizer: 4x4 mean pooling of the grey channel quantised to 16 levels."""

    vocab_size = 16
    name = "pool4"

    def encode(self, images):
        x = np.asarray(images)[..., 0]
        B, H, W = x.shape
        pooled = x.reshape(B, H // 4, 4, W // 4, 4).mean((2, 4))
        return np.clip(((pooled + 1) / 2 * 16).astype(np.int32), 0, 15).reshape(B, -1)


def test_digits_images_and_dataset(tmp_path):
    x8, y = digits.load_digits_images(8, channels=1)
    from sklearn.datasets import load_digits
    d = load_digits()
    assert x8.shape == (1797, 8, 8, 1) and np.array_equal(y, d.target)
    np.testing.assert_array_equal(x8[..., 0], d.images / 16 * 2 - 1)
    x16, _ = digits.load_digits_images(16)
    assert x16.shape == (1797, 16, 16, 3) and x16.min() >= -1 and x16.max() <= 1
    assert np.array_equal(x16[..., 0], x16[..., 2])
    # PyTorch bicubic upsampling: each 8x8 pixel's 2x2 block averages close to the original
    assert np.abs(x16[..., 0].reshape(-1, 8, 2, 8, 2).mean((2, 4)) - x8[..., 0]).mean() < 0.1

    out = str(tmp_path / "digits")
    meta = digits.write_digits_dataset(out, _PoolTokenizer(), size=16)
    assert meta["num_images"] == 1797 and meta["num_classes"] == 10
    assert meta["tokens_per_example"] == 16 and meta["tokenizer"]["name"] == "pool4"
    store = reader.ShardStore(out)
    rids = np.asarray([0, 5, 1796])
    ref = _PoolTokenizer().encode(x16[rids])
    for e, r, rid in zip(store.read(rids), ref, rids):
        assert e["image_index"] == rid and e["label"] == d.target[rid]
        np.testing.assert_array_equal(e["tokens"], r)


@pytest.mark.parity
@pytest.mark.parametrize("fx", fixture_harness.fixture_params("var_model"))
def test_vqvae_tokenizer_from_config_matches_official_indices(fx, tmp_path):
    """The VAR tokenizer plugged into the writer: scales concatenated like the official gt."""
    import ml_collections

    from cca_jax.convert import vqvae as convert_vqvae
    from cca_jax.models import vqvae
    args = {k: v for k, v in fx.meta["vqvae_args"].items() if k != "test_mode"}
    cfg = vqvae.VQVAEConfig.from_official_args(args)
    path = tmp_path / "vae.pth"
    convert_vqvae.save_official(convert_vqvae.from_state_dict(fx.state_dict("vae_sd/"), cfg), cfg, path)
    c = ml_collections.ConfigDict({"tokenizer": dict(args, family="vqvae"),
                                   "init": {"tokenizer_checkpoint": str(path)}})
    tok = tokenizers.make_tokenizer(c, image_size=cfg.image_size, batch_size=8)
    assert (tok.family, tok.vocab_size, tok.patch_nums) == ("vqvae", cfg.vocab_size, cfg.patch_nums)
    vae = fx.group("vae/")
    got = tok.encode(np.transpose(vae["img"], (0, 2, 3, 1)))
    assert got.shape == vae["idx_BL"].shape == (vae["img"].shape[0], cfg.L)
    np.testing.assert_array_equal(got, vae["idx_BL"])
    assert tokenizers.tokenizer_info(tok)["patch_nums"] == list(cfg.patch_nums)
