"""VAR's multi-scale VQVAE (``vae_ch160v4096z32.pth``) in Flax, NHWC, as functions over params.

Spec: ``../shared/spec/var.md`` §2.4, §4, §6 and ``tokenizers.md`` §2-3.

API summary (all pure functions; ``cfg`` is a hashable :class:`VQVAEConfig`, so
``jax.jit(f, static_argnums=1)`` works; ``si`` arguments are static Python ints):

* ``VQVAEConfig(...)``, ``VQVAEConfig.from_config(config.tokenizer | config)``,
  ``VQVAEConfig.from_official_args(fixture_json["vqvae_args"])``; ``cfg.phi_table``,
  ``cfg.begin_ends``, ``cfg.L``, ``cfg.image_size``.
* ``init_params(cfg, rng, *, boxed=False) -> params``; ``abstract_params(cfg)`` (boxed shapes).
* ``img_to_idxBl(params, cfg, img, layout="NHWC") -> [idx_s [B, pn_s²] int32 for each scale]``;
  ``img`` is ``[B, H, W, 3]`` (NHWC, default) or ``[B, 3, H, W]`` (``layout="NCHW"``), in [-1, 1],
  ``H = W = cfg.image_size``.
* ``encode(params, cfg, img, layout) -> f [B, h, w, Cvae]`` (``quant_conv(encoder(img))``, NHWC).
* ``f_to_idxBl_or_fhat(params, cfg, f_BhwC, to_fhat) -> list``.
* ``idxBl_to_var_input(params, cfg, idx) -> x_BLCv_wo_first_l [B, L - first_l, Cvae]``
  (teacher-forcing input; ``idx`` is the list or the concatenated ``[B, L]``).
* ``idxBl_to_img(params, cfg, idx, same_shape=True, last_one=False, layout="NHWC")``
  -> image ``[B, H, W, 3]`` in [-1, 1] (``last_one``) or the list of one image per scale.
* Sampler pieces (``get_next_autoregressive_input`` & co): ``empty_fhat(cfg, B)``,
  ``lookup_codes(params, idx_Bl) -> h_BlC``, ``next_autoregressive_input(params, cfg, si, f_hat,
  h_BlC) -> (f_hat, next_BlC)``, ``fhat_to_img(params, cfg, f_hat, layout)``.
* Lower-level: ``split_idx(cfg, idx_BL)``, ``nearest_codes(params, cfg, z_NC)``,
  ``apply_phi(params, cfg, si, h)``, ``embed_to_fhat(params, cfg, ms_h, all_to_max_scale, last_one)``,
  ``codebook(params)``. Resampling lives in :mod:`cca_jax.resample`.

Layout: every latent (``f``, ``f_hat``, ``h``) is NHWC ``[B, h, w, Cvae]``; token maps are raster
order (token ``r·pn + c``), which is what flattening NHWC gives. Images are NHWC unless
``layout="NCHW"`` is passed.

The module tree mirrors the official state dict: ``encoder/conv_in``, ``encoder/down_{l}/
block_{b}/{norm1,conv1,norm2,conv2,nin_shortcut}``, ``encoder/down_{l}/attn_{b}/{norm,qkv,
proj_out}``, ``encoder/down_{l}/downsample/conv``, ``encoder/mid/{block_1,attn_1,block_2}``,
``decoder/up_{l}`` (``l`` = resolution level; ``up_{L-1}`` is the lowest and runs first),
``quant_conv``, ``post_quant_conv``, ``quantize/embedding`` ``[V, Cvae]``, ``quantize/quant_resi/
phi_{k}`` (the Φ convs) and ``quantize/ema_vocab_hit_SV`` (an unused usage statistic carried so
that checkpoints round-trip exactly).

Inference only, like the official ``test_mode=True`` VQVAE: dropout is the identity and the
training losses are not implemented. Everything runs in float32; convolutions and matmuls use
``cfg.precision`` (default ``"highest"``) so that the nearest-code decisions match the official
fp32 model on TPU/GPU too (their default precision is reduced).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cca_jax import resample

Array = jax.Array
ACT_IMG = ("act_batch", None, None, "act_embed")  # logical names of NHWC activations
KERNEL_AXES = ("height", "width", "conv_in", "conv_out")

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


# ----------------------------------------------------------------------------------- config

class ScaleSchedule:
    """Token layout of a next-scale sequence, for configs with a ``patch_nums`` field (the VQVAE's
    and VAR's): scale ``k`` is a ``patch_nums[k]²`` token map, all concatenated into ``[B, L]``."""

    patch_nums: tuple[int, ...]

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def L(self) -> int:
        return int(sum(p * p for p in self.patch_nums))

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def begin_ends(self) -> tuple[tuple[int, int], ...]:
        """Token range ``[begin, end)`` of each scale in the concatenated sequence."""
        ends = np.cumsum([p * p for p in self.patch_nums]).tolist()
        return tuple(zip([0] + ends[:-1], ends))


@dataclasses.dataclass(frozen=True)
class VQVAEConfig(ScaleSchedule):
    """Hyper-parameters; names follow the official ``VQVAE.__init__`` (``z_channels`` = Cvae,
    ``patch_nums`` = ``v_patch_nums``) plus the ``Encoder``/``Decoder`` layout the official class
    hard-codes (``ch_mult``, ``num_res_blocks``, ``using_sa``, ``using_mid_sa``)."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    dropout: float = 0.0  # eval mode: never applied
    beta: float = 0.25  # commitment weight: training only (kept for the record)
    using_znorm: bool = False  # True: cosine-similarity code search on L2-normalised vectors
    quant_conv_ks: int = 3
    quant_resi: float = 0.5  # Φ(h) = (1 - |r|)·h + |r|·conv(h); |r| <= 1e-6 -> Φ = identity
    share_quant_resi: int = 4  # 0: one Φ per scale, 1: one shared Φ, K > 1: K partially shared
    default_qresi_counts: int = 0  # share_quant_resi = 0 only: number of Φ (0 -> len(patch_nums))
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    using_sa: bool = True
    using_mid_sa: bool = True
    num_groups: int = 32
    norm_eps: float = 1e-6
    precision: str = "highest"  # conv / matmul precision: highest | high | default

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if len(self.patch_nums) < 2:
            raise ValueError(
                f"VQVAEConfig.patch_nums={self.patch_nums}: the multi-scale quantiser needs at "
                "least 2 scales (the official Φ selection divides by len(patch_nums) - 1); set "
                "config.tokenizer.patch_nums.")
        if list(self.patch_nums) != sorted(self.patch_nums) or min(self.patch_nums) < 1:
            raise ValueError(f"VQVAEConfig.patch_nums={self.patch_nums} must be positive and "
                             "increasing (small to large scale).")
        for m in self.ch_mult:
            if (self.ch * m) % self.num_groups:
                raise ValueError(
                    f"VQVAEConfig: level width ch*mult = {self.ch}*{m} is not divisible by "
                    f"{self.num_groups} GroupNorm groups; change config.tokenizer.ch.")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"VQVAEConfig.precision={self.precision!r}; expected one of "
                             f"{sorted(_PRECISIONS)}.")
        if self.quant_conv_ks % 2 != 1:
            raise ValueError(f"VQVAEConfig.quant_conv_ks={self.quant_conv_ks} must be odd.")
        self.phi_table  # validates share_quant_resi / default_qresi_counts

    # --- derived sizes -------------------------------------------------------------------
    @property
    def Cvae(self) -> int:
        return self.z_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the full-resolution latent grid (= the last patch number)."""
        return self.patch_nums[-1]

    @property
    def image_size(self) -> int:
        return self.latent_size * self.downsample

    @property
    def phi_ratio(self) -> float:
        return abs(float(self.quant_resi))

    @property
    def num_phi(self) -> int:
        """Number of Φ convs (0 when Φ is the identity)."""
        if self.phi_ratio <= 1e-6:
            return 0
        if self.share_quant_resi == 0:
            return self.default_qresi_counts or self.num_scales
        return 1 if self.share_quant_resi == 1 else self.share_quant_resi

    @property
    def phi_table(self) -> tuple[int, ...]:
        """Index of the Φ conv used at each scale, computed exactly like the official
        ``PhiPartiallyShared/PhiNonShared.__getitem__``: the tick nearest to ``si/(S-1)``
        (numpy float64, ``argmin`` keeps the first of equal distances — the mathematical ties
        at 2/9 and 7/9 of the 10-scale setup are resolved by float64 rounding, giving
        ``(0, 0, 1, 1, 1, 2, 2, 3, 3, 3)``). Entries are ``-1`` when Φ is the identity."""
        return phi_table(self.num_scales, self.share_quant_resi, self.default_qresi_counts,
                         self.phi_ratio)

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any) -> "VQVAEConfig":
        """From ``config.tokenizer`` (or a root config holding ``.tokenizer``) as written by
        ``configs/var_common.py``; ``family`` and ``image_size`` are checked, not stored."""
        if hasattr(config, "tokenizer") and not hasattr(config, "vocab_size"):
            config = config.tokenizer
        d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        family = d.pop("family", "vqvae")
        if family != "vqvae":
            raise ValueError(f"config.tokenizer.family={family!r}; the VAR VQVAE needs 'vqvae'.")
        image_size = d.pop("image_size", None)
        cfg = cls._from_dict(d, "config.tokenizer")
        if image_size is not None and int(image_size) != cfg.image_size:
            raise ValueError(
                f"config.tokenizer.image_size={image_size} but patch_nums[-1]={cfg.latent_size} "
                f"x downsample {cfg.downsample} = {cfg.image_size}; make them agree.")
        return cfg

    @classmethod
    def from_official_args(cls, args: Mapping[str, Any]) -> "VQVAEConfig":
        """From the official ``VQVAE(**kwargs)`` arguments (fixture json ``vqvae_args``):
        ``v_patch_nums`` -> ``patch_nums``; ``test_mode`` / ``image_size`` are informational."""
        d = dict(args)
        d.pop("test_mode", None)
        image_size = d.pop("image_size", None)
        cfg = cls._from_dict(d, "vqvae_args")
        if image_size is not None and int(image_size) != cfg.image_size:
            raise ValueError(f"vqvae_args image_size={image_size} != {cfg.image_size} implied by "
                             "v_patch_nums and ch_mult.")
        return cfg

    @classmethod
    def _from_dict(cls, d: dict, where: str) -> "VQVAEConfig":
        if "v_patch_nums" in d:
            d["patch_nums"] = d.pop("v_patch_nums")
        if "Cvae" in d:
            d["z_channels"] = d.pop("Cvae")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{where} has fields {unknown} unknown to VQVAEConfig; known: "
                             f"{sorted(names)}.")
        return cls(**d)


_PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH,
               "default": jax.lax.Precision.DEFAULT}


def phi_ticks(K: int) -> np.ndarray:
    """The official tick positions of K Φ convs on [0, 1] (float64)."""
    return np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)


def phi_table(num_scales: int, share_quant_resi: int = 4, default_qresi_counts: int = 0,
              ratio: float = 0.5) -> tuple[int, ...]:
    """Φ index per scale (see :attr:`VQVAEConfig.phi_table`)."""
    if share_quant_resi < 0:
        raise ValueError(f"share_quant_resi={share_quant_resi} must be >= 0 (0: one Φ per scale, "
                         "1: one shared Φ, K > 1: K partially shared Φ).")
    if abs(ratio) <= 1e-6:
        return tuple([-1] * num_scales)
    if share_quant_resi == 1:
        return tuple([0] * num_scales)
    K = (default_qresi_counts or num_scales) if share_quant_resi == 0 else share_quant_resi
    ticks = phi_ticks(K)
    # exactly the official expression: python float si/(SN-1), numpy float64 |ticks - at|, argmin
    return tuple(int(np.argmin(np.abs(ticks - si / (num_scales - 1))).item())
                 for si in range(num_scales))


# ----------------------------------------------------------------------------------- layers

def _uniform(bound: float) -> Callable:
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv(nn.Module):
    """2-D conv, NHWC, kernel ``[kh, kw, in, out]``; ``padding`` is PyTorch-style symmetric.
    Init is PyTorch's default: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    precision: str = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cin = x.shape[-1]
        k = self.kernel_size
        init = _uniform(1.0 / math.sqrt(k * k * cin))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, KERNEL_AXES),
                            (k, k, cin, self.features))
        bias = self.param("bias", nn.with_logical_partitioning(init, ("conv_out",)), (self.features,))
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x, kernel, window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_PRECISIONS[self.precision])
        return y + bias


class GroupNorm(nn.Module):
    """``torch.nn.GroupNorm(num_groups, C, eps, affine=True)`` on NHWC (two-pass variance)."""

    num_groups: int = 32
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        B, H, W, C = x.shape
        G = self.num_groups
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (C,))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (C,))
        xg = x.reshape(B, H * W, G, C // G)
        mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(B, H, W, C)
        return y * scale + bias


class ResnetBlock(nn.Module):
    """GN → SiLU → conv3×3 → GN → SiLU → (dropout: identity) → conv3×3, plus a 1×1
    ``nin_shortcut`` when the width changes."""

    out_channels: int
    cfg: VQVAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.cfg
        norm = lambda name: GroupNorm(c.num_groups, c.norm_eps, name=name)  # noqa: E731
        h = Conv(self.out_channels, precision=c.precision, name="conv1")(nn.silu(norm("norm1")(x)))
        h = Conv(self.out_channels, precision=c.precision, name="conv2")(nn.silu(norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, padding=0, precision=c.precision, name="nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h·w positions with one fused 1×1 ``qkv`` conv
    (channel blocks q | k | v), logits scaled by C^-1/2, 1×1 ``proj_out``, residual."""

    cfg: VQVAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.cfg
        B, H, W, C = x.shape
        prec = _PRECISIONS[c.precision]
        qkv = Conv(3 * C, 1, padding=0, precision=c.precision, name="qkv")(
            GroupNorm(c.num_groups, c.norm_eps, name="norm")(x))
        q, k, v = jnp.split(qkv.reshape(B, H * W, 3 * C), 3, axis=-1)
        w = jnp.einsum("bic,bjc->bij", q, k, precision=prec) * jnp.float32(int(C) ** (-0.5))
        w = jax.nn.softmax(w, axis=-1)
        h = jnp.einsum("bij,bjc->bic", w, v, precision=prec).reshape(B, H, W, C)
        return x + Conv(C, 1, padding=0, precision=c.precision, name="proj_out")(h)


