"""Small token datasets for tests and benchmarks, written through the real shard writer.

The "images" are the tokens themselves (``[V, 1, L, 1]`` float arrays per image) and
:class:`ArrayTokenizer` hands them back as ids, so every byte goes through ``writer.py`` exactly
as a tokenized ImageNet would, in milliseconds.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cca_jax.data import sources, writer


class ArrayTokenizer:
    """``encode(x [B, 1, L, 1]) -> x`` as int32 ids."""

    def __init__(self, vocab_size: int, family: str = "array", name: str = "array",
                 patch_nums: Sequence[int] | None = None, checksum: str = "array-v1"):
        self.vocab_size, self.family, self.name = int(vocab_size), family, name
        self.patch_nums = None if patch_nums is None else tuple(patch_nums)
        self._checksum = checksum

    def checksum(self) -> str:
        return self._checksum

    def encode(self, images):
        x = np.asarray(images)
        return np.rint(x.reshape(x.shape[0], -1)).astype(np.int32)


class TokenViews:
    """The per-image ``[V, L]`` token array as ``V`` one-row "images"."""

    def __init__(self, num_views: int):
        self.num_views = int(num_views)
        self.image_size = 0

    def __call__(self, tokens_VL, index: int = 0):
        t = np.asarray(tokens_VL, np.float32)
        return t.reshape(t.shape[0], 1, t.shape[1], 1)

    def describe(self) -> dict:
        return {"kind": "tokens", "image_size": 0}


def write_token_dataset(path: str, tokens_NVL: np.ndarray, labels: np.ndarray, *, vocab_size: int,
                        num_classes: int, images_per_shard: int = 16, name: str = "toy",
                        family: str = "array", patch_nums: Sequence[int] | None = None,
                        process_index: int = 0, process_count: int = 1) -> dict:
    """Writes ``tokens [N, V, L]`` / ``labels [N]`` as a token dataset; returns its metadata."""
    tokens_NVL = np.asarray(tokens_NVL)
    src = sources.ArraySource(list(tokens_NVL), labels, num_classes, name=name)
    return writer.write_dataset(
        path, source=src, views=TokenViews(tokens_NVL.shape[1]),
        tokenizer=ArrayTokenizer(vocab_size, family=family, patch_nums=patch_nums), name=name,
        images_per_shard=images_per_shard, num_workers=0, progress=False,
        process_index=process_index, process_count=process_count)


def random_token_dataset(path: str, *, num_images: int, num_views: int, tokens_per_example: int,
                         vocab_size: int, num_classes: int, seed: int = 0, **kw):
    """Random tokens/labels through :func:`write_token_dataset`; returns (meta, tokens, labels)."""
    g = np.random.default_rng(seed)
    tokens = g.integers(0, vocab_size, (num_images, num_views, tokens_per_example))
    labels = g.integers(0, num_classes, (num_images,))
    meta = write_token_dataset(path, tokens, labels, vocab_size=vocab_size,
                               num_classes=num_classes, **kw)
    return meta, tokens, labels
