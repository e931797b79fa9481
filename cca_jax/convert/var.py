"""Official VAR state dicts (``var_d*.pth``, ``VAR_d*_CCA.pth``) <-> Flax params of models/var.py.

The official files are bare state dicts of ``12 + 13*depth`` entries (shared_aln: see
:func:`expected_shapes`) that include three persistent buffers:

* ``lvl_1L [1, L]`` int64 — scale index of each token;
* ``attn_bias_for_masking [1, 1, L, L]`` — 0 / -inf block-causal bias;
* ``blocks.{i}.attn.zero_k_bias [C]`` — zeros.

Our model recomputes all three from the config, so :func:`from_state_dict` requires them (as
the official strict loader does) and checks that they hold exactly what the config implies
(a mismatch means the file was made for other ``patch_nums``, or a non-zero k bias that our model
could not represent). :func:`to_state_dict` writes them back, so the official code loads the
export with ``load_state_dict(strict=True)``.

Layout: torch ``Linear.weight [out, in]`` -> Flax kernel ``[in, out]``; ``mat_qkv.weight`` rows
q | k | v (head-major) -> three ``[C, H, D]`` kernels; ``proj.weight [C, C]`` -> ``[H, D, C]``;
``ada_lin.1.weight [6C, D]`` -> ``[D, 6, C]`` (chunks gamma1, gamma2, scale1, scale2, shift1,
shift2 in order).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np

from cca_jax.convert.common import (CheckpointMismatchError, check_state_dict, is_directory,
                                    load_official_state_dict)
from cca_jax.models.var import VARConfig, abstract_params

BUFFER_SUFFIXES = ("lvl_1L", "attn_bias_for_masking", "attn.zero_k_bias")


def expected_shapes(cfg: VARConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the official ``VAR.state_dict()`` (parameters and buffers) and its shape."""
    C, H, L, V, F = cfg.C, cfg.num_heads, cfg.L, cfg.vocab_size, cfg.ffn_dim
    out = {
        "pos_start": (1, cfg.first_l, C),
        "pos_1LC": (1, L, C),
        "lvl_1L": (1, L),
        "attn_bias_for_masking": (1, 1, L, L),
        "word_embed.weight": (C, cfg.Cvae),
        "word_embed.bias": (C,),
        "class_emb.weight": (cfg.num_classes + 1, C),
        "lvl_embed.weight": (cfg.num_scales, C),
        "head_nm.ada_lin.1.weight": (2 * C, C),
        "head_nm.ada_lin.1.bias": (2 * C,),
        "head.weight": (V, C),
        "head.bias": (V,),
    }
    if cfg.shared_aln:
        out["shared_ada_lin.1.weight"] = (6 * C, C)
        out["shared_ada_lin.1.bias"] = (6 * C,)
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        if cfg.attn_l2_norm:
            out[p + "attn.scale_mul_1H11"] = (1, H, 1, 1)
        out.update({
            p + "attn.q_bias": (C,),
            p + "attn.v_bias": (C,),
            p + "attn.zero_k_bias": (C,),
            p + "attn.mat_qkv.weight": (3 * C, C),
            p + "attn.proj.weight": (C, C),
            p + "attn.proj.bias": (C,),
            p + "ffn.fc1.weight": (F, C),
            p + "ffn.fc1.bias": (F,),
            p + "ffn.fc2.weight": (C, F),
            p + "ffn.fc2.bias": (C,),
        })
        if cfg.shared_aln:
            out[p + "ada_gss"] = (1, 1, 6, C)
        else:
            out[p + "ada_lin.1.weight"] = (6 * C, C)
            out[p + "ada_lin.1.bias"] = (6 * C,)
    return out


def official_buffers(cfg: VARConfig) -> dict[str, np.ndarray]:
    """The buffers the official constructor registers, recomputed from the config."""
    lvl = cfg.lvl_1L()
    bias = np.where(lvl[:, None] >= lvl[None, :], 0.0, -np.inf).astype(np.float32)
    out = {"lvl_1L": lvl[None].astype(np.int64), "attn_bias_for_masking": bias[None, None]}
    for i in range(cfg.depth):
        out[f"blocks.{i}.attn.zero_k_bias"] = np.zeros((cfg.C,), np.float32)
    return out