class Downsample(nn.Module):
    """Zero-pad right/bottom by 1, conv3×3 stride 2 (no padding)."""

    cfg: VQVAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return Conv(x.shape[-1], 3, stride=2, padding=0, precision=self.cfg.precision, name="conv")(x)


class Upsample(nn.Module):
    """Nearest ×2, conv3×3."""

    cfg: VQVAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return Conv(x.shape[-1], precision=self.cfg.precision, name="conv")(resample.upsample_nearest2x(x))


class Mid(nn.Module):
    cfg: VQVAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        C = x.shape[-1]
        x = ResnetBlock(C, self.cfg, name="block_1")(x)
        if self.cfg.using_mid_sa:
            x = AttnBlock(self.cfg, name="attn_1")(x)
        return ResnetBlock(C, self.cfg, name="block_2")(x)


class Level(nn.Module):
    """One resolution level: ``n_blocks`` ResnetBlocks (each followed by an AttnBlock when
    ``attn``), then the optional resampling (``"down"`` / ``"up"`` / None)."""

    out_channels: int
    n_blocks: int
    attn: bool
    resample_kind: str | None
    cfg: VQVAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for b in range(self.n_blocks):
            x = ResnetBlock(self.out_channels, self.cfg, name=f"block_{b}")(x)
            if self.attn:
                x = AttnBlock(self.cfg, name=f"attn_{b}")(x)
        if self.resample_kind == "down":
            x = Downsample(self.cfg, name="downsample")(x)
        elif self.resample_kind == "up":
            x = Upsample(self.cfg, name="upsample")(x)
        return nn.with_logical_constraint(x, ACT_IMG)


