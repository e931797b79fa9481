"""Token shard reader: disjoint per-process slices, exact resume, metadata and bad-data checks."""

import os
import time

import ml_collections
import numpy as np
import pytest

from cca_jax.data import reader, testing, writer

N, V, L, VOCAB, CLASSES = 37, 3, 6, 300, 7


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tokens"))
    meta, tokens, labels = testing.random_token_dataset(
        path, num_images=N, num_views=V, tokens_per_example=L, vocab_size=VOCAB,
        num_classes=CLASSES, images_per_shard=8, seed=3)
    return path, meta, tokens, labels


def _config(path, **data):
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"vocab_size": VOCAB, "block_size": L, "num_classes": CLASSES})
    c.tokenizer = ml_collections.ConfigDict({"family": "array"})
    c.train = ml_collections.ConfigDict({"global_batch_size": 12})
    c.data = ml_collections.ConfigDict({
        "source": "shards", "path": path, "shuffle_seed": 5, "synthetic_size": 64,
        "on_bad_record": "error", "views": "random", "prefetch": 2, "tokenizer_checksum": ""})
    for k, v in data.items():
        c.data[k] = v
    return c


def _lookup(tokens, labels):
    """tokens bytes -> (image, view, label) of the written dataset."""
    return {tokens[i, v].astype(np.int32).tobytes(): (i, v, int(labels[i]))
            for i in range(tokens.shape[0]) for v in range(tokens.shape[1])}


def test_metadata_and_layout(dataset):
    path, meta, tokens, labels = dataset
    assert meta["num_images"] == N and meta["num_views"] == V and meta["num_records"] == N * V
    assert meta["tokens_per_example"] == L and meta["token_dtype"] == "int16"
    assert [s["num_records"] for s in meta["shards"]] == [24, 24, 24, 24, 15]
    store = reader.ShardStore(path)
    ex = store.read(np.asarray([0, 5, 3 * 17 + 2]))
    for rid, e in zip([0, 5, 53], ex):
        i, v = divmod(rid, V)
        assert (e["image_index"], e["view"], e["label"]) == (i, v, labels[i])
        np.testing.assert_array_equal(e["tokens"], tokens[i, v])
    assert store.locate(53) == (os.path.join(path, meta["shards"][2]["file"]), 5)


