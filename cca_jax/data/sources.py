"""Where the images to tokenize come from: an ImageFolder tree, TFDS ``imagenet2012``, or arrays.

A source is a sequence of ``num_images`` labelled images with stable indices (the order the
shards follow); :meth:`read_range` yields ``(index, raw, label, where)`` with ``raw`` something
:func:`cca_jax.data.preprocess.load_rgb` opens (path or encoded bytes) — or an array for
:class:`ArraySource` — and ``where`` a human-readable location for error messages.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderSource:
    """torchvision ``ImageFolder``/``DatasetFolder`` order: class = position of the sub-directory
    in sorted order (ImageNet ``train/<wnid>`` → the standard 0..999 labels); within a class, a
    sorted recursive walk, files with an image extension (case-insensitive)."""

    kind = "imagefolder"

    def __init__(self, root: str | os.PathLike):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"ImageFolder root {root} does not exist; set "
                                    "config.tokenize.input_dir to the directory holding one "
                                    "sub-directory per class (ImageNet: .../train).")
        self.root = root
        self.class_names = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.class_names:
            raise ValueError(f"{root} has no class sub-directories (expected train/<wnid>/*.JPEG).")
        paths, labels = [], []
        for label, name in enumerate(self.class_names):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        paths.append(os.path.join(dirpath, f))
                        labels.append(label)
        if not paths:
            raise ValueError(f"No images with extensions {IMG_EXTENSIONS} under {root}.")
        self.paths, self.labels = paths, np.asarray(labels, np.int64)

    @property
    def num_images(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def read_range(self, start: int, stop: int) -> Iterator[tuple[int, object, int, str]]:
        for i in range(start, stop):
            yield i, self.paths[i], int(self.labels[i]), self.paths[i]

    def describe(self) -> dict:
        return {"kind": self.kind, "root": self.root, "num_images": self.num_images,
                "num_classes": self.num_classes, "first_classes": self.class_names[:3]}


class TfdsSource:
    """A TFDS image-classification builder (default ``imagenet2012``; labels are its
    ``ClassLabel`` ids, sorted wnids = the standard order). Indices are positions in the split.

    The builder must be prepared (``download_and_prepare`` with ``manual_dir`` holding the
    ImageNet tars); :func:`prepare` does it. Random access (``as_data_source``) is used when the
    prepared files support it (ArrayRecord); TFRecord files are read sequentially per index range.
    JPEG bytes are decoded with PIL (as the official loaders do), not with TensorFlow.
    """

    kind = "tfds"

    def __init__(self, name: str = "imagenet2012", split: str = "train", data_dir: str | None = None):
        import tensorflow_datasets as tfds
        self.name, self.split, self.data_dir = name, split, data_dir
        self.builder = tfds.builder(name, data_dir=data_dir or None)
        self._decoders = {"image": tfds.decode.SkipDecoding()}
        try:
            self._source = self.builder.as_data_source(split, decoders=self._decoders)
            self._num = len(self._source)
        except (NotImplementedError, ValueError, AssertionError):
            self._source = None
            if split not in self.builder.info.splits:
                raise FileNotFoundError(
                    f"TFDS {name} split {split!r} is not prepared under {self.builder.data_dir}; "
                    "set config.tokenize.tfds_data_dir to where it was prepared, or "
                    "config.tokenize.manual_dir to the directory holding the ImageNet tars so the "
                    "job prepares it.") from None
            self._num = self.builder.info.splits[split].num_examples
        self.num_classes = self.builder.info.features["label"].num_classes

    @staticmethod
    def prepare(name: str, data_dir: str | None, manual_dir: str) -> None:
        """``download_and_prepare`` from the manually downloaded archives (nothing is fetched)."""
        import tensorflow_datasets as tfds
        builder = tfds.builder(name, data_dir=data_dir or None)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))

    @property
    def num_images(self) -> int:
        return self._num

    def read_range(self, start: int, stop: int) -> Iterator[tuple[int, object, int, str]]:
        if self._source is not None:
            for i in range(start, stop):
                ex = self._source[i]
                yield i, ex["image"], int(ex["label"]), self._where(i, ex)
            return
        import tensorflow_datasets as tfds
        ds = self.builder.as_dataset(
            split=f"{self.split}[{start}:{stop}]", decoders=self._decoders, shuffle_files=False,
            read_config=tfds.ReadConfig(interleave_cycle_length=1))
        n = start
        for ex in tfds.as_numpy(ds):
            yield n, ex["image"], int(ex["label"]), self._where(n, ex)
            n += 1
        if n != stop:
            raise RuntimeError(f"TFDS {self.name} {self.split}[{start}:{stop}] gave {n - start} "
                               f"examples, expected {stop - start}.")

    def _where(self, i: int, ex) -> str:
        fn = ex.get("file_name", b"")
        fn = fn.decode() if isinstance(fn, bytes) else str(fn)
        return f"tfds {self.name} {self.split}[{i}] {fn}".rstrip()

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "split": self.split,
                "data_dir": self.data_dir or "", "num_images": self.num_images,
                "num_classes": self.num_classes}


class ArraySource:
    """In-memory images (any array the views function accepts) with labels, e.g. the digits."""

    kind = "arrays"

    def __init__(self, images: Sequence | np.ndarray, labels: Sequence[int] | np.ndarray,
                 num_classes: int | None = None, name: str = "arrays"):
        self.images, self.labels = images, np.asarray(labels, np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels.")
        self.num_classes = int(num_classes if num_classes is not None else self.labels.max() + 1)
        self.name = name

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def read_range(self, start: int, stop: int):
        for i in range(start, stop):
            yield i, self.images[i], int(self.labels[i]), f"{self.name}[{i}]"

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "num_images": self.num_images,
                "num_classes": self.num_classes}