class Encoder(nn.Module):
    """Image ``[B, H, W, 3]`` → ``[B, H/f, W/f, Cvae]`` (before ``quant_conv``)."""

    cfg: VQVAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.cfg
        n = len(c.ch_mult)
        h = Conv(c.ch, precision=c.precision, name="conv_in")(x)
        for lvl in range(n):
            h = Level(c.ch * c.ch_mult[lvl], c.num_res_blocks, c.using_sa and lvl == n - 1,
                      "down" if lvl != n - 1 else None, c, name=f"down_{lvl}")(h)
        h = Mid(c, name="mid")(h)
        h = nn.silu(GroupNorm(c.num_groups, c.norm_eps, name="norm_out")(h))
        return Conv(c.z_channels, precision=c.precision, name="conv_out")(h)


class Decoder(nn.Module):
    """Latent ``[B, h, w, Cvae]`` (after ``post_quant_conv``) → image ``[B, 16h, 16w, 3]``
    (not clamped). Levels run from ``up_{n-1}`` (lowest resolution) down to ``up_0``."""

    cfg: VQVAEConfig

    @nn.compact
    def __call__(self, z: Array) -> Array:
        c = self.cfg
        n = len(c.ch_mult)
        h = Conv(c.ch * c.ch_mult[-1], precision=c.precision, name="conv_in")(z)
        h = Mid(c, name="mid")(h)
        for lvl in reversed(range(n)):
            h = Level(c.ch * c.ch_mult[lvl], c.num_res_blocks + 1, c.using_sa and lvl == n - 1,
                      "up" if lvl != 0 else None, c, name=f"up_{lvl}")(h)
        h = nn.silu(GroupNorm(c.num_groups, c.norm_eps, name="norm_out")(h))
        return Conv(c.in_channels, precision=c.precision, name="conv_out")(h)


class PhiBank(nn.Module):
    """The ``num_phi`` Φ convs ``phi_{k}``; ``Φ_k(h) = (1 - r)·h + r·conv_k(h)`` (official
    ``Phi``); ``k = -1`` is the identity (``|quant_resi| <= 1e-6``)."""

    cfg: VQVAEConfig

    @nn.compact
    def __call__(self, k: int, h: Array) -> Array:
        if k < 0:
            return h
        c = self.cfg
        r = c.phi_ratio
        conv = Conv(c.z_channels, 3, padding=1, precision=c.precision, name=f"phi_{k}")
        return h * jnp.float32(1 - r) + conv(h) * jnp.float32(r)


