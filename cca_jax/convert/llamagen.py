"""Official LlamaGen c2i GPT state dicts <-> :mod:`cca_jax.models.llamagen` params pytrees.

PyTorch ``Linear.weight`` is ``[out, in]`` and a Flax kernel ``[in, out]``: every linear weight is
transposed, nothing else changes (``wqkv`` stays fused, its ``[q | k | v]`` row blocks become the
kernel's column blocks). The mapping is a bijection, so ``to_state_dict(from_state_dict(sd))``
reproduces ``sd`` bit for bit. Spec: ../shared/spec/llamagen.md §7.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import numpy as np

from cca_jax.convert import common
from cca_jax.models.llamagen import LlamaGenConfig

# Entries that are not weights of the model: the RoPE table some copies register as a buffer, and
# the KV-cache buffers a state dict taken after sampling contains.
IGNORE_KEYS = ("freqs_cis",)
IGNORE_PATTERNS = (".attention.kv_cache.",)

# (n_layer, n_head, dim) of the sizes the official code trains with FSDP: their files (c2i_XXL_384,
# c2i_3B_384 and the CCA fine-tunes of them) are bare state dicts, the others {"model": sd}
FSDP_ARCHITECTURES = {(48, 24, 1536): "XXL", (48, 40, 2560): "XXXL", (24, 32, 3200): "3B"}


def official_wrap(cfg: LlamaGenConfig) -> Optional[str]:
    """The layout of the official files of this architecture: None (bare) for XXL/XXXL/3B,
    ``"model"`` otherwise (spec llamagen.md §7.2)."""
    return None if (cfg.n_layer, cfg.n_head, cfg.dim) in FSDP_ARCHITECTURES else "model"


_LINEARS = (("attention", "wqkv"), ("attention", "wo"),
            ("feed_forward", "w1"), ("feed_forward", "w2"), ("feed_forward", "w3"))
_NORMS = ("attention_norm", "ffn_norm")


def expected_shapes(cfg: LlamaGenConfig) -> dict[str, tuple[int, ...]]:
    """Official state-dict keys and shapes for ``cfg`` (4 + 7·n_layer entries)."""
    D, F, V = cfg.dim, cfg.ffn_hidden_dim, cfg.vocab_size
    qkv = (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim
    out = {"cls_embedding.embedding_table.weight": (cfg.class_rows, D),
           "tok_embeddings.weight": (V, D),
           "norm.weight": (D,),
           "output.weight": (V, D)}
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        out[p + "attention.wqkv.weight"] = (qkv, D)
        out[p + "attention.wo.weight"] = (D, D)
        out[p + "feed_forward.w1.weight"] = (F, D)
        out[p + "feed_forward.w3.weight"] = (F, D)
        out[p + "feed_forward.w2.weight"] = (D, F)
        out[p + "attention_norm.weight"] = (D,)
        out[p + "ffn_norm.weight"] = (D,)
    return out


def _strip_ignored(sd: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sd.items()
            if k not in IGNORE_KEYS and not any(p in k for p in IGNORE_PATTERNS)}


def _check_rope_table(sd: Mapping[str, Any], cfg: LlamaGenConfig) -> None:
    """A ``freqs_cis`` entry is not loaded, but its shape ``[cls + block_size, head_dim/2, 2]`` is
    the one place a file records its image size: every weight of a 256-px model has the shape of
    the 384-px one's."""
    if "freqs_cis" not in sd:
        return
    shape = tuple(np.shape(sd["freqs_cis"]))
    want = (cfg.cls_token_num + cfg.block_size, cfg.head_dim // 2)
    if len(shape) >= 2 and shape[:2] != want:
        raise common.CheckpointMismatchError(
            f"LlamaGen checkpoint: its RoPE table freqs_cis {shape} covers {shape[0]} positions "
            f"({shape[1]} rotary pairs), the config {want[0]} ({want[1]}): the file is for another "
            f"image size or head size. Check config.model.block_size (= (image_size/16)², now "
            f"{cfg.block_size}) and the model size.")


def from_state_dict(sd: Mapping[str, Any], cfg: LlamaGenConfig) -> dict:
    """Official state dict (numpy or torch values) -> params pytree (float32 numpy leaves).

    Strict: any missing, unexpected or mis-shaped key raises ``CheckpointMismatchError`` naming it
    (``freqs_cis`` and ``layers.*.attention.kv_cache.*`` buffers are ignored).
    """
    _check_rope_table(sd, cfg)
    sd = common.to_numpy_state_dict(_strip_ignored(sd))
    common.check_state_dict(sd, expected_shapes(cfg), what="LlamaGen checkpoint")
    f32 = lambda a: np.asarray(a, np.float32)
    params: dict[str, Any] = {
        "cls_embedding": {"embedding_table": {"embedding": f32(sd["cls_embedding.embedding_table.weight"])}},
        "tok_embeddings": {"embedding": f32(sd["tok_embeddings.weight"])},
        "norm": {"weight": f32(sd["norm.weight"])},
        "output": {"kernel": f32(sd["output.weight"]).T.copy()},
    }
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        layer: dict[str, Any] = {"attention": {}, "feed_forward": {}}
        for mod, lin in _LINEARS:
            layer[mod][lin] = {"kernel": f32(sd[f"{p}{mod}.{lin}.weight"]).T.copy()}
        for n in _NORMS:
            layer[n] = {"weight": f32(sd[f"{p}{n}.weight"])}
        params[f"layers_{i}"] = layer
    return params


def to_state_dict(params: Mapping[str, Any], cfg: LlamaGenConfig) -> dict[str, np.ndarray]:
    """Params pytree -> official state dict ``{key: float32 np.ndarray}`` in PyTorch layout."""
    f32 = lambda a: np.asarray(a, np.float32)
    sd = {"cls_embedding.embedding_table.weight": f32(params["cls_embedding"]["embedding_table"]["embedding"]),
          "tok_embeddings.weight": f32(params["tok_embeddings"]["embedding"])}
    for i in range(cfg.n_layer):
        layer = params[f"layers_{i}"]
        p = f"layers.{i}."
        for mod, lin in _LINEARS:
            sd[f"{p}{mod}.{lin}.weight"] = np.ascontiguousarray(f32(layer[mod][lin]["kernel"]).T)
        for n in _NORMS:
            sd[f"{p}{n}.weight"] = f32(layer[n]["weight"])
    sd["norm.weight"] = f32(params["norm"]["weight"])
    sd["output.weight"] = np.ascontiguousarray(f32(params["output"]["kernel"]).T)
    common.check_state_dict(sd, expected_shapes(cfg), what="exported LlamaGen params")
    return sd


def _load_orbax_params(path: str | os.PathLike) -> Any:
    """Params from an Orbax params directory (local or gs://, ``checkpoint.export_params``)."""
    from cca_jax import checkpoint as ckpt_lib

    tree = ckpt_lib.load_params(os.fspath(path))
    return tree["params"] if isinstance(tree, Mapping) and "params" in tree and \
        "tok_embeddings" not in tree else tree


def _check_params(params: Any, cfg: LlamaGenConfig, what: str) -> dict:
    params = dict(params)
    try:
        sd = to_state_dict(params, cfg)
    except KeyError as e:
        raise common.CheckpointMismatchError(
            f"{what} lacks param {e} expected by the configured LlamaGen model; check config.model.")
    return from_state_dict(sd, cfg)


def load_checkpoint(path: str | os.PathLike, cfg: LlamaGenConfig) -> dict:
    """Params from an official ``.pt``/``.pth`` file (``{"model": sd}``, ``{"module"|"state_dict": sd}``
    or a bare FSDP state dict; loaded without executing pickled code) or an Orbax params dir."""
    if common.is_directory(path):
        return _check_params(_load_orbax_params(path), cfg, f"Orbax checkpoint {os.fspath(path)}")
    return from_state_dict(common.load_official_state_dict(path), cfg)


def save_official(params: Mapping[str, Any], cfg: LlamaGenConfig, path: str | os.PathLike, *,
                  wrap: Optional[str] = "auto") -> None:
    """Writes ``params`` as an official file: ``{"model": sd}`` (DDP layout) or the bare state dict
    (``wrap=None``, FSDP layout); ``"auto"``: the layout of this size's official files."""
    wrap = official_wrap(cfg) if wrap == "auto" else wrap
    common.save_torch_file(to_state_dict(params, cfg), path, wrap=wrap)
