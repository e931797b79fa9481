"""pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` ↔ :class:`FIDInceptionV3` params.

The user gives the file's path (``config.eval.inception_weights``); nothing is downloaded. The
file is read with the safe loader of ``convert/common.py`` and checked strictly against the
model's keys and shapes. ``*.num_batches_tracked`` BatchNorm counters are accepted whether present
or not (PyTorch adds them on load when absent) and otherwise ignored.

Key mapping (official → Flax path):
  ``<m>.conv.weight [O, I, kh, kw]`` → ``<m>/conv/kernel [kh, kw, I, O]``
  ``<m>.bn.weight / bias / running_mean / running_var`` → ``<m>/bn/scale / bias / mean / var``
  ``fc.weight [1008, 2048]`` → ``fc/kernel [2048, 1008]``; ``fc.bias`` → ``fc/bias``
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.traverse_util
import numpy as np

from cca_jax.convert.common import check_state_dict, load_official_state_dict
from cca_jax.models.inception import abstract_params

_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_BN_INV = {v: k for k, v in _BN.items()}


def _torch_key(path: tuple[str, ...]) -> str:
    *mod, name = path
    if mod and mod[-1] == "bn":
        name = _BN[name]
    elif name == "kernel":
        name = "weight"
    return ".".join([*mod, name])


def _to_torch_layout(path: tuple[str, ...], v: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return v
    return v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T


def _from_torch_layout(path: tuple[str, ...], v: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return v
    return v.transpose(2, 3, 1, 0) if v.ndim == 4 else v.T


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """``{official key: official shape}`` of the network (without ``num_batches_tracked``)."""
    flat = flax.traverse_util.flatten_dict(abstract_params())
    return {_torch_key(p): tuple(_to_torch_layout(p, np.empty(leaf.shape, np.bool_)).shape)
            for p, leaf in flat.items()}


def from_state_dict(sd: Mapping[str, np.ndarray]) -> Any:
    """Official state dict (numpy, PyTorch layout) → params pytree (float32). Strict."""
    expected = expected_state_dict_shapes()
    tracked = [k for k in sd if k.endswith(".num_batches_tracked")]
    check_state_dict(sd, expected, ignore_keys=tracked, what="FID-Inception weight file")
    flat = flax.traverse_util.flatten_dict(abstract_params())
    out = {p: np.asarray(_from_torch_layout(p, np.asarray(sd[_torch_key(p)], np.float32)))
           for p in flat}
    return flax.traverse_util.unflatten_dict(out)


def to_state_dict(params: Any, *, num_batches_tracked: bool = False) -> dict[str, np.ndarray]:
    """Params pytree → official state dict (exact inverse of :func:`from_state_dict`).

    ``num_batches_tracked=True`` adds the int64 BatchNorm counters (value 0) that a state dict
    saved from a live PyTorch model carries.
    """
    flat = flax.traverse_util.flatten_dict(params)
    sd = {_torch_key(p): np.ascontiguousarray(_to_torch_layout(p, np.asarray(v)))
          for p, v in flat.items()}
    if num_batches_tracked:
        for k in [k for k in sd if k.endswith(".bn.running_mean")]:
            sd[k[: -len("running_mean")] + "num_batches_tracked"] = np.asarray(0, np.int64)
    return sd


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Reads ``pt_inception-2015-12-05-6726825d.pth`` (or any file with its keys) → params."""
    if not str(path):
        raise FileNotFoundError(
            "No FID-Inception weights given: set config.eval.inception_weights to the path of "
            "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release file; it is never "
            "downloaded), or config.eval.tf_graph to ADM's classify_image_graph_def.pb.")
    return from_state_dict(load_official_state_dict(path))