class Quantizer(nn.Module):
    """``VectorQuantizer2`` parameters: codebook, Φ bank, and the inert usage buffer."""

    cfg: VQVAEConfig

    def setup(self):
        c = self.cfg
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "conv_out")),
            (c.vocab_size, c.z_channels))
        self.ema_vocab_hit_SV = self.param(
            "ema_vocab_hit_SV", nn.with_logical_partitioning(nn.initializers.zeros, ("scales", "vocab")),
            (c.num_scales, c.vocab_size))
        self.quant_resi = PhiBank(c)

    def phi(self, si: int, h: Array) -> Array:
        return self.quant_resi(self.cfg.phi_table[si], h)

    def codebook(self) -> Array:
        return self.embedding

    def __call__(self, h: Array) -> Array:
        """Init only (``Quantizer(cfg).init(rng, zeros[1, 1, 1, Cvae])`` gives the quantiser
        params alone, which is all :func:`idxBl_to_var_input` reads): touches every parameter."""
        for k in range(self.cfg.num_phi):
            h = self.quant_resi(k, h)
        return h + self.embedding[0] + 0 * self.ema_vocab_hit_SV[0, 0]


class VQVAE(nn.Module):
    """Module holding every VQVAE parameter; use the functions below rather than ``apply``."""

    cfg: VQVAEConfig

    def setup(self):
        c = self.cfg
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        pad = c.quant_conv_ks // 2
        self.quant_conv = Conv(c.z_channels, c.quant_conv_ks, padding=pad, precision=c.precision)
        self.post_quant_conv = Conv(c.z_channels, c.quant_conv_ks, padding=pad, precision=c.precision)
        self.quantize = Quantizer(c)

    def encode(self, img_BHW3: Array) -> Array:
        return self.quant_conv(self.encoder(img_BHW3))

    def decode(self, f_hat_BhwC: Array) -> Array:
        """``fhat_to_img``: decoder(post_quant_conv(f̂)) clamped to [-1, 1]."""
        return jnp.clip(self.decoder(self.post_quant_conv(f_hat_BhwC)), -1.0, 1.0)

    def phi(self, si: int, h: Array) -> Array:
        return self.quantize.phi(si, h)

    def codebook(self) -> Array:
        return self.quantize.codebook()

    def __call__(self, img_BHW3: Array) -> Array:  # init only
        f = self.encode(img_BHW3)
        return self.decode(self.quantize(f))


def abstract_params(cfg: VQVAEConfig) -> Any:
    """The boxed (``nn.Partitioned`` logical axes) params tree as ShapeDtypeStructs; no compute."""
    s = cfg.image_size
    return jax.eval_shape(VQVAE(cfg).init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, s, s, cfg.in_channels), jnp.float32))["params"]


def init_params(cfg: VQVAEConfig, rng: Array, *, boxed: bool = False) -> dict:
    """Random parameters: PyTorch's default conv init (weight and bias ~ U(±1/sqrt(fan_in))),
    GroupNorm 1 / 0, N(0, 1) codebook (``nn.Embedding``'s default), zero usage buffer.

    The official VQVAE is never initialised (its weights always come from the checkpoint); this
    is for tests and shape-only uses. The module initialisers describe the same distributions,
    but here all values come from two draws over the flattened tree, because XLA on CPU compiles
    one threefry program per parameter very slowly (~30 s for a 144-leaf toy model).
    ``boxed=True`` keeps the ``nn.Partitioned`` logical-axis boxes (for ``sharded_init``).
    """
    return _jit_init(cfg, boxed)(rng)


@functools.lru_cache(maxsize=None)
def _jit_init(cfg: VQVAEConfig, boxed: bool):
    return jax.jit(functools.partial(_init_impl, cfg, boxed=boxed))


def _init_impl(cfg: VQVAEConfig, rng: Array, *, boxed: bool) -> dict:
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(cfg), is_leaf=is_box)
    paths = [tuple(k.key for k in p) for p, _ in leaves]
    shape_of = {p: (b.value if is_box(b) else b).shape for p, (_, b) in zip(paths, leaves)}
    sizes = [int(np.prod(shape_of[p])) for p in paths]
    offsets = np.cumsum([0] + sizes)
    k_u, k_n = jax.random.split(rng)
    uni = jax.random.uniform(k_u, (sum(sizes),), jnp.float32, -1.0, 1.0)
    out = []
    for i, (path, (_, box)) in enumerate(zip(paths, leaves)):
        shape, name, parent = shape_of[path], path[-1], path[:-1]
        if name == "embedding":
            v = jax.random.normal(k_n, shape, jnp.float32)
        elif name == "ema_vocab_hit_SV" or (name == "bias" and parent + ("scale",) in shape_of):
            v = jnp.zeros(shape, jnp.float32)  # usage buffer, GroupNorm bias
        elif name == "scale":
            v = jnp.ones(shape, jnp.float32)
        else:  # conv kernel / bias: U(±1/sqrt(fan_in)) with the kernel's fan_in
            fan_in = int(np.prod(shape_of[parent + ("kernel",)][:3]))
            v = uni[offsets[i]:offsets[i + 1]].reshape(shape) / math.sqrt(fan_in)
        out.append(box.replace_boxed(v) if (boxed and is_box(box)) else v)
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- functions

