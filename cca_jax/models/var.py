"""VAR: the next-scale-prediction transformer of FoundationVision/VAR, as a pure Flax linen model.

One module serves both uses:

* teacher forcing (training, CCA log-likelihoods)::

      logits_BLV = VAR(cfg).apply({'params': p}, label_B, x_BLCv_wo_first_l, train=False)

  ``label_B [B]`` int (``cfg.num_classes`` is the null class), ``x_BLCv_wo_first_l
  [B, L - first_l, Cvae]`` the multi-scale teacher-forcing input (``idxBl_to_var_input`` of the
  VQVAE), logits ``[B, L, V]`` float32; position ``l`` predicts token ``l`` (no shift). A shorter
  input ``[B, end - first_l, Cvae]`` runs the prefix of the first scales (used by the recompute
  sampler).
* per-scale KV-cached decoding (sampling)::

      caches = init_cache(cfg, B)
      logits_BlV, caches = model.apply({'params': p}, label_B, x_BlCv, caches, si,
                                       method=VAR.decode_scale)

  ``si`` is a Python int (static), so each scale writes its keys/values at a static offset of a
  static-size cache and attends to a static slice of it.

Shapes: ``B`` batch, ``L`` tokens of all scales (``sum(pn**2)``), ``l`` tokens of one scale,
``C`` width, ``H`` heads, ``D`` head dim (64 for every official model), ``V`` vocab,
``Cvae`` VQVAE latent channels, ``S`` number of scales.

Parameter tree (names matter to the converter and to VAR's weight-decay rule, which excludes
names ending in ``bias`` and containing ``pos_1LC``, ``pos_start``, ``lvl_embed``, ``ada_gss``,
``scale_mul``)::

    class_emb/embedding [N+1, C]     pos_start [first_l, C]     pos_1LC [L, C]
    lvl_embed/embedding [S, C]       word_embed/{kernel [Cvae, C], bias [C]}
    shared_ada_lin/{kernel [C, 6, C], bias [6, C]}                     (shared_aln only)
    blocks_i/attn/{query,key,value}/kernel [C, H, D], q_bias, v_bias [H, D], scale_mul [H],
             proj/{kernel [H, D, C], bias [C]}
    blocks_i/ffn/{fc1/{kernel [C, F], bias [F]}, fc2/{kernel [F, C], bias [C]}}
    blocks_i/ada_lin/{kernel [C, 6, C], bias [6, C]}   or   blocks_i/ada_gss [6, C] (shared_aln)
    head_nm/ada_lin/{kernel [C, 2, C], bias [2, C]}      head/{kernel [C, V], bias [V]}

The 6 modulation rows are, in order, gamma1, gamma2, scale1, scale2, shift1, shift2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cca_jax.models import layers, matmul
from cca_jax.models.attention import KVCache, attend, attend_block_causal
from cca_jax.models.vqvae import ScaleSchedule

DEFAULT_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
# modules whose kernels multiply in float32 whatever the compute dtype (the embedding of the
# VQ features and the head's AdaLN, as autocast leaves them); matmul.cast_kernels keeps them
FLOAT32_KERNELS = ("word_embed", "head_nm")
MAX_SCALE_MUL = math.log(100.0)  # attn_l2_norm: per-head logit multiplier clamped at 100
# teacher forcing attends by query blocks of whole scales, merged up to this many rows: tiny
# scales alone would only add ops (bench/attention.py: 64 rows ~ per-scale speed, 5 blocks at L=680)
ATTN_BLOCK_ROWS = 64


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

# ``VAR.__init__`` defaults that differ from VARConfig's (the CCA/VAR recipe values)
OFFICIAL_CTOR_DEFAULTS = {"attn_l2_norm": False, "cond_drop_rate": 0.1}


@dataclasses.dataclass(frozen=True)
class VARConfig(ScaleSchedule):
    """Hyper-parameters of the official ``VAR`` constructor plus ``init_weights``' arguments."""

    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    vocab_size: int = 4096  # VQVAE codebook size V
    Cvae: int = 32  # VQVAE latent channels (z_channels)
    num_classes: int = 1000  # class table has num_classes + 1 rows; the last is the null class
    patch_nums: tuple[int, ...] = DEFAULT_PATCH_NUMS
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.0  # label -> null class with this probability (see VAR.__call__)
    drop_rate: float = 0.0  # dropout after attn proj and after the FFN
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # max stochastic depth; block i gets linspace(0, max, depth)[i]
    # init_weights(init_adaln, init_adaln_gamma, init_head, init_std); init_std < 0: sqrt(1/(3C))
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"VAR embed_dim {self.embed_dim} is not a multiple of num_heads "
                             f"{self.num_heads}; fix config.model.embed_dim / num_heads.")
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if not self.patch_nums or min(self.patch_nums) < 1:
            raise ValueError(f"VAR patch_nums {self.patch_nums} must be positive integers; "
                             "fix config.model.patch_nums.")

    # ---- derived sizes ----
    @property
    def C(self) -> int:
        return self.embed_dim

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return int(round(self.embed_dim * self.mlp_ratio))

    @property
    def std(self) -> float:
        """init_std as init_weights resolves it (negative -> sqrt(1/(3C)))."""
        return self.init_std if self.init_std >= 0 else math.sqrt(1.0 / self.embed_dim / 3.0)

    @property
    def drop_path_rates(self) -> tuple[float, ...]:
        # torch.linspace in float32, as the official constructor
        return tuple(float(x) for x in np.linspace(0.0, self.drop_path_rate, self.depth, dtype=np.float32))

    def lvl_1L(self) -> np.ndarray:
        """``[L]`` scale index of every token."""
        return np.concatenate([np.full(p * p, i, np.int64) for i, p in enumerate(self.patch_nums)])

    def block_causal_mask(self, end: Optional[int] = None) -> np.ndarray:
        """``[end, end]`` bool: query attends to key iff lvl(query) >= lvl(key)."""
        lvl = self.lvl_1L()[: end or self.L]
        return lvl[:, None] >= lvl[None, :]

    # ---- constructors ----
    @classmethod
    def from_depth(cls, depth: int, *, dpr_ratio: float = 1.0, **overrides) -> "VARConfig":
        """The official builder: width 64*depth, heads = depth, max drop path dpr_ratio*0.1*depth/24."""
        kw = dict(depth=depth, embed_dim=64 * depth, num_heads=depth, mlp_ratio=4.0,
                  drop_path_rate=dpr_ratio * 0.1 * depth / 24)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_official_args(cls, var_args: Mapping[str, Any], vqvae_args: Mapping[str, Any] | None = None,
                           **overrides) -> "VARConfig":
        """From the official ``VAR(...)`` keyword arguments (fixture json ``var_args``) and the
        VQVAE's (``vqvae_args``: vocab_size, z_channels) which fix V and Cvae. Arguments left out
        take the ``VAR.__init__`` defaults (``attn_l2_norm=False``, ``cond_drop_rate=0.1``), not
        this class's recipe defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {**OFFICIAL_CTOR_DEFAULTS, **{k: v for k, v in var_args.items() if k in names}}
        if vqvae_args is not None:
            kw["vocab_size"] = int(vqvae_args["vocab_size"])
            kw["Cvae"] = int(vqvae_args["z_channels"])
        kw.update(overrides)
        if "patch_nums" in kw:
            kw["patch_nums"] = tuple(kw["patch_nums"])
        return cls(**kw)

    @classmethod
    def from_config(cls, config) -> "VARConfig":
        """From ``config.model`` (or a full config holding ``.model``); see configs/var_common.py.

        ``embed_dim`` / ``num_heads`` default to the builder's 64*depth / depth.
        """
        m = config.model if "model" in config else config
        m = dict(m.to_dict() if hasattr(m, "to_dict") else m)
        family = m.pop("family", "var")
        if family != "var":
            raise ValueError(f"config.model.family is {family!r}, expected 'var' for VARConfig.")
        depth = int(m.get("depth", 16))
        m.setdefault("embed_dim", 64 * depth)
        m.setdefault("num_heads", depth)
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in m.items() if k in names}
        if "patch_nums" in kw:
            kw["patch_nums"] = tuple(kw["patch_nums"])
        return cls(**kw)


# --------------------------------------------------------------------------------------------
# initialisers (init_weights semantics)
# --------------------------------------------------------------------------------------------

def _trunc_normal(std: float, mult: float = 1.0):
    """torch ``trunc_normal_(std=std)`` (cut at absolute +-2), times ``mult``.

    For every official std the cut is > 100 sigma away, i.e. never reached; a plain normal is
    then the same distribution and much cheaper to compile than the inverse-CDF sampler.
    """
    def init(key, shape, dtype=jnp.float32):
        if 2.0 / std > 8.0:
            x = jax.random.normal(key, shape, jnp.float32) * std
        else:
            x = jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, jnp.float32) * std
        return (x * mult).astype(dtype)
    return init


def _ada_lin_init(std: float, init_adaln: float, init_adaln_gamma: float):
    """``[D, 6, C]``: rows gamma1/gamma2 scaled by init_adaln_gamma, the other 4 by init_adaln."""
    def init(key, shape, dtype=jnp.float32):
        w = _trunc_normal(std)(key, shape)
        mult = jnp.array([init_adaln_gamma] * 2 + [init_adaln] * (shape[1] - 2), jnp.float32)
        return (w * mult[None, :, None]).astype(dtype)
    return init


def _ada_gss_init(init_adaln: float, init_adaln_gamma: float):
    def init(key, shape, dtype=jnp.float32):
        w = jax.random.normal(key, shape, jnp.float32) / math.sqrt(shape[-1])
        mult = jnp.array([init_adaln_gamma] * 2 + [init_adaln] * (shape[0] - 2), jnp.float32)
        return (w * mult[:, None]).astype(dtype)
    return init


def _part(init, names):
    return nn.with_logical_partitioning(init, names)


_zeros = nn.initializers.zeros


class HeadsDense(nn.Module):
    """Dense over the last ``in_axes`` axes to ``features`` (kernel ``[*in, *features]``).

    Like ``nn.DenseGeneral`` but the kernel is initialised in its full shape: DenseGeneral calls
    its initialiser on a flattened 2-D shape, which breaks rank-3 logical-partitioning boxes once
    a mesh is active (``sharding.use_mesh``).
    """

    features: tuple
    kernel_init: Any
    in_axes: int = 1
    bias_init: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.in_axes:]
        kernel = self.param("kernel", self.kernel_init, tuple(in_shape) + tuple(self.features),
                            jnp.float32)
        y = matmul.dense(x, kernel, in_axes=self.in_axes, dtype=self.dtype)
        if self.bias_init is not None:
            bias = self.param("bias", self.bias_init, tuple(self.features), jnp.float32)
            y = matmul.add_bias(y, bias)
        return y


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------

def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters, in float32 (torch semantics: biased variance)."""
    x = x.astype(jnp.float32)
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps)


