"""Model-family adapters: what the train step needs from LlamaGen or VAR, behind one interface.

A :class:`Family` gives the step

* ``logits(params, tokens_BL, labels_B, *, train, rng, dtype, aux) -> [B, L, V]`` float32, where
  ``logits[:, t]`` scores ``tokens_BL[:, t]`` (teacher forcing);
* ``num_tokens`` (L), ``null_label``, ``last_l`` (tokens of the last VAR scale, for ``Lt``);
* parameter init (boxed with logical names, for ``sharding.sharded_init``), loading from an
  official file or an Orbax params dir, and the state-dict key of every parameter (used by the
  weight-decay rules and by parity tests);
* ``aux``: frozen non-trained inputs of ``logits`` (VAR: the VQVAE quantiser params that turn
  token ids into the teacher-forcing input, cca.md §6.2; LlamaGen: none).

Token layouts: LlamaGen ``tokens [B, N]`` raster VQ-16 codes (N = block_size); VAR ``tokens [B, L]``
the multi-scale indices of all scales concatenated (L = Σ pn²), as the tokenize job writes them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cca_jax import optim, sharding

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(name: str, field: str = "config.train.compute_dtype"):
    if name not in _DTYPES:
        raise ValueError(f"{field}={name!r}; expected one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def _path_str(path) -> list[str]:
    out = []
    for k in path:
        out.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return out


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family bound to its model config (see module doc)."""

    name: str
    model_cfg: Any
    null_label: int
    num_tokens: int
    vocab_size: int
    num_classes: int
    last_l: int
    remat: bool
    init_boxed: Callable[[jax.Array], Any]  # rng -> boxed params
    _apply: Callable[..., jax.Array]
    _official_key: Callable[[list[str]], str]
    _expected_shapes: Callable[[], dict]
    _load: Callable[[str], Any]
    _to_state_dict: Callable[[Any], dict]
    _make_aux: Callable[[Any, jax.Array], Any]
    # modules whose kernels the model multiplies in float32 whatever the compute dtype
    float32_kernels: tuple[str, ...] = ()

    # ---- forward -------------------------------------------------------------------------
    def logits(self, params, tokens_BL: jax.Array, labels_B: jax.Array, *, train: bool,
               rng: Optional[jax.Array], dtype=jnp.float32, aux: Any = None) -> jax.Array:
        """Teacher-forcing logits ``[B, L, V]`` float32; ``rng`` feeds the 'dropout' stream."""
        return self._apply(params, tokens_BL, labels_B, train=train, rng=rng, dtype=dtype, aux=aux)

    # ---- params ----------------------------------------------------------------------------
    def abstract_params(self) -> Any:
        """Boxed ``ShapeDtypeStruct`` tree (logical names kept) — nothing is allocated."""
        return jax.eval_shape(self.init_boxed, jax.random.key(0))

    def init_params(self, rng: jax.Array) -> Any:
        return sharding.strip_boxes(self.init_boxed(rng))

    def load_params(self, path: str) -> Any:
        """Host (numpy) float32 params from an official file or an Orbax params dir."""
        return self._load(path)

    def to_state_dict(self, params) -> dict:
        """Official ``{key: np.ndarray}`` (torch layout) of a params-shaped tree (params or grads)."""
        return self._to_state_dict(params)

    def official_keys(self, params) -> Any:
        """Pytree like ``params`` whose leaves are the official state-dict key each leaf lands in
        (several leaves may share one key, e.g. VAR's q/k/v kernels -> ``mat_qkv.weight``)."""
        shapes = self._expected_shapes()

        def key(path, _):
            k = self._official_key(_path_str(path))
            if k not in shapes:
                raise KeyError(f"{self.name}: param {'/'.join(_path_str(path))} maps to {k!r}, "
                               "which is not an official state-dict key; update families.py.")
            return k

        return jax.tree_util.tree_map_with_path(key, nn.meta.unbox(params))

    def decay_mask(self, params, rule: str) -> Any:
        """Pytree of bools: which leaves get weight decay (``config.optim.decay_rule``).

        ``ndim``: official tensor has >= 2 dims (LlamaGen); ``var``: VAR's ``filter_params``
        rule on the official key. Both are judged on the official key/shape, so layout choices
        of our modules (e.g. q_bias stored ``[H, D]``) cannot change the partition.
        """
        shapes = self._expected_shapes()
        keys = self.official_keys(params)
        if rule == "ndim":
            return jax.tree_util.tree_map(lambda k: optim.ndim_decay(len(shapes[k])), keys)
        if rule == "var":
            return jax.tree_util.tree_map(lambda k: optim.var_decay(k, len(shapes[k])), keys)
        raise ValueError(f"config.optim.decay_rule={rule!r}; expected one of {optim.DECAY_RULES}.")

    # ---- aux ---------------------------------------------------------------------------------
    def make_aux(self, config, rng: jax.Array) -> Any:
        """Frozen inputs of ``logits`` (VAR: VQVAE quantiser params; LlamaGen: None)."""
        return self._make_aux(config, rng)

    # ---- FLOPs ---------------------------------------------------------------------------------
    def matmul_params(self) -> int:
        """Parameters that take part in matmuls per token (embedding tables excluded)."""
        total = 0
        for path, x in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(self.abstract_params())):
            names = _path_str(path)
            # AdaLN projections act once per sample on the class vector, not per token
            if names[-1] == "kernel" and not any("ada_lin" in n for n in names):
                total += int(np.prod(x.shape))
        return total


