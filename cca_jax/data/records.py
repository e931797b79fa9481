"""One token example ↔ one serialized ``tf.train.Example`` (TFDS's record format), without TF.

Every record of a token dataset is a ``tf.train.Example`` with the TFDS features of
:func:`tfds_features`:

=================  ==========================================================================
``tokens``         ``[L]`` token ids, stored as raw little-endian bytes (TFDS ``Tensor`` with
                   ``Encoding.BYTES``) of dtype int16 when the vocabulary fits (V ≤ 32767),
                   else int32. Raster order (LlamaGen) or the 10 scales concatenated (VAR).
``label``          class index (TFDS ``ClassLabel``, int64 on disk)
``view``           which augmentation of the image this is (0 .. num_views-1), int64 on disk
``image_index``    position of the source image in the input order (ImageFolder order or the
                   TFDS split order), int64 on disk
=================  ==========================================================================

The ``tf.train.Example`` message classes are built here from a hand-written protobuf descriptor
(protobuf's C parser, ~10 µs per record), so the input pipeline never imports TensorFlow;
``tests/test_data_records.py`` checks the bytes against ``tf.train.Example`` and TFDS.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

INT_FEATURES = ("label", "view", "image_index")
TOKENS = "tokens"


class RecordDecodeError(ValueError):
    """A record's bytes are not a valid token example."""


def token_dtype(vocab_size: int) -> np.dtype:
    """int16 when every id fits (V ≤ 32767), else int32."""
    return np.dtype(np.int16) if vocab_size <= np.iinfo(np.int16).max else np.dtype(np.int32)


def tfds_features(tokens_per_example: int, vocab_size: int, num_classes: int):
    """The ``tfds.features.FeaturesDict`` describing the records (used for TFDS metadata)."""
    import tensorflow_datasets as tfds
    f = tfds.features
    return f.FeaturesDict({
        TOKENS: f.Tensor(shape=(tokens_per_example,), dtype=token_dtype(vocab_size),
                         encoding=f.Encoding.BYTES),
        "label": f.ClassLabel(num_classes=num_classes),
        "view": f.Scalar(dtype=np.int64),
        "image_index": f.Scalar(dtype=np.int64),
    })


# ------------------------------------------------------------------------------------------
# ``tf.train.Example`` message classes built from a hand-written descriptor (same field numbers
# and types as tensorflow/core/example/{example,feature}.proto), parsed by protobuf's C backend.

def _build_example_class():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    T = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="cca_jax/example.proto", package="cca_jax.tf",
                                             syntax="proto3")

    def add_list(name, typ):
        f = fdp.message_type.add(name=name).field.add(name="value", number=1, type=typ,
                                                       label=T.LABEL_REPEATED)
        if typ != T.TYPE_BYTES:
            f.options.packed = True
    add_list("BytesList", T.TYPE_BYTES)
    add_list("FloatList", T.TYPE_FLOAT)
    add_list("Int64List", T.TYPE_INT64)
    feature = fdp.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for name, num, typ in (("bytes_list", 1, "BytesList"), ("float_list", 2, "FloatList"),
                           ("int64_list", 3, "Int64List")):
        feature.field.add(name=name, number=num, type=T.TYPE_MESSAGE, type_name=f".cca_jax.tf.{typ}",
                          label=T.LABEL_OPTIONAL, oneof_index=0)
    features = fdp.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=T.TYPE_MESSAGE, type_name=".cca_jax.tf.Feature",
                    label=T.LABEL_OPTIONAL)
    features.field.add(name="feature", number=1, type=T.TYPE_MESSAGE, label=T.LABEL_REPEATED,
                       type_name=".cca_jax.tf.Features.FeatureEntry")
    fdp.message_type.add(name="Example").field.add(
        name="features", number=1, type=T.TYPE_MESSAGE, type_name=".cca_jax.tf.Features",
        label=T.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("cca_jax.tf.Example"))


Example = _build_example_class()


def encode_example(tokens: np.ndarray, label: int, view: int, image_index: int,
                   dtype: np.dtype | None = None) -> bytes:
    """Serializes one example; ``tokens`` ``[L]`` are cast to ``dtype`` (little-endian)."""
    t = np.asarray(tokens)
    if dtype is not None:
        t = t.astype(np.dtype(dtype).newbyteorder("<"), copy=False)
    ex = Example()
    f = ex.features.feature
    f[TOKENS].bytes_list.value.append(np.ascontiguousarray(t).tobytes())
    for k, v in (("label", label), ("view", view), ("image_index", image_index)):
        f[k].int64_list.value.append(int(v))
    return ex.SerializeToString(deterministic=True)


def decode_example(record: bytes, dtype: np.dtype | str, num_tokens: int | None = None) -> dict:
    """Parses one record → ``{"tokens": [L] array, "label": int, "view": int, "image_index": int}``.

    Raises :class:`RecordDecodeError` when the bytes are not a token example (malformed protobuf,
    missing feature, wrong token byte count).
    """
    dtype = np.dtype(dtype).newbyteorder("<")
    try:
        feats = Example.FromString(record).features.feature
    except Exception as e:  # google.protobuf.message.DecodeError
        raise RecordDecodeError(f"not a tf.train.Example ({e})") from None
    missing = [k for k in (TOKENS, *INT_FEATURES) if k not in feats]
    if missing:
        raise RecordDecodeError(f"missing feature(s) {missing}; found {sorted(feats)}")
    raw = feats[TOKENS].bytes_list.value
    if len(raw) != 1 or len(raw[0]) % dtype.itemsize:
        raise RecordDecodeError(f"'tokens' should be one byte string of {dtype} ids, got "
                                f"{len(raw)} value(s) of {[len(r) for r in raw][:3]} bytes")
    tokens = np.frombuffer(raw[0], dtype=dtype)
    if num_tokens is not None and tokens.shape[0] != num_tokens:
        raise RecordDecodeError(f"'tokens' has {tokens.shape[0]} ids, the dataset declares {num_tokens}")
    res = {TOKENS: tokens}
    for k in INT_FEATURES:
        vals = feats[k].int64_list.value
        if len(vals) != 1:
            raise RecordDecodeError(f"feature {k!r} should hold one int64, got {list(vals)[:4]}")
        res[k] = int(vals[0])
    return res


def example_dict(tokens, label, view, image_index) -> Mapping:
    """The same example as TFDS ``encode_example`` expects it (for cross-checks)."""
    return {TOKENS: np.asarray(tokens), "label": int(label), "view": int(view),
            "image_index": int(image_index)}