def _l2_normalize(x: jax.Array) -> jax.Array:
    """``F.normalize(x, dim=-1)``: x / max(||x||, 1e-12), in float32."""
    x = x.astype(jnp.float32)
    n = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(n, 1e-12)


class AdaLinear(nn.Module):
    """SiLU -> Linear(D -> n*C) viewed ``[B, n, C]`` (``ada_lin`` of blocks and of the head)."""

    n: int
    features: int
    kernel_init: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, cond_BD: jax.Array) -> jax.Array:
        D = cond_BD.shape[-1]
        kernel = self.param("kernel", _part(self.kernel_init, ("embed", None, "norm")),
                            (D, self.n, self.features), jnp.float32)
        bias = self.param("bias", _part(_zeros, (None, "norm")), (self.n, self.features), jnp.float32)
        h = jax.nn.silu(cond_BD.astype(self.dtype))
        out = matmul.einsum("bd,dnc->bnc", h, kernel, dtype=self.dtype)
        return matmul.add_bias(out, bias)


class SelfAttention(nn.Module):
    """VAR ``SelfAttention``: q/v biases, zero k bias, optional L2-normalised q/k with a clamped
    learnable per-head scale; block-causal by scale (teacher forcing: ``level_L`` is the static
    ``[L]`` scale index of each token) or over a KV cache (decoding)."""

    cfg: VARConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BLC: jax.Array, level_L: Optional[np.ndarray], train: bool,
                 cache_start: Optional[int] = None, cache: Optional[KVCache] = None):
        cfg, C, H, D = self.cfg, self.cfg.C, self.cfg.num_heads, self.cfg.head_dim
        qkv_init = _part(_trunc_normal(cfg.std), ("embed", "heads", "kv"))

        def proj_in(name):
            return HeadsDense((H, D), qkv_init, dtype=self.dtype, name=name)(x_BLC)

        q_bias = self.param("q_bias", _part(_zeros, ("heads", "kv")), (H, D), jnp.float32)
        v_bias = self.param("v_bias", _part(_zeros, ("heads", "kv")), (H, D), jnp.float32)
        q = matmul.add_bias(proj_in("query"), q_bias)
        k = proj_in("key")  # the official zero_k_bias buffer adds nothing
        v = matmul.add_bias(proj_in("value"), v_bias)
        names = ("act_batch", "act_length", "act_heads", "act_kv")
        q, k, v = (nn.with_logical_constraint(t, names) for t in (q, k, v))

        if cfg.attn_l2_norm:
            scale_mul = self.param("scale_mul", _part(nn.initializers.constant(math.log(4.0)), ("heads",)),
                                   (H,), jnp.float32)
            mult_H = jnp.exp(jnp.minimum(scale_mul, MAX_SCALE_MUL))
            q = (_l2_normalize(q) * mult_H[:, None]).astype(self.dtype)
            k = _l2_normalize(k).astype(self.dtype)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(D)

        deterministic = not train or cfg.attn_drop_rate == 0.0
        drop = dict(dropout_rate=cfg.attn_drop_rate, deterministic=deterministic,
                    dropout_rng=None if deterministic else self.make_rng("dropout"))
        new_cache = None
        if cache is not None:  # decoding: this scale's keys join the earlier scales' in the cache
            l = x_BLC.shape[1]
            new_cache = cache.update(k, v, cache_start)
            k = new_cache.k[:, : cache_start + l].astype(self.dtype)
            v = new_cache.v[:, : cache_start + l].astype(self.dtype)
            # every cached key (scales <= this one) is visible, as the official decoder
            out = attend(q, k, v, scale=scale, **drop)
        else:  # skips the masked 38 % of the [L, L] scores (bench/attention.py)
            out = attend_block_causal(q, k, v, level_L, min_rows=ATTN_BLOCK_ROWS, scale=scale, **drop)
        out = HeadsDense((C,), _part(_trunc_normal(cfg.std, 1.0 / math.sqrt(2 * cfg.depth)),
                                     ("heads", "kv", "embed")),
                         in_axes=2, bias_init=_part(_zeros, ("norm",)), dtype=self.dtype,
                         name="proj")(out)
        out = nn.Dropout(cfg.drop_rate)(out, deterministic=not train)
        return out, new_cache


