"""Record format: tf.train.Example bytes compatible with TensorFlow and TFDS, strict decoding."""

import numpy as np
import pytest

from cca_jax.data import records, testing


def test_round_trip_and_dtypes():
    t = np.arange(576) * 28 % 16384
    b = records.encode_example(t, 999, 9, 1281166, records.token_dtype(16384))
    d = records.decode_example(b, np.int16, 576)
    assert d["tokens"].dtype == np.int16 and np.array_equal(d["tokens"], t)
    assert (d["label"], d["view"], d["image_index"]) == (999, 9, 1281166)
    assert records.token_dtype(32767) == np.int16 and records.token_dtype(32768) == np.int32
    big = np.asarray([0, 40000, 70000])
    d = records.decode_example(records.encode_example(big, 1, 0, 0, np.int32), np.int32)
    assert np.array_equal(d["tokens"], big)


def test_bytes_are_a_tf_example_and_match_tfds_serialization():
    import tensorflow as tf
    t = np.asarray([5, 300, 16383, 0], np.int16)
    b = records.encode_example(t, 7, 3, 42, np.int16)
    ex = tf.train.Example.FromString(b)
    f = ex.features.feature
    assert np.frombuffer(f["tokens"].bytes_list.value[0], "<i2").tolist() == t.tolist()
    assert f["label"].int64_list.value[:] == [7] and f["view"].int64_list.value[:] == [3]
    assert f["image_index"].int64_list.value[:] == [42]
    feats = records.tfds_features(4, 16384, 10)
    tfds_bytes = feats.serialize_example(records.example_dict(t, 7, 3, 42))
    assert tf.train.Example.FromString(tfds_bytes) == ex
    d = records.decode_example(tfds_bytes, np.int16, 4)
    assert d["tokens"].tolist() == t.tolist() and d["label"] == 7


def test_dataset_dir_is_readable_by_tfds(tmp_path):
    import tensorflow_datasets as tfds
    tokens = np.random.default_rng(0).integers(0, 100, (6, 2, 5))
    labels = np.arange(6) % 4
    testing.write_token_dataset(str(tmp_path), tokens, labels, vocab_size=100, num_classes=4,
                                images_per_shard=4)
    builder = tfds.builder_from_directory(str(tmp_path))
    assert builder.info.splits["train"].num_examples == 12
    src = builder.as_data_source("train")
    for rid in (0, 7, 11):
        i, v = divmod(rid, 2)
        ex = src[rid]
        assert ex["tokens"].tolist() == tokens[i, v].tolist()
        assert (ex["label"], ex["view"], ex["image_index"]) == (labels[i], v, i)


@pytest.mark.parametrize("bad, match", [
    (b"\xff\xff\xff", "not a tf.train.Example"),
    (records.Example().SerializeToString(), "missing feature"),
])
def test_decode_errors(bad, match):
    with pytest.raises(records.RecordDecodeError, match=match):
        records.decode_example(bad, np.int16)


def test_decode_rejects_wrong_token_count_and_odd_bytes():
    b = records.encode_example(np.arange(4), 1, 0, 0, np.int16)
    with pytest.raises(records.RecordDecodeError, match="has 4 ids, the dataset declares 5"):
        records.decode_example(b, np.int16, 5)
    ex = records.Example.FromString(b)
    ex.features.feature["tokens"].bytes_list.value[0] = b"\x01\x02\x03"
    with pytest.raises(records.RecordDecodeError, match="byte string"):
        records.decode_example(ex.SerializeToString(), np.int16)
    ex = records.Example.FromString(b)
    ex.features.feature["label"].int64_list.value.append(3)
    with pytest.raises(records.RecordDecodeError, match="'label' should hold one int64"):
        records.decode_example(ex.SerializeToString(), np.int16)