def _check_buffers(sd: Mapping[str, np.ndarray], cfg: VARConfig) -> None:
    bad = [k for k, want in official_buffers(cfg).items() if not np.array_equal(np.asarray(sd[k]), want)]
    if bad:
        raise CheckpointMismatchError(
            f"VAR checkpoint buffers {bad[:6]}{' ...' if len(bad) > 6 else ''} differ from what the "
            f"config implies (patch_nums {cfg.patch_nums}, zero k bias); the file was made for another "
            "config.model.patch_nums, or its zero_k_bias is not zero (unsupported).")


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def from_state_dict(sd: Mapping[str, np.ndarray], cfg: VARConfig) -> dict[str, Any]:
    """Official state dict (numpy, torch layout) -> Flax params (float32 numpy leaves). Strict."""
    check_state_dict(sd, expected_shapes(cfg), what=f"VAR checkpoint (depth {cfg.depth}, C {cfg.C})")
    _check_buffers(sd, cfg)
    C, H, D = cfg.C, cfg.num_heads, cfg.head_dim

    def dense(prefix):
        return {"kernel": _f32(sd[prefix + ".weight"]).T, "bias": _f32(sd[prefix + ".bias"])}

    def ada(prefix, n):
        w = _f32(sd[prefix + ".weight"])  # [n*C, D]
        return {"kernel": w.reshape(n, C, -1).transpose(2, 0, 1), "bias": _f32(sd[prefix + ".bias"]).reshape(n, C)}

    p: dict[str, Any] = {
        "class_emb": {"embedding": _f32(sd["class_emb.weight"])},
        "pos_start": _f32(sd["pos_start"])[0],
        "pos_1LC": _f32(sd["pos_1LC"])[0],
        "lvl_embed": {"embedding": _f32(sd["lvl_embed.weight"])},
        "word_embed": dense("word_embed"),
        "head_nm": {"ada_lin": ada("head_nm.ada_lin.1", 2)},
        "head": dense("head"),
    }
    if cfg.shared_aln:
        p["shared_ada_lin"] = ada("shared_ada_lin.1", 6)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        qkv = _f32(sd[b + "attn.mat_qkv.weight"]).reshape(3, H, D, C).transpose(0, 3, 1, 2)  # [3, C, H, D]
        attn = {
            "query": {"kernel": qkv[0]}, "key": {"kernel": qkv[1]}, "value": {"kernel": qkv[2]},
            "q_bias": _f32(sd[b + "attn.q_bias"]).reshape(H, D),
            "v_bias": _f32(sd[b + "attn.v_bias"]).reshape(H, D),
            "proj": {"kernel": _f32(sd[b + "attn.proj.weight"]).T.reshape(H, D, C),
                     "bias": _f32(sd[b + "attn.proj.bias"])},
        }
        if cfg.attn_l2_norm:
            attn["scale_mul"] = _f32(sd[b + "attn.scale_mul_1H11"]).reshape(H)
        blk = {"attn": attn, "ffn": {"fc1": dense(b + "ffn.fc1"), "fc2": dense(b + "ffn.fc2")}}
        if cfg.shared_aln:
            blk["ada_gss"] = _f32(sd[b + "ada_gss"]).reshape(6, C)
        else:
            blk["ada_lin"] = ada(b + "ada_lin.1", 6)
        p[f"blocks_{i}"] = blk
    return p