def _apply(params, cfg: VQVAEConfig, method: Callable, *args):
    return VQVAE(cfg).apply({"params": params}, *args, method=method)


def _to_nhwc(img: Array, layout: str) -> Array:
    if layout == "NHWC":
        return img
    if layout == "NCHW":
        return jnp.transpose(img, (0, 2, 3, 1))
    raise ValueError(f"layout={layout!r}; expected 'NHWC' or 'NCHW'.")


def _from_nhwc(img: Array, layout: str) -> Array:
    return img if layout == "NHWC" else jnp.transpose(img, (0, 3, 1, 2))


def encode(params, cfg: VQVAEConfig, img: Array, layout: str = "NHWC") -> Array:
    """``quant_conv(encoder(img))`` → ``f [B, h, w, Cvae]`` (NHWC), float32.

    img: ``[B, H, W, 3]`` (``layout="NHWC"``) or ``[B, 3, H, W]`` (``"NCHW"``) in [-1, 1] with
    ``H = W = cfg.image_size`` (the last patch number × 16).
    """
    x = _to_nhwc(jnp.asarray(img, jnp.float32), layout)
    if x.shape[1:3] != (cfg.image_size, cfg.image_size):
        raise ValueError(f"VQVAE input images are {x.shape[1]}x{x.shape[2]} ({layout}); the "
                         f"tokenizer needs {cfg.image_size}x{cfg.image_size} (patch_nums[-1]="
                         f"{cfg.latent_size} x {cfg.downsample}); fix the data image size or "
                         "config.tokenizer.patch_nums.")
    return _apply(params, cfg, VQVAE.encode, x)


def codebook(params) -> Array:
    """The raw codebook ``[V, Cvae]``."""
    return params["quantize"]["embedding"]


def lookup_codes(params, idx: Array) -> Array:
    """Codebook rows of ``idx [...]`` → ``[..., Cvae]``."""
    return jnp.take(codebook(params), idx, axis=0)


def apply_phi(params, cfg: VQVAEConfig, si: int, h_BhwC: Array) -> Array:
    """Φ of scale ``si`` (static) on ``h [B, h, w, Cvae]``."""
    return _apply(params, cfg, VQVAE.phi, si, h_BhwC)


def nearest_codes(params, cfg: VQVAEConfig, z_NC: Array) -> Array:
    """Official nearest-code search for ``z [N, Cvae]`` → ``[N]`` int32.

    ``using_znorm=False``: ``argmin(‖z‖² + ‖e‖² − 2 z·e)`` with the terms summed in that order
    (``(‖z‖² + ‖e‖²)`` first, then the ``addmm`` with alpha −2), ties → lowest index.
    ``using_znorm=True``: ``argmax`` of cosine similarity.
    """
    E = codebook(params)
    prec = _PRECISIONS[cfg.precision]
    if cfg.using_znorm:
        zn = z_NC / jnp.maximum(jnp.linalg.norm(z_NC, axis=-1, keepdims=True), 1e-12)
        en = E / jnp.maximum(jnp.linalg.norm(E, axis=-1, keepdims=True), 1e-12)
        return jnp.argmax(jnp.matmul(zn, en.T, precision=prec), axis=1).astype(jnp.int32)
    d = jnp.sum(jnp.square(z_NC), axis=1, keepdims=True) + jnp.sum(jnp.square(E), axis=1)
    d = d + jnp.float32(-2.0) * jnp.matmul(z_NC, E.T, precision=prec)
    return jnp.argmin(d, axis=1).astype(jnp.int32)


def _up_to_full(cfg: VQVAEConfig, h_BhwC: Array) -> Array:
    return resample.resize_bicubic(h_BhwC, cfg.latent_size)