# ================================================================================== LlamaGen

def _llamagen_key(names: list[str]) -> str:
    s = ".".join(names)
    s = re.sub(r"layers_(\d+)", r"layers.\1", s)
    s = re.sub(r"\.(kernel|embedding)$", ".weight", s)
    return s


def llamagen_family(model_cfg_dict: dict, *, keep_dropout: bool = True, remat: bool = False) -> Family:
    from cca_jax.convert import llamagen as conv
    from cca_jax.models import llamagen as lg

    cfg = lg.LlamaGenConfig.from_config(model_cfg_dict)
    if not keep_dropout:  # official: every Dropout p=0, label dropout prob kept (cca.md §5.1)
        cfg = dataclasses.replace(cfg, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
                                  attn_dropout_p=0.0, drop_path_rate=0.0)

    def apply(params, tokens_BL, labels_B, *, train, rng, dtype, aux):
        del aux
        rngs = {"dropout": rng} if rng is not None else {}
        model = lg.Transformer(cfg, dtype=dtype, remat=remat)
        return model.apply({"params": params}, labels_B, tokens_BL[:, :-1], train, rngs=rngs)

    return Family(
        name="llamagen", model_cfg=cfg, null_label=cfg.null_class, num_tokens=cfg.block_size,
        vocab_size=cfg.vocab_size, num_classes=cfg.num_classes, last_l=cfg.block_size, remat=remat,
        init_boxed=functools.partial(lg.init_params, cfg, boxed=True), _apply=apply,
        _official_key=_llamagen_key, _expected_shapes=lambda: conv.expected_shapes(cfg),
        _load=lambda path: conv.load_checkpoint(path, cfg),
        _to_state_dict=lambda p: conv.to_state_dict(p, cfg),
        _make_aux=lambda config, rng: None)


# ======================================================================================= VAR

def _var_key(names: list[str]) -> str:
    s = ".".join(names)
    s = re.sub(r"blocks_(\d+)", r"blocks.\1", s)
    s = re.sub(r"\.(kernel|embedding)$", ".weight", s)
    s = re.sub(r"attn\.(query|key|value)\.weight$", "attn.mat_qkv.weight", s)
    s = s.replace("ada_lin.", "ada_lin.1.")
    s = re.sub(r"attn\.scale_mul$", "attn.scale_mul_1H11", s)
    return s


def _vq_config(tokenizer_dict: dict, vcfg):
    """The VQVAE config of ``config.tokenizer``, checked against the VAR model config."""
    from cca_jax.models import vqvae

    if tokenizer_dict.get("family") == "vqvae":
        vq = vqvae.VQVAEConfig.from_config(tokenizer_dict)
    else:  # tests / smoke runs without a tokenizer section: only the quantiser is used
        vq = vqvae.VQVAEConfig(vocab_size=vcfg.vocab_size, z_channels=vcfg.Cvae,
                               patch_nums=vcfg.patch_nums)
    for name, have, want in (("vocab_size", vq.vocab_size, vcfg.vocab_size),
                             ("z_channels (Cvae)", vq.z_channels, vcfg.Cvae),
                             ("patch_nums", tuple(vq.patch_nums), tuple(vcfg.patch_nums))):
        if have != want:
            raise ValueError(f"config.tokenizer {name}={have} but config.model expects {want}; "
                             "make config.model and config.tokenizer agree.")
    return vq


