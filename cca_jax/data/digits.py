"""scikit-learn's bundled digits (1,797 8×8 grey images, 10 classes) as a tiny image dataset,
and through the same shard writer as ImageNet (the demo's data).

The demo brings its own tokenizer: any object with ``encode(images [B, H, W, C]) -> tokens
[B, L]`` and ``vocab_size`` (see ``cca_jax/data/tokenizers.py``) writes shards via
:func:`write_digits_dataset`; the reader then serves them like the ImageNet token sets.
"""

from __future__ import annotations

import numpy as np

from cca_jax.data import sources, writer

NUM_CLASSES = 10


def load_digits_images(size: int = 16, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[1797, size, size, channels]`` float32 in [-1, 1] and labels ``[1797]`` int64.

    Pixel values 0..16 map linearly to [-1, 1]. Sizes other than 8 use PyTorch-exact bicubic
    resampling (``F.interpolate(mode='bicubic', align_corners=False)``, ``cca_jax/resample.py``)
    clipped back to [-1, 1] (bicubic overshoots at edges). Grey is repeated over ``channels``.
    """
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0)) * 2 - 1  # [N, 8, 8]
    x = x[..., None]
    if size != x.shape[1]:
        from cca_jax import resample
        x = np.clip(np.asarray(resample.resize_bicubic(x, (size, size))), -1.0, 1.0)
    return np.repeat(x, channels, axis=-1).astype(np.float32), d.target.astype(np.int64)


class IdentityViews:
    """One view: the (already preprocessed) image itself."""

    num_views = 1

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image: np.ndarray, index: int = 0) -> np.ndarray:
        return np.asarray(image, np.float32)[None]

    def describe(self) -> dict:
        return {"kind": "identity", "image_size": self.image_size,
                "normalize": "digits 0..16 -> [-1, 1], bicubic resize"}


def write_digits_dataset(out_dir: str, tokenizer, *, size: int = 16, channels: int = 3,
                         images_per_shard: int = 512, name: str = "digits",
                         progress: bool = False, process_index: int | None = None,
                         process_count: int | None = None) -> dict:
    """Tokenizes all 1,797 digits with ``tokenizer`` into ``out_dir``; returns the metadata."""
    images, labels = load_digits_images(size, channels)
    src = sources.ArraySource(images, labels, NUM_CLASSES, name="sklearn_digits")
    return writer.write_dataset(out_dir, source=src, views=IdentityViews(size), tokenizer=tokenizer,
                                name=name, images_per_shard=images_per_shard, num_workers=0,
                                progress=progress, resolution=size, process_index=process_index,
                                process_count=process_count)