def test_processes_read_disjoint_slices_whose_union_is_each_epoch(dataset):
    path, _, tokens, labels = dataset
    look = _lookup(tokens, labels)
    gb, P = 12, 3
    cfg = _config(path)
    its = [reader.make_dataset(cfg, process_index=p, process_count=P, global_batch_size=gb)
           for p in range(P)]
    assert its[0].epoch_size == N and its[0].steps_per_epoch() == N / gb
    per_process = [[] for _ in range(P)]
    for _ in range(9):  # 108 examples: two full epochs of 37 images and more
        for p, it in enumerate(its):
            b = next(it)
            assert b["tokens"].shape == (gb // P, L) and b["tokens"].dtype == np.int32
            assert b["labels"].dtype == np.int32
            for t, lab in zip(b["tokens"], b["labels"]):
                i, v, true_label = look[t.tobytes()]
                assert lab == true_label
                per_process[p].append(i)
    # the global stream is batch k = rows of process 0, 1, 2 in turn
    glob = [i for k in range(9) for p in range(P) for i in per_process[p][k * 4:(k + 1) * 4]]
    epoch0, epoch1 = glob[:N], glob[N:2 * N]
    assert sorted(epoch0) == list(range(N)) and sorted(epoch1) == list(range(N))
    assert epoch0 != epoch1  # reshuffled every epoch
    # within an epoch the processes' images are disjoint and together are the dataset
    owner = {}
    for p in range(P):
        for pos_in_proc, i in enumerate(per_process[p]):
            k, r = divmod(pos_in_proc, 4)
            pos = k * gb + p * 4 + r
            if pos < N:
                assert i not in owner
                owner[i] = p
    assert sorted(owner) == list(range(N)) and set(owner.values()) == set(range(P))


def test_global_order_is_independent_of_process_count(dataset):
    path, *_ = dataset
    cfg = _config(path)
    one = reader.make_dataset(cfg, process_index=0, process_count=1, global_batch_size=12)
    full = [next(one) for _ in range(4)]
    for P in (2, 4):
        its = [reader.make_dataset(cfg, process_index=p, process_count=P, global_batch_size=12)
               for p in range(P)]
        for k in range(4):
            got = np.concatenate([next(it)["tokens"] for it in its])
            np.testing.assert_array_equal(got, full[k]["tokens"])


def test_resume_yields_the_same_stream_also_with_another_process_count(dataset):
    path, *_ = dataset
    cfg = _config(path)
    it = reader.make_dataset(cfg, process_index=0, process_count=1, global_batch_size=12)
    for _ in range(3):
        next(it)
    state = it.get_state()
    import json
    state = json.loads(json.dumps(state))  # what a checkpoint stores
    expected = [next(it) for _ in range(5)]
    again = reader.make_dataset(cfg, process_index=0, process_count=1, global_batch_size=12)
    again.set_state(state)
    for e in expected:
        b = next(again)
        np.testing.assert_array_equal(b["tokens"], e["tokens"])
        np.testing.assert_array_equal(b["labels"], e["labels"])
    # two processes, each restored from the single-process state, continue the same global stream
    halves = [reader.make_dataset(cfg, process_index=p, process_count=2, global_batch_size=12)
              for p in range(2)]
    for h in halves:
        h.restore(state)
    for e in expected:
        np.testing.assert_array_equal(np.concatenate([next(h)["tokens"] for h in halves]), e["tokens"])
    # a smaller global batch continues from the same example
    small = reader.make_dataset(cfg, process_index=0, process_count=1, global_batch_size=6)
    small.set_state(state)
    np.testing.assert_array_equal(np.concatenate([next(small)["tokens"] for _ in range(2)]),
                                  expected[0]["tokens"])
    with pytest.raises(ValueError, match="seed"):
        reader.make_dataset(_config(path, shuffle_seed=6), process_index=0, process_count=1,
                            global_batch_size=12).set_state(state)


def test_seeds_views_and_all_mode(dataset):
    path, _, tokens, labels = dataset
    look = _lookup(tokens, labels)
    a = next(reader.make_dataset(_config(path), process_index=0, process_count=1, global_batch_size=12))
    b = next(reader.make_dataset(_config(path, shuffle_seed=9), process_index=0, process_count=1,
                                 global_batch_size=12))
    assert not np.array_equal(a["tokens"], b["tokens"])
    it = reader.make_dataset(_config(path, prefetch=0), process_index=0, process_count=1,
                             global_batch_size=N)
    views = [look[t.tobytes()][1] for _ in range(6) for t in next(it)["tokens"]]
    assert set(views) == set(range(V))  # random views cover all augmentations
    every = reader.make_dataset(_config(path, views="all"), process_index=0, process_count=1,
                                global_batch_size=N * V)
    assert every.epoch_size == N * V
    recs = sorted(look[t.tobytes()][:2] for t in next(every)["tokens"])
    assert recs == [(i, v) for i in range(N) for v in range(V)]


def test_metadata_mismatch_names_both_values(dataset):
    path, *_ = dataset
    cfg = _config(path)
    cfg.model.vocab_size = 16384
    with pytest.raises(reader.MetadataMismatchError, match=r"vocab_size: dataset has 300.*config has 16384"):
        reader.make_dataset(cfg, process_index=0, process_count=1, global_batch_size=12)
    cfg = _config(path)
    cfg.model.block_size = 576
    with pytest.raises(reader.MetadataMismatchError, match=r"tokens per example: dataset has 6.*576.*block_size"):
        reader.make_dataset(cfg, process_index=0, process_count=1, global_batch_size=12)
    cfg = _config(path)
    cfg.model.patch_nums = (1, 2)
    with pytest.raises(reader.MetadataMismatchError, match=r"patch_nums: dataset has None.*\[1, 2\]"):
        reader.make_dataset(cfg, process_index=0, process_count=1, global_batch_size=12)
    cfg = _config(path)
    cfg.tokenizer.family = "vq16"
    with pytest.raises(reader.MetadataMismatchError, match=r"tokenizer family: dataset has 'array'.*'vq16'"):
        reader.make_dataset(cfg, process_index=0, process_count=1, global_batch_size=12)
    cfg = _config(path, tokenizer_checksum="abc")
    with pytest.raises(reader.MetadataMismatchError, match="checksum: dataset has 'array-v1'.*'abc'"):
        reader.make_dataset(cfg, process_index=0, process_count=1, global_batch_size=12)
    with pytest.raises(FileNotFoundError, match="token_dataset.json"):
        reader.make_dataset(_config(path + "/nope"), process_index=0, process_count=1, global_batch_size=12)


def _copy(path, dst):
    import shutil
    shutil.copytree(path, dst)
    return str(dst)


def test_bad_tokens_and_labels_name_file_and_record(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50, (10, 1, 4))
    tokens[7, 0, 2] = 60  # >= vocab of the model below
    labels = np.arange(10) % 3
    labels[4] = 5  # outside [0, 3) of the model below
    p = str(tmp_path / "d")
    testing.write_token_dataset(p, tokens, labels, vocab_size=100, num_classes=6, images_per_shard=4)
    # the metadata declares vocab 100 / 6 classes; the reader is told the model's 50 / 3
    def make(mode):
        return reader.TokenIterator(reader.ShardStore(p), global_batch_size=10, rows=np.arange(10),
                                    vocab_size=50, num_classes=3, on_bad_record=mode, shuffle=False,
                                    prefetch=0)
    it = make("error")
    with pytest.raises(reader.BadDataError) as e:
        next(it)
    msg = str(e.value)
    assert "toy-train.array_record-0000" in msg and ("token 60" in msg or "label 5" in msg)
    assert "label 5" in msg and "Record 0 of shard" in msg and "00001-of" in msg  # image 4 first
    it = make("skip")
    b = next(it)
    assert it.stats["skipped"] == 2 and "skipped" not in it.get_state()
    assert b["tokens"].max() < 50 and b["labels"].max() < 3 and b["tokens"].shape == (10, 4)


def test_skip_count_covers_only_the_batches_handed_out(dataset, tmp_path):
    """With a read-ahead thread that has already read the next epoch's batch (which holds the
    truncated shard's records again), ``stats["skipped"]`` still counts the first batch only."""
    path, meta, *_ = dataset
    trunc = _copy(path, tmp_path / "trunc")
    f = os.path.join(trunc, meta["shards"][1]["file"])
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    it = reader.make_dataset(_config(trunc, views="all", on_bad_record="skip", prefetch=2),
                             process_index=0, process_count=1, global_batch_size=N * V)
    next(it)
    deadline = time.monotonic() + 30
    while not it._queue.full() and time.monotonic() < deadline:  # the thread reads two ahead
        time.sleep(0.01)
    assert it._queue.full()
    assert it.stats["skipped"] == meta["shards"][1]["num_records"]
    next(it)
    assert it.stats["skipped"] == 2 * meta["shards"][1]["num_records"]
    it.close()


def test_truncated_and_corrupt_shards(dataset, tmp_path):
    path, meta, *_ = dataset
    trunc = _copy(path, tmp_path / "trunc")
    f = os.path.join(trunc, meta["shards"][1]["file"])
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    cfg = _config(trunc, views="all", prefetch=0)
    it = reader.make_dataset(cfg, process_index=0, process_count=1, global_batch_size=N * V)
    with pytest.raises(reader.BadDataError, match=meta["shards"][1]["file"]):
        next(it)
    skip = reader.make_dataset(_config(trunc, views="all", on_bad_record="skip"),
                               process_index=0, process_count=1, global_batch_size=N * V)
    next(skip)
    assert skip.stats["skipped"] == meta["shards"][1]["num_records"]

    corrupt = _copy(path, tmp_path / "corrupt")
    f = os.path.join(corrupt, meta["shards"][0]["file"])
    data = bytearray(open(f, "rb").read())
    pos = data.find(b"image_index")  # inside the first record's payload
    data[pos - 30:pos + 10] = b"\xff" * 40
    open(f, "wb").write(bytes(data))
    it = reader.make_dataset(_config(corrupt, views="all"), process_index=0, process_count=1,
                             global_batch_size=N * V)
    with pytest.raises(reader.BadDataError, match=rf"record \d+ of shard .*{meta['shards'][0]['file']}"):
        next(it)

    extra = _copy(path, tmp_path / "extra")
    testing.write_token_dataset(str(tmp_path / "other"), np.zeros((3, 1, L)), np.zeros(3, int),
                                vocab_size=VOCAB, num_classes=CLASSES, images_per_shard=3)
    import shutil
    shutil.copy(os.path.join(tmp_path / "other", "toy-train.array_record-00000-of-00001"),
                os.path.join(extra, meta["shards"][4]["file"]))
    store = reader.ShardStore(extra)
    out = store.read(np.asarray([N * V - 1]))
    assert isinstance(out[0], reader.BadDataError) and "has 3 records" in str(out[0])

    gone = _copy(path, tmp_path / "gone")  # a missing shard stops the start, also in skip mode
    os.remove(os.path.join(gone, meta["shards"][2]["file"]))
    with pytest.raises(reader.BadDataError, match=rf"1 of the {len(meta['shards'])} shards .*missing"):
        reader.make_dataset(_config(gone, views="all", on_bad_record="skip"), process_index=0,
                            process_count=1, global_batch_size=N * V)


def test_make_global_batch_on_eight_devices(dataset):
    path, *_ = dataset
    from cca_jax import sharding
    mesh = sharding.make_mesh()
    assert mesh.devices.size == 8
    gb = 16
    rows = reader.rows_for_sharding(sharding.batch_sharding(mesh, 1), gb)
    np.testing.assert_array_equal(rows, np.arange(gb))  # one process holds every row here
    np.testing.assert_array_equal(reader.rows_for_sharding(sharding.batch_sharding(mesh, 2), gb), rows)
    it = reader.make_dataset(_config(path), process_index=0, process_count=1, global_batch_size=gb,
                             rows=rows)
    local = next(it)
    g = reader.make_global_batch(local, mesh, gb)
    assert g["tokens"].shape == (gb, L) and g["labels"].shape == (gb,)
    assert len(g["tokens"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(g["tokens"]), local["tokens"])
    g2 = reader.make_global_batch(local, sharding.batch_sharding(mesh, 2), gb)
    np.testing.assert_array_equal(np.asarray(g2["labels"]), local["labels"])


def test_synthetic_source_and_train_entry_point(dataset):
    path, *_ = dataset
    cfg = _config(path, source="synthetic", synthetic_size=20)
    cfg.model = ml_collections.ConfigDict({"vocab_size": 64, "patch_nums": (1, 2, 3), "num_classes": 10})
    cfg.tokenizer.family = "vqvae"
    a = reader.make_dataset(cfg, process_index=0, process_count=2, global_batch_size=8)
    b = reader.make_dataset(cfg, process_index=1, process_count=2, global_batch_size=8)
    x, y = next(a), next(b)
    assert x["tokens"].shape == y["tokens"].shape == (4, 14) and x["tokens"].max() < 64 and x["labels"].max() < 10
    assert a.epoch_size == 20
    st = a.get_state()
    x2 = next(a)
    a.set_state(st)
    np.testing.assert_array_equal(next(a)["tokens"], x2["tokens"])
    cfg2 = _config(path)
    it = reader.make_train_iterator(cfg2, rows=slice(0, 12))
    assert it.num_examples == N and next(it)["tokens"].shape == (12, L)
    it.restore(None)
    assert it.state()["position"] == 12


def test_writer_refuses_a_different_job_and_skips_finished_shards(tmp_path):
    p = str(tmp_path / "d")
    tokens = np.arange(5 * 1 * 3).reshape(5, 1, 3)
    testing.write_token_dataset(p, tokens, np.zeros(5, int), vocab_size=100, num_classes=2,
                                images_per_shard=2)
    files = sorted(f for f in os.listdir(p) if ".array_record-" in f)
    mtimes = {f: os.stat(os.path.join(p, f)).st_mtime_ns for f in files}
    os.remove(os.path.join(p, files[1]))
    os.remove(os.path.join(p, writer.METADATA_FILE))
    testing.write_token_dataset(p, tokens, np.zeros(5, int), vocab_size=100, num_classes=2,
                                images_per_shard=2)
    for f in files:
        if f != files[1]:
            assert os.stat(os.path.join(p, f)).st_mtime_ns == mtimes[f], f
    assert os.path.exists(os.path.join(p, files[1]))
    assert not [f for f in os.listdir(p) if ".tmp" in f]
    with pytest.raises(ValueError, match="different tokenize job"):
        testing.write_token_dataset(p, tokens, np.zeros(5, int), vocab_size=100, num_classes=2,
                                    images_per_shard=3)


def test_simulated_processes_write_disjoint_shards(tmp_path):
    p = str(tmp_path / "d")
    tokens = np.arange(7 * 2 * 3).reshape(7, 2, 3)
    labels = np.arange(7) % 2
    kw = dict(vocab_size=100, num_classes=2, images_per_shard=2, process_count=2)
    assert testing.write_token_dataset(p, tokens, labels, process_index=1, **kw) is None
    written = sorted(f for f in os.listdir(p) if ".array_record-" in f)
    assert written == ["toy-train.array_record-00001-of-00004", "toy-train.array_record-00003-of-00004"]
    meta = testing.write_token_dataset(p, tokens, labels, process_index=0, **kw)
    assert meta["num_records"] == 14 and len(meta["shards"]) == 4
    store = reader.ShardStore(p)
    exs = store.read(np.arange(14))
    assert [e["tokens"].tolist() for e in exs] == tokens.reshape(14, 3).tolist()


def _second_crop_set(tmp_path, labels, seed=11, **kw):
    """Another crop set of the dataset's images: the same labels, other tokens."""
    path = str(tmp_path / "crop_105")
    g = np.random.default_rng(seed)
    n = kw.pop("num_images", N)
    tokens = g.integers(0, VOCAB, (n, V, L))
    testing.write_token_dataset(path, tokens, labels[:n], vocab_size=VOCAB, num_classes=CLASSES,
                                images_per_shard=kw.pop("images_per_shard", 16), **kw)
    return path, tokens


def test_crop_set_mix_draws_each_set_half_the_time_with_the_image_label(dataset, tmp_path):
    path, _, tokens_a, labels = dataset
    path_b, tokens_b = _second_crop_set(tmp_path, labels)
    look_a, look_b = _lookup(tokens_a, labels), _lookup(tokens_b, labels)
    it = reader.make_dataset(_config(path, mix_paths=f" {path_b} ,"), prefetch=0)
    assert isinstance(it.store, reader.CropSetMix)
    assert it.store.num_views == 2 * V and it.epoch_size == N
    from_b, images = 0, []
    for _ in range(60):  # 720 examples, about 19 epochs
        b = next(it)
        for t, lab in zip(b["tokens"], b["labels"]):
            key = t.tobytes()
            i, v, true_label = look_b[key] if key in look_b else look_a[key]
            from_b += key in look_b
            assert lab == true_label
            images.append(i)
    assert sorted(images[:N]) == list(range(N))  # still every image once per epoch
    assert 0.4 < from_b / 720 < 0.6  # binomial(720, 1/2): 5 sd either side
    # views="all": every record of both sets once per epoch
    it_all = reader.make_dataset(_config(path, mix_paths=path_b, views="all"), prefetch=0,
                                 global_batch_size=2 * N * V, rows=np.arange(2 * N * V))
    seen = sorted((key in look_b,) + (look_b[key] if key in look_b else look_a[key])[:2]
                  for key in (t.tobytes() for t in next(it_all)["tokens"]))
    assert seen == sorted((s, i, v) for s in (False, True) for i in range(N) for v in range(V))
    # record ids of the mix map to the right set's shard and record
    rid = 5 * 2 * V + V + 2  # image 5, set b, view 2
    f, li = it.store.locate(rid)
    assert f.startswith(path_b) and li == 5 * V + 2
    # a saved state of the mixed stream does not restore onto one crop set
    plain = reader.make_dataset(_config(path), prefetch=0)
    with pytest.raises(ValueError, match="num_records"):
        plain.set_state(it.get_state())


def test_crop_set_mix_refuses_other_images(dataset, tmp_path):
    path, _, _, labels = dataset
    fewer, _ = _second_crop_set(tmp_path, labels, num_images=N - 1)
    with pytest.raises(reader.MetadataMismatchError, match="num_images"):
        reader.make_dataset(_config(path, mix_paths=fewer), prefetch=0)
    other_tmp = tmp_path / "other"
    other_tmp.mkdir()
    renamed, _ = _second_crop_set(other_tmp, labels, name="other_images")
    with pytest.raises(reader.MetadataMismatchError, match="source"):
        reader.make_dataset(_config(path, mix_paths=renamed), prefetch=0)
    with pytest.raises(FileNotFoundError, match="config.data.mix_paths"):
        reader.make_dataset(_config(path, mix_paths=str(tmp_path / "missing")), prefetch=0)