def _quantizer_only(params) -> dict:
    """The part of the VQVAE params that ``idxBl_to_var_input`` reads (the quantiser: codebook,
    Φ convs and its small usage buffer); the encoder/decoder are not kept on device."""
    return {"quantize": dict(params["quantize"])}


def _var_aux(config, rng, vq_cfg):
    """VQVAE quantiser params for ``idxBl_to_var_input``: from ``config.init.tokenizer_checkpoint``,
    or a random init for from-scratch / synthetic smoke runs."""
    from cca_jax.models import vqvae

    path = config.init.get("tokenizer_checkpoint", "")
    if path:
        from cca_jax.convert import vqvae as vconv
        if not os.path.exists(path) and "://" not in path:
            raise FileNotFoundError(f"config.init.tokenizer_checkpoint={path!r} does not exist; "
                                    "point it at vae_ch160v4096z32.pth (or an Orbax params dir).")
        return _quantizer_only(vconv.load_checkpoint(path, vq_cfg))
    if config.init.get("from_scratch", False) or config.data.source == "synthetic":
        C = vq_cfg.z_channels
        init = jax.jit(lambda r: sharding.strip_boxes(vqvae.Quantizer(vq_cfg).init(
            r, jnp.zeros((1, 1, 1, C), jnp.float32))["params"]))
        return _quantizer_only({"quantize": init(rng)})
    raise ValueError(
        "VAR training needs the VQVAE to build teacher-forcing inputs: set "
        "config.init.tokenizer_checkpoint to vae_ch160v4096z32.pth (or an Orbax params dir).")


def var_family(model_cfg_dict: dict, tokenizer_dict: Optional[dict] = None, *,
               keep_dropout: bool = True, remat: bool = False) -> Family:
    from cca_jax.convert import var as conv
    from cca_jax.models import var as var_lib

    vcfg = var_lib.VARConfig.from_config(model_cfg_dict)
    if not keep_dropout:
        vcfg = dataclasses.replace(vcfg, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)
    vq_cfg = _vq_config(dict(tokenizer_dict or {}), vcfg)

    def apply(params, tokens_BL, labels_B, *, train, rng, dtype, aux):
        x_BLCv = var_teacher_input(aux, tokens_BL, vq_cfg)
        rngs = {"dropout": rng} if rng is not None else {}
        model = var_lib.VAR(vcfg, dtype=dtype, remat=remat)
        return model.apply({"params": params}, labels_B, x_BLCv, train, rngs=rngs)

    buffers = set(conv.official_buffers(vcfg))
    return Family(
        name="var", model_cfg=vcfg, null_label=vcfg.num_classes, num_tokens=vcfg.L,
        vocab_size=vcfg.vocab_size, num_classes=vcfg.num_classes,
        last_l=vcfg.patch_nums[-1] ** 2, remat=remat,
        init_boxed=functools.partial(var_lib.init_boxed, vcfg), _apply=apply,
        _official_key=_var_key,
        _expected_shapes=lambda: {k: v for k, v in conv.expected_shapes(vcfg).items()
                                  if k not in buffers},
        _load=lambda path: conv.load_checkpoint(path, vcfg),
        _to_state_dict=lambda p: {k: v for k, v in conv.to_state_dict(p, vcfg).items()
                                  if k not in buffers},
        _make_aux=lambda config, rng: _var_aux(config, rng, vq_cfg),
        float32_kernels=var_lib.FLOAT32_KERNELS)


def var_teacher_input(vq_params, tokens_BL: jax.Array, vq_cfg) -> jax.Array:
    """``[B, L - first_l, Cvae]`` teacher-forcing input from concatenated multi-scale indices."""
    from cca_jax.models import vqvae

    return jax.lax.stop_gradient(vqvae.idxBl_to_var_input(vq_params, vq_cfg, tokens_BL))


# ==================================================================================== factory

FAMILIES = {"llamagen": llamagen_family, "var": var_family}


def from_config(config) -> Family:
    """The family of ``config.model.family`` with ``config.train.keep_dropout`` / ``remat``."""
    model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    fam = model.get("family")
    if fam not in FAMILIES:
        raise ValueError(f"config.model.family={fam!r}; expected one of {sorted(FAMILIES)}.")
    kw = dict(keep_dropout=bool(config.train.keep_dropout),
              remat=bool(config.train.get("remat", False)))
    if fam == "var":
        tok = config.get("tokenizer") or {}
        kw["tokenizer_dict"] = tok.to_dict() if hasattr(tok, "to_dict") else dict(tok)
    return FAMILIES[fam](model, **kw)