def f_to_idxBl_or_fhat(params, cfg: VQVAEConfig, f_BhwC: Array, to_fhat: bool) -> list[Array]:
    """Multi-scale residual quantisation of ``f [B, h, w, Cvae]`` (var.md §4.2).

    Returns per scale the indices ``[B, pn²]`` int32 (raster) or, with ``to_fhat``, the running
    reconstruction ``f̂ [B, h, w, Cvae]`` after that scale.
    """
    B, H, W, C = f_BhwC.shape
    if (H, W) != (cfg.latent_size, cfg.latent_size):
        raise ValueError(f"f is {H}x{W}; the last patch number is {cfg.latent_size}.")
    f_rest = f_BhwC.astype(jnp.float32)
    f_hat = jnp.zeros_like(f_rest)
    out = []
    S = cfg.num_scales
    for si, pn in enumerate(cfg.patch_nums):
        z = resample.resize_area(f_rest, pn) if si != S - 1 else f_rest
        idx_Bl = nearest_codes(params, cfg, z.reshape(-1, C)).reshape(B, pn * pn)
        h = lookup_codes(params, idx_Bl).reshape(B, pn, pn, C)
        if si != S - 1:
            h = _up_to_full(cfg, h)
        h = apply_phi(params, cfg, si, h)
        f_hat = f_hat + h
        f_rest = f_rest - h
        out.append(f_hat if to_fhat else idx_Bl)
    return out


def img_to_idxBl(params, cfg: VQVAEConfig, img: Array, layout: str = "NHWC") -> list[Array]:
    """Images → one index map ``[B, pn²]`` int32 per scale (raster order).

    img: ``[B, H, W, 3]`` (NHWC, default) or ``[B, 3, H, W]`` (``layout="NCHW"``), float in
    [-1, 1], ``H = W = cfg.image_size``. Concatenate the list along axis 1 for ``[B, L]``.
    """
    return f_to_idxBl_or_fhat(params, cfg, encode(params, cfg, img, layout), to_fhat=False)


def split_idx(cfg: VQVAEConfig, idx: Array | Sequence[Array]) -> list[Array]:
    """``[B, L]`` → per-scale list (a list is checked and passed through)."""
    if isinstance(idx, (list, tuple)):
        idx = list(idx)
        if len(idx) != cfg.num_scales:
            raise ValueError(f"{len(idx)} index maps given; the tokenizer has {cfg.num_scales} "
                             f"scales (patch_nums={cfg.patch_nums}).")
        for si, (x, pn) in enumerate(zip(idx, cfg.patch_nums)):
            if x.shape[-1] != pn * pn:
                raise ValueError(f"index map {si} has {x.shape[-1]} tokens; scale {si} has "
                                 f"{pn}x{pn} = {pn * pn}.")
        return idx
    if idx.shape[-1] != cfg.L:
        raise ValueError(f"index sequence has {idx.shape[-1]} tokens; patch_nums={cfg.patch_nums} "
                         f"give L={cfg.L}.")
    return [idx[:, b:e] for b, e in cfg.begin_ends]


def idxBl_to_var_input(params, cfg: VQVAEConfig, idx: Array | Sequence[Array]) -> Array:
    """Teacher-forcing input ``x_BLCv_wo_first_l [B, L - first_l, Cvae]`` (var.md §2.4).

    idx: list of ``[B, pn_s²]`` or the concatenated ``[B, L]``. For s = 0..S-2:
    ``f̂ += Φ_s(bicubic(e_s → full))``; append ``area(f̂ → pn_{s+1})`` flattened raster.
    """
    idx_list = split_idx(cfg, idx)
    B = idx_list[0].shape[0]
    C, S = cfg.z_channels, cfg.num_scales
    f_hat = jnp.zeros((B, cfg.latent_size, cfg.latent_size, C), jnp.float32)
    nxt = []
    for si in range(S - 1):
        pn = cfg.patch_nums[si]
        h = _up_to_full(cfg, lookup_codes(params, idx_list[si]).reshape(B, pn, pn, C))
        f_hat = f_hat + apply_phi(params, cfg, si, h)
        pn_next = cfg.patch_nums[si + 1]
        nxt.append(resample.resize_area(f_hat, pn_next).reshape(B, pn_next * pn_next, C))
    return jnp.concatenate(nxt, axis=1)