class FFN(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (-> dropout)."""

    cfg: VARConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BLC: jax.Array, train: bool) -> jax.Array:
        cfg = self.cfg
        h = layers.dense(cfg.ffn_dim, ("embed", "mlp"), dtype=self.dtype, use_bias=True,
                         kernel_init=_trunc_normal(cfg.std), name="fc1")(x_BLC)
        h = nn.with_logical_constraint(jax.nn.gelu(h, approximate=True), ("act_batch", "act_length", "act_mlp"))
        out = layers.dense(cfg.C, ("mlp", "embed"), dtype=self.dtype, use_bias=True, bias_axes=("norm",),
                           kernel_init=_trunc_normal(cfg.std, 1.0 / math.sqrt(2 * cfg.depth)), name="fc2")(h)
        return nn.Dropout(cfg.drop_rate)(out, deterministic=not train)


class AdaLNSelfAttn(nn.Module):
    """One VAR block: x += DropPath(Attn(LN(x)(1+s1)+b1)*g1); x += DropPath(FFN(LN(x)(1+s2)+b2)*g2).

    ``cond`` is ``[B, D]`` (the class embedding) or, with shared_aln, the shared modulation
    ``[B, 6, C]``. Positional signature (remat's static args are ``train`` and ``cache_start``):
    ``(x_BLC, cond, train, cache_start, cache) -> (x_BLC, cache)``.
    """

    cfg: VARConfig
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BLC, cond, train: bool = False, cache_start: Optional[int] = None,
                 cache: Optional[KVCache] = None):
        cfg = self.cfg
        if cfg.shared_aln:
            gss = self.param("ada_gss", _part(_ada_gss_init(cfg.init_adaln, cfg.init_adaln_gamma), (None, "norm")),
                             (6, cfg.C), jnp.float32)
            mod = gss.astype(self.dtype)[None] + cond.astype(self.dtype)
        else:
            mod = AdaLinear(6, cfg.C, _ada_lin_init(cfg.std, cfg.init_adaln, cfg.init_adaln_gamma),
                            dtype=self.dtype, name="ada_lin")(cond)
        mod = mod[:, :, None, :]  # [B, 6, 1, C]: broadcast over tokens
        g1, g2, s1, s2, b1, b2 = (mod[:, i] for i in range(6))

        level_L = cfg.lvl_1L()[: x_BLC.shape[1]] if cache is None else None  # teacher forcing
        h = (layer_norm(x_BLC, cfg.norm_eps) * (1 + s1) + b1).astype(self.dtype)
        h, cache = SelfAttention(cfg, self.dtype, name="attn")(h, level_L, train, cache_start, cache)
        # timm per-sample stochastic depth on each branch (independent draws), train mode only
        x_BLC = x_BLC + layers.DropPath(self.drop_path_rate)(h * g1, deterministic=not train)

        h = (layer_norm(x_BLC, cfg.norm_eps) * (1 + s2) + b2).astype(self.dtype)
        h = FFN(cfg, self.dtype, name="ffn")(h, train) * g2
        x_BLC = x_BLC + layers.DropPath(self.drop_path_rate)(h, deterministic=not train)
        x_BLC = nn.with_logical_constraint(x_BLC, ("act_batch", "act_length", "act_embed"))
        return x_BLC, cache


class AdaLNBeforeHead(nn.Module):
    """LN(x)*(1+scale)+shift with (scale, shift) = ada_lin(cond); computed in float32."""

    cfg: VARConfig

    @nn.compact
    def __call__(self, x_BLC, cond_BD):
        cfg = self.cfg
        init = _trunc_normal(cfg.std, cfg.init_adaln)
        mod = AdaLinear(2, cfg.C, init, dtype=jnp.float32, name="ada_lin")(cond_BD.astype(jnp.float32))
        scale, shift = mod[:, 0:1], mod[:, 1:2]
        return layer_norm(x_BLC, cfg.norm_eps) * (1 + scale) + shift


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------

class VAR(nn.Module):
    """The VAR transformer (see module docstring). Params float32; ``dtype`` is the compute dtype
    of the blocks; embeddings and the head's AdaLN run in float32; logits are float32."""

    cfg: VARConfig
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cfg, C = self.cfg, self.cfg.C
        std = cfg.std
        self.class_emb = layers.embed(cfg.num_classes + 1, C, ("classes", "embed"),
                                      embedding_init=_trunc_normal(std))
        # pos_start / pos_1LC are drawn by the constructor with sqrt(1/(3C)) regardless of init_std
        ctor_std = math.sqrt(1.0 / C / 3.0)
        self.pos_start = self.param("pos_start", _part(_trunc_normal(ctor_std), ("scales", "embed")),
                                    (cfg.first_l, C), jnp.float32)
        self.pos_1LC = self.param("pos_1LC", _part(_trunc_normal(ctor_std), ("scales", "embed")),
                                  (cfg.L, C), jnp.float32)
        self.lvl_embed = layers.embed(cfg.num_scales, C, ("scales", "embed"), embedding_init=_trunc_normal(std))
        self.word_embed = layers.dense(C, (None, "embed"), use_bias=True, bias_axes=("norm",),
                                       kernel_init=_trunc_normal(std))
        if cfg.shared_aln:
            self.shared_ada_lin = AdaLinear(6, C, _trunc_normal(std), dtype=self.dtype)
        block_cls = nn.remat(AdaLNSelfAttn, static_argnums=(3, 4)) if self.remat else AdaLNSelfAttn
        self.blocks = [block_cls(cfg, rate, self.dtype) for rate in cfg.drop_path_rates]
        self.head_nm = AdaLNBeforeHead(cfg)
        self.head = layers.dense(cfg.vocab_size, ("embed", "vocab"), dtype=self.dtype, use_bias=True,
                                 # official: a negative init_head leaves the head unscaled
                                 kernel_init=_trunc_normal(std, cfg.init_head if cfg.init_head >= 0 else 1.0))

    # ---- pieces shared by both paths ----
    def _lvl_pos(self, begin: int, end: int) -> jax.Array:
        """``[end-begin, C]`` lvl_embed(lvl) + pos_1LC for tokens [begin, end)."""
        lvl = jnp.asarray(self.cfg.lvl_1L()[begin:end], jnp.int32)
        return self.lvl_embed(lvl) + self.pos_1LC[begin:end]

    def _cond(self, label_B):
        cond_BD = self.class_emb(jnp.asarray(label_B, jnp.int32))
        cond = self.shared_ada_lin(cond_BD) if self.cfg.shared_aln else cond_BD
        return cond_BD, cond

    def _logits(self, x_BLC, cond_BD):
        h = self.head_nm(x_BLC.astype(jnp.float32), cond_BD)
        logits = self.head(h.astype(self.dtype)).astype(jnp.float32)
        return nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))

    # ---- teacher forcing ----
    def __call__(self, label_B: jax.Array, x_BLCv_wo_first_l: jax.Array, train: bool = False) -> jax.Array:
        """``label_B [B]``, ``x_BLCv_wo_first_l [B, end-first_l, Cvae]`` -> logits ``[B, end, V]`` f32.

        ``end`` is normally L; a prefix of whole scales is allowed. Labels are replaced by the null
        class with prob ``cond_drop_rate`` whenever a ``'dropout'`` rng is given (train mode needs
        one), and always at rate 1: the official ``VAR.forward`` drops labels in eval mode too. Drop
        path is active in train mode only.
        """
        cfg = self.cfg
        B, n, cv = x_BLCv_wo_first_l.shape
        end = cfg.first_l + n
        if cv != cfg.Cvae or end > cfg.L:
            raise ValueError(f"VAR input has shape {x_BLCv_wo_first_l.shape}; expected [B, <= {cfg.L - cfg.first_l}, "
                             f"{cfg.Cvae}] (config.model.patch_nums / Cvae).")
        label_B = jnp.asarray(label_B, jnp.int32)
        if cfg.cond_drop_rate >= 1.0:
            label_B = jnp.full_like(label_B, cfg.num_classes)
        elif cfg.cond_drop_rate > 0.0 and (train or self.has_rng("dropout")):
            drop = jax.random.uniform(self.make_rng("dropout"), (B,)) < cfg.cond_drop_rate
            label_B = jnp.where(drop, cfg.num_classes, label_B)
        cond_BD, cond = self._cond(label_B)
        sos = cond_BD[:, None, :] + self.pos_start[None]
        x = jnp.concatenate([sos, self.word_embed(x_BLCv_wo_first_l.astype(jnp.float32))], axis=1)
        x = x + self._lvl_pos(0, end)[None]
        x = nn.with_logical_constraint(x.astype(self.dtype), ("act_batch", "act_length", "act_embed"))
        for blk in self.blocks:
            x, _ = blk(x, cond, train, None, None)
        return self._logits(x, cond_BD)

    # ---- per-scale KV-cached decoding ----
    def decode_scale(self, label_B: jax.Array, x_BlCv: Optional[jax.Array], caches: Sequence[KVCache],
                     si: int) -> tuple[jax.Array, tuple[KVCache, ...]]:
        """Runs scale ``si`` (static int) given the caches of scales < si.

        ``x_BlCv [B, pn_si**2, Cvae]`` is the area-downsampled running f_hat (ignored for si = 0,
        whose token map is the class embedding + pos_start). Returns logits ``[B, pn_si**2, V]``
        float32 and the caches with this scale's keys/values written at its static offset.
        """
        cfg = self.cfg
        begin, end = cfg.begin_ends[si]
        cond_BD, cond = self._cond(label_B)
        if si == 0:
            x = cond_BD[:, None, :] + self.pos_start[None]
        else:
            if x_BlCv.shape[1:] != (end - begin, cfg.Cvae):
                raise ValueError(f"decode_scale({si}) got x of shape {x_BlCv.shape}; expected "
                                 f"[B, {end - begin}, {cfg.Cvae}].")
            x = self.word_embed(x_BlCv.astype(jnp.float32))
        x = (x + self._lvl_pos(begin, end)[None]).astype(self.dtype)
        new = []
        for blk, cache in zip(self.blocks, caches):
            x, cache = blk(x, cond, False, begin, cache)
            new.append(cache)
        return self._logits(x, cond_BD), tuple(new)


