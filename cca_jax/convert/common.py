"""Reading and writing official PyTorch checkpoint files, safely and strictly.

Family converters (``convert/llamagen.py``, ``convert/var.py``, ...) map an official state dict
(``{key: np.ndarray}`` in PyTorch layout) to a Flax params pytree and back. This module holds what
they share: a loader that never executes pickled code, wrapper unpacking, strict key/shape checks
with errors that name the keys, and a writer for the official format.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from cca_jax.convert import torch_zip

WRAPPER_KEYS = ("model", "module", "state_dict", "trainer")


class CheckpointMismatchError(ValueError):
    """An official state dict does not match the configured model."""


def load_torch_file(path: str | os.PathLike) -> object:
    """The object an official ``.pt``/``.pth`` file holds, read without executing anything in it.

    Zip-format files (``torch.save`` since PyTorch 1.6: every official release) are read by
    :mod:`torch_zip` without PyTorch (tensors come back as numpy arrays). Legacy files need torch:
    ``torch.load(weights_only=True)``, or, when the file pickles other objects (e.g. an argparse
    ``Namespace`` under ``"args"``), an unpickler that maps every unknown class to an inert
    placeholder, so the state dict is still recovered without running anything from the file.
    """
    path = _readable(path)
    try:
        return torch_zip.load(path)
    except torch_zip.UnsupportedTorchFile as e:
        reason = e
    try:
        import torch
    except ImportError:
        raise RuntimeError(f"{path} is not a zip-format PyTorch file ({reason}); reading it needs "
                           "PyTorch (pip install torch; the CPU build is enough), or re-save it "
                           "with torch >= 1.6.") from None
    if hasattr(path, "seek"):
        path.seek(0)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - only reached for non-tensor pickled objects
        if "weights_only" not in str(e) and "Unsupported global" not in str(e):
            raise
    import pickle

    class _Inert:
        def __init__(self, *a, **k):
            pass

        def __setstate__(self, state):
            pass

    class _SafeUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module.startswith("torch") or module == "collections" and name == "OrderedDict":
                return super().find_class(module, name)
            return _Inert

    class _PickleModule:
        Unpickler = _SafeUnpickler
        load = staticmethod(lambda f, **kw: _SafeUnpickler(f, **kw).load())

    if hasattr(path, "seek"):
        path.seek(0)
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PickleModule)


def is_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` (local or ``gs://``) is a directory, i.e. an Orbax params export rather
    than an official ``.pt``/``.pth`` file."""
    from cca_jax import checkpoint as ckpt_lib

    return ckpt_lib.as_path(path).is_dir()


def _readable(path: str | os.PathLike):
    """A local path, or the bytes of a remote file in memory (``torch.load`` reads file objects)."""
    from cca_jax import checkpoint as ckpt_lib

    p = ckpt_lib.as_path(path)
    if not p.exists():
        raise FileNotFoundError(f"Checkpoint file {os.fspath(path)} does not exist; check the config "
                                "field that names it (e.g. config.init.reference_checkpoint).")
    return io.BytesIO(p.read_bytes()) if ckpt_lib.is_remote(path) else os.fspath(p)


def unwrap_state_dict(obj: object, wrapper_keys: Iterable[str] = WRAPPER_KEYS) -> dict:
    """Returns the state dict inside an official checkpoint object.

    LlamaGen DDP files wrap it in ``"model"``; FSDP, VAR and VQVAE files are bare; VAR trainer
    files use ``"trainer"``. A bare dict is recognised by having only tensor/array values.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"Checkpoint holds a {type(obj).__name__}, not a state dict.")
    if all(hasattr(v, "shape") for v in obj.values()):
        return dict(obj)
    for k in wrapper_keys:
        if k in obj and isinstance(obj[k], Mapping):
            return unwrap_state_dict(obj[k], wrapper_keys)
    raise CheckpointMismatchError(
        f"Cannot find a state dict in the checkpoint: top-level keys {sorted(map(str, obj))[:20]}, "
        f"none of {list(wrapper_keys)} holds one.")


def to_numpy_state_dict(sd: Mapping) -> dict[str, np.ndarray]:
    """Tensors -> float32/int numpy arrays (bf16/fp16 weights are cast to float32)."""
    out = {}
    for k, v in sd.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu()
            if v.is_floating_point():
                v = v.float()
            v = v.numpy()
        v = np.asarray(v)
        if np.issubdtype(v.dtype, np.floating) or v.dtype == ml_dtypes.bfloat16:
            v = v.astype(np.float32)
        out[k] = v
    return out


def load_official_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Safe load + unwrap + numpy conversion of an official ``.pt``/``.pth`` file."""
    return to_numpy_state_dict(unwrap_state_dict(load_torch_file(path)))


def check_state_dict(sd: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], *,
                     ignore_prefixes: Iterable[str] = (), ignore_keys: Iterable[str] = (),
                     what: str = "checkpoint") -> None:
    """Strict check: same keys and shapes. Raises naming every missing/extra/mis-shaped key."""
    ignore_keys = set(ignore_keys)
    ignore_prefixes = tuple(ignore_prefixes)

    def ignored(k):
        return k in ignore_keys or (ignore_prefixes and k.startswith(ignore_prefixes))

    got = {k for k in sd if not ignored(k)}
    want = set(expected)
    missing, extra = sorted(want - got), sorted(got - want)
    bad_shape = sorted(k for k in want & got if tuple(np.shape(sd[k])) != tuple(expected[k]))
    if missing or extra or bad_shape:
        lines = [f"The {what} does not match the configured model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:12]}{' ...' if len(missing) > 12 else ''}")
        if extra:
            lines.append(f"  unexpected keys ({len(extra)}): {extra[:12]}{' ...' if len(extra) > 12 else ''}")
        for k in bad_shape[:12]:
            lines.append(f"  {k}: checkpoint shape {tuple(np.shape(sd[k]))}, model expects {tuple(expected[k])}")
        lines.append("  Check that config.model (size, vocab, classes, image size) matches the file.")
        raise CheckpointMismatchError("\n".join(lines))


def save_torch_file(sd: Mapping[str, np.ndarray], path: str | os.PathLike, *, wrap: str | None = None) -> None:
    """Writes ``sd`` as an official-format file (float32 tensors), optionally wrapped in ``{wrap: sd}``."""
    try:
        import torch
    except ImportError:
        raise RuntimeError("Writing official PyTorch files needs PyTorch: pip install torch (the "
                           "CPU build is enough; see requirements-dev.txt).") from None

    tensors = {k: torch.from_numpy(np.ascontiguousarray(np.asarray(v))) for k, v in sd.items()}
    obj = {wrap: tensors} if wrap else tensors
    from cca_jax import checkpoint as ckpt_lib

    buf = io.BytesIO()  # through epath, so gs:// destinations work like local ones
    torch.save(obj, buf)
    dest = ckpt_lib.as_path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / (dest.name + ".tmp")  # a killed export leaves no truncated .pt behind
    tmp.write_bytes(buf.getvalue())
    tmp.rename(dest)