def embed_to_fhat(params, cfg: VQVAEConfig, ms_h_BhwC: Sequence[Array], all_to_max_scale: bool = True,
                  last_one: bool = False) -> Array | list[Array]:
    """Official ``embed_to_fhat`` on per-scale code embeddings ``[B, pn, pn, Cvae]``.

    ``all_to_max_scale=True`` (what every caller uses): ``f̂ = Σ_s Φ_s(bicubic(h_s → full))``
    (last scale not resized). ``False`` (experimental branch): ``f̂`` is bicubic-resized to each
    scale in turn before ``Φ_s(h_s)`` is added, so ``f̂_s`` is ``[B, pn_s, pn_s, Cvae]``.
    """
    B = ms_h_BhwC[0].shape[0]
    S = cfg.num_scales
    outs = []
    if all_to_max_scale:
        f_hat = jnp.zeros((B, cfg.latent_size, cfg.latent_size, cfg.z_channels), jnp.float32)
        for si in range(S):
            h = ms_h_BhwC[si]
            if si < S - 1:
                h = _up_to_full(cfg, h)
            f_hat = f_hat + apply_phi(params, cfg, si, h)
            outs.append(f_hat)
    else:
        p0 = cfg.patch_nums[0]
        f_hat = jnp.zeros((B, p0, p0, cfg.z_channels), jnp.float32)
        for si, pn in enumerate(cfg.patch_nums):
            f_hat = resample.resize_bicubic(f_hat, pn)
            f_hat = f_hat + apply_phi(params, cfg, si, ms_h_BhwC[si])
            outs.append(f_hat)
    return outs[-1] if last_one else outs


def fhat_to_img(params, cfg: VQVAEConfig, f_hat_BhwC: Array, layout: str = "NHWC") -> Array:
    """``decoder(post_quant_conv(f̂))`` clamped to [-1, 1] → ``[B, 16h, 16w, 3]`` (or NCHW)."""
    return _from_nhwc(_apply(params, cfg, VQVAE.decode, f_hat_BhwC.astype(jnp.float32)), layout)


def idxBl_to_img(params, cfg: VQVAEConfig, idx: Array | Sequence[Array], same_shape: bool = True,
                 last_one: bool = False, layout: str = "NHWC") -> Array | list[Array]:
    """Indices → image(s) in [-1, 1] (official ``idxBl_to_img``).

    ``last_one=True``: the image ``[B, H, W, 3]`` of the full reconstruction; otherwise the list
    of the S images after each cumulative scale. ``same_shape`` = ``all_to_max_scale`` of
    :func:`embed_to_fhat`. ``layout`` selects NHWC (default) or NCHW outputs.
    """
    idx_list = split_idx(cfg, idx)
    B = idx_list[0].shape[0]
    ms_h = []
    for x in idx_list:
        pn = round(x.shape[1] ** 0.5)
        ms_h.append(lookup_codes(params, x).reshape(B, pn, pn, cfg.z_channels))
    fh = embed_to_fhat(params, cfg, ms_h, all_to_max_scale=same_shape, last_one=last_one)
    if last_one:
        return fhat_to_img(params, cfg, fh, layout)
    if same_shape:  # one decoder program applied S times (lax.map), not S inlined copies
        imgs = jax.lax.map(lambda f: fhat_to_img(params, cfg, f, layout), jnp.stack(fh))
        return [imgs[si] for si in range(len(fh))]
    return [fhat_to_img(params, cfg, f, layout) for f in fh]


# ------------------------------------------------------------------------- sampler pieces

def empty_fhat(cfg: VQVAEConfig, batch: int) -> Array:
    """Zero ``f̂ [B, pn_last, pn_last, Cvae]`` float32, the state the VAR sampler starts from."""
    return jnp.zeros((batch, cfg.latent_size, cfg.latent_size, cfg.z_channels), jnp.float32)


def next_autoregressive_input(params, cfg: VQVAEConfig, si: int, f_hat_BhwC: Array,
                              h_BlC: Array) -> tuple[Array, Array]:
    """Official ``get_next_autoregressive_input`` (si static).

    h_BlC: the embeddings ``[B, pn_si², Cvae]`` of the tokens just sampled at scale ``si``
    (``lookup_codes(params, idx_Bl)``, or a soft mixture of rows for ``more_smooth``).
    Returns ``(f̂', next_BlC)``: ``f̂' = f̂ + Φ_si(bicubic(h → full))`` and the next scale's input
    ``area(f̂' → pn_{si+1})`` flattened to ``[B, pn_{si+1}², Cvae]``; at the last scale
    ``f̂' = f̂ + Φ(h)`` (no resize) and ``next_BlC`` is ``f̂'`` flattened.
    """
    B = h_BlC.shape[0]
    C, S = cfg.z_channels, cfg.num_scales
    pn = cfg.patch_nums[si]
    h = h_BlC.astype(jnp.float32).reshape(B, pn, pn, C)
    if si != S - 1:
        f_hat = f_hat_BhwC + apply_phi(params, cfg, si, _up_to_full(cfg, h))
        pn_next = cfg.patch_nums[si + 1]
        return f_hat, resample.resize_area(f_hat, pn_next).reshape(B, pn_next * pn_next, C)
    f_hat = f_hat_BhwC + apply_phi(params, cfg, si, h)
    return f_hat, f_hat.reshape(B, pn * pn, C)