# --------------------------------------------------------------------------------------------
# functional helpers
# --------------------------------------------------------------------------------------------

def init_cache(cfg: VARConfig, batch: int, dtype=jnp.float32) -> tuple[KVCache, ...]:
    """One empty ``[B, L, H, D]`` key/value cache per block."""
    return tuple(KVCache.zeros(batch, cfg.L, cfg.num_heads, cfg.head_dim, dtype) for _ in range(cfg.depth))


def _init_args(cfg: VARConfig):
    return (jnp.zeros((1,), jnp.int32), jnp.zeros((1, cfg.L - cfg.first_l, cfg.Cvae), jnp.float32))


def init_boxed(cfg: VARConfig, rng: jax.Array, *, dtype=jnp.float32) -> Any:
    """Official initialisation; params still boxed with their logical names (for sharded_init)."""
    return VAR(cfg, dtype).init({"params": rng}, *_init_args(cfg), train=False)["params"]


@functools.lru_cache(maxsize=16)
def _jit_init(cfg: VARConfig, dtype):
    return jax.jit(lambda k: nn.meta.unbox(init_boxed(cfg, k, dtype=dtype)))


def init_params(cfg: VARConfig, rng: jax.Array, *, dtype=jnp.float32) -> Any:
    """Official initialisation (``init_weights``), unboxed float32 params (jitted)."""
    return _jit_init(cfg, dtype)(rng)


def abstract_params(cfg: VARConfig) -> Any:
    """Unboxed ``ShapeDtypeStruct`` tree of the params (no compute)."""
    return nn.meta.unbox(jax.eval_shape(lambda k: init_boxed(cfg, k), jax.random.key(0)))


def param_count(cfg: VARConfig) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_params(cfg))))
