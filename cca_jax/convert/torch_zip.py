"""Reads PyTorch checkpoint files (the zip format of ``torch.save`` since 1.6) without torch.

The official LlamaGen / VAR / VQ / FID-Inception weights are such files. Reading them here means a
TPU pod needs no PyTorch install to start from them, and nothing in a file is ever executed: the
pickle inside may only name the handful of torch rebuild functions and storage types below (plus
``OrderedDict``); every other class (``argparse.Namespace`` under ``"args"``, optimizer objects)
becomes an inert placeholder.

Format: ``<root>/data.pkl`` is a pickle whose persistent ids
``("storage", <StorageType>, key, location, numel)`` refer to the raw little-endian bytes in
``<root>/data/<key>``; tensors are rebuilt by ``torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, ...)`` as strided views of their storage. Tensors come back as numpy arrays (bf16 as
``ml_dtypes.bfloat16``), containers as dicts/lists/tuples.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsupportedTorchFile(ValueError):
    """Not a zip-format PyTorch file (e.g. the legacy pre-1.6 format)."""


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Inert:
    """Stands in for any class the pickle names that is not a tensor or a container."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
    size, stride = tuple(size), tuple(stride)
    if not size:
        return np.array(storage[offset])
    needed = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride) if n > 0)
    if any(n == 0 for n in size):
        return np.zeros(size, storage.dtype)
    if needed > storage.size:
        raise ValueError(f"tensor of size {size}, stride {stride}, offset {offset} reaches past its "
                         f"storage of {storage.size} elements: the file is corrupt or truncated.")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view)  # own the memory: views may share one storage


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_unused):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): tuple, ("torch", "Tensor"): _Inert, ("torch.nn.parameter", "Parameter"): _Inert,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, f: BinaryIO, archive: zipfile.ZipFile, root: str):
        super().__init__(f)
        self._archive, self._root, self._storages = archive, root, {}

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)  # the persistent ids name the storage class
        return _ALLOWED.get((module, name), _Inert)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if key not in self._storages:
            dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else None
            if dtype is None:  # torch >= 2 may name the dtype instead of a storage class
                raise UnsupportedTorchFile(f"storage {key} has an unknown type {storage_type!r}")
            raw = self._archive.read(f"{self._root}/data/{key}")
            self._storages[key] = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
        return self._storages[key]


def _root_of(archive: zipfile.ZipFile) -> str:
    for name in archive.namelist():
        if name.endswith("/data.pkl") and name.count("/") == 1:
            return name.split("/")[0]
    raise UnsupportedTorchFile("zip file without <root>/data.pkl: not a torch.save file.")


def load(path_or_file: str | os.PathLike | BinaryIO) -> Any:
    """The object ``torch.save`` wrote, tensors as numpy arrays. Raises
    :class:`UnsupportedTorchFile` for files in another format."""
    src = path_or_file if hasattr(path_or_file, "read") else os.fspath(path_or_file)
    if hasattr(src, "seek"):
        src.seek(0)
    if not zipfile.is_zipfile(src):
        raise UnsupportedTorchFile("not a zip archive (legacy torch.save format?)")
    if hasattr(src, "seek"):
        src.seek(0)
    with zipfile.ZipFile(src) as archive:
        root = _root_of(archive)
        byteorder = f"{root}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise UnsupportedTorchFile("big-endian torch file")
        with archive.open(f"{root}/data.pkl") as f:
            return _Unpickler(io.BytesIO(f.read()), archive, root).load()
