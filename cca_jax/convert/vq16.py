"""LlamaGen VQ-16 tokenizer checkpoints (``vq_ds16_c2i.pt``) ↔ Flax params of ``models/vq16.py``.

Key mapping is a rename: ``a.b.0.c.weight`` ↔ ``a/b_0/c/{kernel|scale}`` (``conv_blocks``,
``res``, ``attn``, ``mid`` take their list index as a suffix); conv weights are transposed
``[out, in, kh, kw]`` ↔ ``[kh, kw, in, out]``; ``quantize.embedding.weight`` ↔
``quantize/embedding``; the usage buffer ``quantize.codebook_used`` ↔ ``quantize/codebook_used``.
The official file wraps the state dict in ``"model"`` (``vq_train.py`` may add ``"ema"``; the
model weights are what every official loader uses).
"""

from __future__ import annotations

import functools
import os
import re
from typing import Mapping

import flax
import jax
import numpy as np

from cca_jax.convert import common
from cca_jax.models import vq16

_INDEXED = ("conv_blocks", "res", "attn", "mid")
_INDEXED_RE = re.compile(rf"^({'|'.join(_INDEXED)})_(\d+)$")


def _abstract_params(cfg: vq16.VQ16Config):
    return jax.eval_shape(lambda: jax.tree_util.tree_map(
        lambda x: x, flax.linen.meta.unbox(vq16.init_boxed(cfg, jax.random.PRNGKey(0)))))


def _torch_key(path: tuple[str, ...]) -> str:
    parts = []
    for p in path[:-1]:
        m = _INDEXED_RE.match(p)
        parts.extend([m.group(1), m.group(2)] if m else [p])
    leaf = path[-1]
    parts.append({"kernel": "weight", "scale": "weight", "embedding": "embedding.weight"}.get(leaf, leaf))
    return ".".join(parts)


def _flat(tree) -> dict[tuple[str, ...], object]:
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[tuple(k.key for k in path)] = leaf
    return out


def _torch_shape(path, shape):
    return (shape[3], shape[2], shape[0], shape[1]) if path[-1] == "kernel" else tuple(shape)


@functools.lru_cache(maxsize=16)
def key_map(cfg: vq16.VQ16Config) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """official key → (Flax path, official shape) for every entry of the state dict."""
    return {_torch_key(p): (p, _torch_shape(p, a.shape)) for p, a in _flat(_abstract_params(cfg)).items()}


def expected_shapes(cfg: vq16.VQ16Config) -> dict[str, tuple[int, ...]]:
    return {k: s for k, (_, s) in key_map(cfg).items()}


def from_state_dict(sd: Mapping[str, np.ndarray], cfg: vq16.VQ16Config) -> dict:
    """Official state dict (numpy, PyTorch layout) → params pytree; strict on keys and shapes."""
    kmap = key_map(cfg)
    common.check_state_dict(sd, {k: s for k, (_, s) in kmap.items()}, what="VQ-16 tokenizer checkpoint")
    params: dict = {}
    for key, (path, _) in kmap.items():
        v = np.asarray(sd[key], dtype=np.float32)
        if path[-1] == "kernel":
            v = np.transpose(v, (2, 3, 1, 0))
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return params


def to_state_dict(params, cfg: vq16.VQ16Config) -> dict[str, np.ndarray]:
    """Params pytree → official state dict (exact inverse of :func:`from_state_dict`)."""
    flat = _flat(params)
    kmap = key_map(cfg)
    want = {p for p, _ in kmap.values()}
    if set(flat) != want:
        missing = sorted("/".join(p) for p in want - set(flat))
        extra = sorted("/".join(p) for p in set(flat) - want)
        raise common.CheckpointMismatchError(
            f"VQ-16 params do not match the config: missing {missing[:8]}, unexpected {extra[:8]}.")
    out = {}
    for key, (path, shape) in kmap.items():
        v = np.array(flat[path], dtype=np.float32)  # a writable copy
        if path[-1] == "kernel":
            v = np.transpose(v, (3, 2, 0, 1))
        if v.shape != shape:
            raise common.CheckpointMismatchError(f"{'/'.join(path)} has shape {v.shape}, expected {shape}.")
        out[key] = np.ascontiguousarray(v)
    return out


def load_checkpoint(path: str | os.PathLike, cfg: vq16.VQ16Config) -> dict:
    """Params from the official file (``vq_ds16_c2i.pt``) or from an Orbax params directory
    (``cca_jax.checkpoint.export_params`` / the convert job); both are checked against ``cfg``."""
    from cca_jax import checkpoint as ckpt_lib
    spath = os.fspath(path)
    if common.is_directory(spath):
        tree = ckpt_lib.load_params(spath)
        tree = tree.get("params", tree) if isinstance(tree, Mapping) and "params" in tree else tree
        return from_state_dict(to_state_dict(tree, cfg), cfg)  # validates the tree
    return from_state_dict(common.load_official_state_dict(spath), cfg)


def save_official(params, cfg: vq16.VQ16Config, path: str | os.PathLike) -> None:
    """Writes an official-layout ``{"model": state_dict}`` file (what the LlamaGen loaders read)."""
    common.save_torch_file(to_state_dict(params, cfg), path, wrap="model")