def to_state_dict(params: Mapping[str, Any], cfg: VARConfig) -> dict[str, np.ndarray]:
    """Flax params -> the exact official key set (buffers included), torch layout, float32."""
    p = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32), dict(params))
    C, H = cfg.C, cfg.num_heads

    def dense(prefix, d):
        return {prefix + ".weight": np.ascontiguousarray(d["kernel"].T), prefix + ".bias": d["bias"]}

    def ada(prefix, d, n):
        return {prefix + ".weight": np.ascontiguousarray(d["kernel"].transpose(1, 2, 0).reshape(n * C, -1)),
                prefix + ".bias": d["bias"].reshape(n * C)}

    sd: dict[str, np.ndarray] = {
        "pos_start": p["pos_start"][None],
        "pos_1LC": p["pos_1LC"][None],
        "class_emb.weight": p["class_emb"]["embedding"],
        "lvl_embed.weight": p["lvl_embed"]["embedding"],
        **dense("word_embed", p["word_embed"]),
        **ada("head_nm.ada_lin.1", p["head_nm"]["ada_lin"], 2),
        **dense("head", p["head"]),
    }
    if cfg.shared_aln:
        sd.update(ada("shared_ada_lin.1", p["shared_ada_lin"], 6))
    for i in range(cfg.depth):
        b, blk = f"blocks.{i}.", p[f"blocks_{i}"]
        a = blk["attn"]
        qkv = np.stack([a["query"]["kernel"], a["key"]["kernel"], a["value"]["kernel"]])  # [3, C, H, D]
        sd[b + "attn.mat_qkv.weight"] = np.ascontiguousarray(qkv.transpose(0, 2, 3, 1).reshape(3 * C, C))
        sd[b + "attn.q_bias"] = a["q_bias"].reshape(C)
        sd[b + "attn.v_bias"] = a["v_bias"].reshape(C)
        if cfg.attn_l2_norm:
            sd[b + "attn.scale_mul_1H11"] = a["scale_mul"].reshape(1, H, 1, 1)
        sd[b + "attn.proj.weight"] = np.ascontiguousarray(a["proj"]["kernel"].reshape(C, C).T)
        sd[b + "attn.proj.bias"] = a["proj"]["bias"]
        sd.update(dense(b + "ffn.fc1", blk["ffn"]["fc1"]))
        sd.update(dense(b + "ffn.fc2", blk["ffn"]["fc2"]))
        if cfg.shared_aln:
            sd[b + "ada_gss"] = blk["ada_gss"].reshape(1, 1, 6, C)
        else:
            sd.update(ada(b + "ada_lin.1", blk["ada_lin"], 6))
    sd.update(official_buffers(cfg))
    check_state_dict(sd, expected_shapes(cfg), what="exported VAR state dict (params do not match config)")
    return sd


def _check_tree(params: Any, cfg: VARConfig, where) -> dict:
    """Names and shapes of an Orbax params tree against the configured model (strict)."""
    want = abstract_params(cfg)
    got_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    want_flat = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(want)}
    check_state_dict(got_flat, want_flat, what=f"Orbax params at {where}")
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)


def load_checkpoint(path: str | os.PathLike, cfg: VARConfig) -> dict[str, Any]:
    """An official ``.pth`` file (bare or wrapped state dict, read without executing pickled code)
    or an Orbax params directory (``cca_jax.checkpoint.export_params``, local or gs://) -> params."""
    spath = os.fspath(path)
    if is_directory(spath):
        from cca_jax import checkpoint as ckpt_lib

        tree = ckpt_lib.load_params(spath)
        if isinstance(tree, Mapping) and "params" in tree and "blocks_0" not in tree:
            tree = tree["params"]
        return _check_tree(tree, cfg, spath)
    return from_state_dict(load_official_state_dict(spath), cfg)


def official_keys(cfg: VARConfig) -> dict[str, Any]:
    """Pytree shaped like the params whose leaves are the official state-dict key each param
    comes from (q/k/v kernels all map to ``mat_qkv.weight``). Used by VAR's name-based
    weight-decay rule (optim.var_decay)."""
    abstract = abstract_params(cfg)
    names = {"kernel": "weight", "embedding": "weight", "scale_mul": "scale_mul_1H11"}

    def key_of(path, _):
        parts = [getattr(p, "key", str(p)) for p in path]
        out = []
        for i, part in enumerate(parts):
            if part.startswith("blocks_"):
                out += ["blocks", part.split("_", 1)[1]]
            elif part in ("query", "key", "value"):
                out.append("mat_qkv")
            elif part == "ada_lin":
                out += ["ada_lin", "1"]
            elif part == "shared_ada_lin":
                out += ["shared_ada_lin", "1"]
            else:
                out.append(names.get(part, part) if i == len(parts) - 1 else part)
        return ".".join(out)

    return jax.tree_util.tree_map_with_path(key_of, abstract)


def decay_mask(cfg: VARConfig) -> dict[str, Any]:
    """VAR ``filter_params`` as a pytree of bools shaped like the params (True = decays)."""
    from cca_jax.optim import var_decay

    shapes = expected_shapes(cfg)
    return jax.tree_util.tree_map(lambda k: bool(var_decay(k, len(shapes[k]))), official_keys(cfg))
