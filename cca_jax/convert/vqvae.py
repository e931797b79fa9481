"""VAR's VQVAE checkpoints (``vae_ch160v4096z32.pth``) ↔ Flax params of ``models/vqvae.py``.

The official file is a **bare** state dict (324 keys for ``vae_ch160v4096z32``, buffers
included: ``quantize.ema_vocab_hit_SV``). Mapping (var.md §4.4):

* ``encoder.down.{l}.block.{b}.*`` ↔ ``encoder/down_{l}/block_{b}/*`` (same for ``attn``,
  ``decoder.up.{l}``); ``*.mid.{block_1,attn_1,block_2}`` keep their names;
* conv ``weight [out, in, kh, kw]`` ↔ ``kernel [kh, kw, in, out]``; GroupNorm ``weight`` ↔
  ``scale``; biases unchanged;
* ``quantize.embedding.weight`` ↔ ``quantize/embedding``; ``quantize.ema_vocab_hit_SV`` ↔
  ``quantize/ema_vocab_hit_SV``;
* Φ convs ``quantize/quant_resi/phi_{k}`` ↔ ``quantize.quant_resi.qresi_ls.{k}`` (K > 1
  shared), ``quantize.quant_resi.qresi`` (``share_quant_resi=1``) or ``quantize.quant_resi.{k}``
  (``share_quant_resi=0``); none when ``|quant_resi| <= 1e-6`` (Φ = identity).

Like the official ``VQVAE.load_state_dict``, a ``quantize.ema_vocab_hit_SV`` whose first
dimension differs from the number of scales is replaced by the model's own (zero) buffer.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

import jax
import numpy as np

from cca_jax.convert import common
from cca_jax.models import vqvae

_INDEXED_RE = re.compile(r"^(down|up|block|attn)_(\d+)$")
_PHI_RE = re.compile(r"^phi_(\d+)$")
EMA_KEY = "quantize.ema_vocab_hit_SV"


def _flat(tree) -> dict[tuple[str, ...], Any]:
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _torch_key(path: tuple[str, ...], cfg: vqvae.VQVAEConfig) -> str:
    if path == ("quantize", "embedding"):
        return "quantize.embedding.weight"
    if path == ("quantize", "ema_vocab_hit_SV"):
        return EMA_KEY
    leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
    if path[:2] == ("quantize", "quant_resi"):
        k = _PHI_RE.match(path[2]).group(1)
        if cfg.share_quant_resi == 0:
            return f"quantize.quant_resi.{k}.{leaf}"
        if cfg.share_quant_resi == 1:
            return f"quantize.quant_resi.qresi.{leaf}"
        return f"quantize.quant_resi.qresi_ls.{k}.{leaf}"
    parts = []
    for i, p in enumerate(path[:-1]):
        m = _INDEXED_RE.match(p)
        in_mid = i > 0 and path[i - 1] == "mid"  # mid.block_1 / mid.attn_1 are attribute names
        parts.extend([m.group(1), m.group(2)] if (m and not in_mid) else [p])
    return ".".join(parts + [leaf])


def _torch_shape(path, shape) -> tuple[int, ...]:
    return (shape[3], shape[2], shape[0], shape[1]) if path[-1] == "kernel" else tuple(shape)


def key_map(cfg: vqvae.VQVAEConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """official key → (Flax path, official shape), for every entry of the official state dict."""
    abstract = jax.eval_shape(lambda: vqvae.init_params(cfg, jax.random.PRNGKey(0)))
    return {_torch_key(p, cfg): (p, _torch_shape(p, a.shape)) for p, a in _flat(abstract).items()}


def expected_shapes(cfg: vqvae.VQVAEConfig) -> dict[str, tuple[int, ...]]:
    return {k: s for k, (_, s) in key_map(cfg).items()}


def _fix_ema_buffer(sd: Mapping[str, Any], cfg: vqvae.VQVAEConfig) -> dict:
    sd = dict(sd)
    ema = sd.get(EMA_KEY)
    if ema is not None and np.shape(ema)[0] != cfg.num_scales:
        logging.warning("%s has shape %s; the model has %d scales, so (like the official "
                        "VQVAE.load_state_dict) the model's own zero buffer is used instead.",
                        EMA_KEY, tuple(np.shape(ema)), cfg.num_scales)
        sd[EMA_KEY] = np.zeros((cfg.num_scales, cfg.vocab_size), np.float32)
    return sd


def from_state_dict(sd: Mapping[str, Any], cfg: vqvae.VQVAEConfig) -> dict:
    """Official state dict (numpy, PyTorch layout) → params pytree (numpy float32 leaves).

    Strict: missing, unexpected and mis-shaped keys raise :class:`CheckpointMismatchError`
    naming them.
    """
    sd = _fix_ema_buffer(sd, cfg)
    kmap = key_map(cfg)
    common.check_state_dict(sd, {k: s for k, (_, s) in kmap.items()}, what="VQVAE checkpoint")
    params: dict = {}
    for key, (path, _) in kmap.items():
        v = sd[key]
        v = np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v, dtype=np.float32)
        if path[-1] == "kernel":
            v = np.transpose(v, (2, 3, 1, 0))
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(v)
    return params


def to_state_dict(params: Mapping[str, Any], cfg: vqvae.VQVAEConfig) -> dict[str, np.ndarray]:
    """Params pytree → official state dict with exactly the official keys (inverse of
    :func:`from_state_dict`; the round trip is bit-exact)."""
    flat = _flat(params)
    kmap = key_map(cfg)
    want = {p for p, _ in kmap.values()}
    if set(flat) != want:
        missing = sorted("/".join(p) for p in want - set(flat))
        extra = sorted("/".join(p) for p in set(flat) - want)
        raise common.CheckpointMismatchError(
            f"VQVAE params do not match the configured tokenizer: missing {missing[:12]}, "
            f"unexpected {extra[:12]}; check config.tokenizer (ch, ch_mult, patch_nums, "
            "share_quant_resi, ...).")
    out = {}
    for key, (path, shape) in kmap.items():
        v = np.asarray(flat[path], dtype=np.float32)
        if path[-1] == "kernel":
            v = np.transpose(v, (3, 2, 0, 1))
        if v.shape != shape:
            raise common.CheckpointMismatchError(
                f"VQVAE param {'/'.join(path)} (official {key}) has shape {v.shape}, expected {shape}; "
                "check config.tokenizer.")
        out[key] = np.ascontiguousarray(v)
    return out


def load_checkpoint(path: str | os.PathLike, cfg: vqvae.VQVAEConfig) -> dict:
    """Params from the official file (bare state dict, read without executing pickled code) or
    from an Orbax params directory (``cca_jax.checkpoint.export_params`` / the convert job)."""
    spath = os.fspath(path)
    if common.is_directory(spath):
        from cca_jax import checkpoint as ckpt_lib
        tree = ckpt_lib.load_params(spath)
        if isinstance(tree, Mapping) and "params" in tree and "encoder" not in tree:
            tree = tree["params"]
        return from_state_dict(to_state_dict(tree, cfg), cfg)  # validates names and shapes
    return from_state_dict(common.load_official_state_dict(spath), cfg)


def save_official(params: Mapping[str, Any], cfg: vqvae.VQVAEConfig, path: str | os.PathLike) -> None:
    """Writes the official bare state dict (what ``VQVAE.load_state_dict(torch.load(path))`` reads)."""
    common.save_torch_file(to_state_dict(params, cfg), path)
