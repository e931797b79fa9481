"""LlamaGen's image tokenizer (``vq_ds16_c2i.pt``, "VQ-16") in Flax, NHWC.

Encoder → 1×1 ``quant_conv`` → L2-normalised nearest-code lookup → (codes) → normalised codebook
rows → 1×1 ``post_quant_conv`` → decoder. The module tree mirrors the official ``VQModel`` state
dict (``../shared/spec/tokenizers.md`` §1): ``encoder/conv_blocks_{l}/res_{i}``, ``.../attn_{i}``,
``.../downsample/conv``, ``encoder/mid_{0,1,2}``, ``decoder/conv_blocks_{j}`` (j = 0 is the LOWEST
resolution), ``quantize/embedding`` and the inert ``quantize/codebook_used`` usage buffer, so
``cca_jax/convert/vq16.py`` maps keys by renaming alone.

Shapes: ``B`` images, ``H×W`` pixels, ``h×w = H/f × W/f`` latent grid (``f = 2^(levels-1)``),
``C`` channels, ``D`` code dim (8), ``V`` codebook size; codes are in raster order
(token ``t = row·w + col``), ``L = h·w``.

Inference only: dropout (``dropout_p``) and the training losses are not implemented; the
``codebook_used`` buffer is carried as an unused parameter so checkpoints round-trip exactly.
Convolutions and matmuls run at ``precision="highest"`` by default so that codes match the
official float32 model on accelerators too (TPU/GPU default to reduced-precision passes).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array
ACT_IMG = ("act_batch", None, None, "act_embed")  # logical names of NHWC activations


@dataclasses.dataclass(frozen=True)
class VQ16Config:
    """Hyper-parameters; field names follow the official ``ModelArgs`` (plus ``ch``,
    ``num_res_blocks`` of ``Encoder``/``Decoder``, which ``ModelArgs`` leaves at their defaults)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True  # adds the 65536-entry ``quantize.codebook_used`` buffer
    commit_loss_beta: float = 0.25  # training only (kept for the record)
    entropy_loss_ratio: float = 0.0  # training only
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    dropout_p: float = 0.0  # training only; not applied
    ch: int = 128
    num_res_blocks: int = 2  # per encoder level; the decoder uses num_res_blocks + 1
    norm_groups: int = 32
    norm_eps: float = 1e-6
    usage_buffer_size: int = 65536  # hard-coded in the official VectorQuantizer

    def __post_init__(self):
        object.__setattr__(self, "encoder_ch_mult", tuple(int(m) for m in self.encoder_ch_mult))
        object.__setattr__(self, "decoder_ch_mult", tuple(int(m) for m in self.decoder_ch_mult))
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            for m in getattr(self, name):
                if (self.ch * m) % self.norm_groups:
                    raise ValueError(
                        f"VQ16Config.{name}={getattr(self, name)} with ch={self.ch}: level width "
                        f"{self.ch * m} is not divisible by norm_groups={self.norm_groups}; change "
                        "config.tokenizer.ch or the channel multipliers.")
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError(f"encoder_ch_mult {self.encoder_ch_mult} and decoder_ch_mult "
                             f"{self.decoder_ch_mult} must have the same number of levels.")

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each axis (16 for VQ-16)."""
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def latent_hw(self, image_size: int) -> tuple[int, int]:
        if image_size % self.downsample:
            raise ValueError(f"Image size {image_size} is not a multiple of the tokenizer's "
                             f"downsampling factor {self.downsample}.")
        return image_size // self.downsample, image_size // self.downsample

    def tokens_per_image(self, image_size: int) -> int:
        h, w = self.latent_hw(image_size)
        return h * w

    @classmethod
    def from_model_args(cls, model_args: Mapping[str, Any], **overrides) -> "VQ16Config":
        """From an official ``ModelArgs`` dict (e.g. a fixture's ``model_args``); unknown keys raise."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = dict(model_args)
        kw.update(overrides)
        unknown = sorted(set(kw) - fields)
        if unknown:
            raise ValueError(f"Unknown VQ-16 tokenizer fields {unknown}; known: {sorted(fields)}.")
        return cls(**kw)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "VQ16Config":
        """From ``config.tokenizer`` (a ConfigDict); missing fields take the VQ-16 defaults and
        fields that are not VQ-16 hyper-parameters (``family``, ``image_size`` ...) are ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        items = cfg.items() if hasattr(cfg, "items") else dict(cfg).items()
        return cls(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                      for k, v in items if k in fields})


def default_config(**overrides):
    """``config.tokenizer`` section for the released VQ-16 (``family="vq16"``)."""
    import ml_collections
    c = ml_collections.ConfigDict()
    c.family = "vq16"
    for f in dataclasses.fields(VQ16Config):
        v = overrides.get(f.name, f.default)
        setattr(c, f.name, list(v) if isinstance(v, tuple) else v)
    return c


def _precision(p):
    return None if p in (None, "default") else jax.lax.Precision(p) if isinstance(p, str) else p


def _torch_uniform(fan_in: int):
    """PyTorch's default conv init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (weights and biases)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class Conv(nn.Module):
    """PyTorch ``Conv2d`` on NHWC: kernel ``[kh, kw, Cin, Cout]``; explicit (asymmetric) padding."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: Sequence[tuple[int, int]] | None = None  # default: k//2 on every side
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x_BHWC: Array) -> Array:
        k, cin = self.kernel_size, x_BHWC.shape[-1]
        init = _torch_uniform(cin * k * k)
        kernel = self.param("kernel", nn.with_logical_partitioning(
            init, ("height", "width", "conv_in", "conv_out")), (k, k, cin, self.features))
        bias = self.param("bias", nn.with_logical_partitioning(init, ("conv_out",)), (self.features,))
        pad = self.padding if self.padding is not None else ((k // 2, k // 2), (k // 2, k // 2))
        y = jax.lax.conv_general_dilated(
            x_BHWC, kernel, (self.stride, self.stride), tuple(tuple(p) for p in pad),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_precision(self.precision))
        return y + bias


class GroupNorm(nn.Module):
    """``nn.GroupNorm(groups, C, eps, affine=True)``: two-pass mean/variance in float32."""

    groups: int = 32
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x_BHWC: Array) -> Array:
        B, H, W, C = x_BHWC.shape
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (C,))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (C,))
        x = x_BHWC.astype(jnp.float32).reshape(B, H, W, self.groups, C // self.groups)
        mean = x.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(x - mean).mean(axis=(1, 2, 4), keepdims=True)
        x = ((x - mean) * jax.lax.rsqrt(var + self.eps)).reshape(B, H, W, C)
        return (x * scale + bias).astype(x_BHWC.dtype)


def swish(x):
    return x * jax.nn.sigmoid(x)


class ResnetBlock(nn.Module):
    """GN → swish → conv3×3 → GN → swish → conv3×3, plus a 1×1 ``nin_shortcut`` when Cin ≠ Cout."""

    features: int
    cfg: VQ16Config
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x_BHWC: Array) -> Array:
        gn = lambda name: GroupNorm(self.cfg.norm_groups, self.cfg.norm_eps, name=name)
        h = Conv(self.features, 3, precision=self.precision, name="conv1")(swish(gn("norm1")(x_BHWC)))
        h = Conv(self.features, 3, precision=self.precision, name="conv2")(swish(gn("norm2")(h)))
        if x_BHWC.shape[-1] != self.features:
            x_BHWC = Conv(self.features, 1, precision=self.precision, name="nin_shortcut")(x_BHWC)
        return nn.with_logical_constraint(x_BHWC + h, ACT_IMG)


class AttnBlock(nn.Module):
    """Single-head self-attention over the ``h·w`` positions; separate 1×1 q/k/v convs."""

    cfg: VQ16Config
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x_BHWC: Array) -> Array:
        B, H, W, C = x_BHWC.shape
        h = GroupNorm(self.cfg.norm_groups, self.cfg.norm_eps, name="norm")(x_BHWC)
        conv = lambda name: Conv(C, 1, precision=self.precision, name=name)
        q, k, v = (conv(n)(h).reshape(B, H * W, C) for n in ("q", "k", "v"))
        prec = _precision(self.precision)
        logits = jnp.einsum("bic,bjc->bij", q, k, precision=prec) * (int(C) ** -0.5)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bij,bjc->bic", attn, v, precision=prec).reshape(B, H, W, C)
        return nn.with_logical_constraint(x_BHWC + conv("proj_out")(out), ACT_IMG)


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, then conv3×3 stride 2 without padding."""

    precision: Any = "highest"

    @nn.compact
    def __call__(self, x_BHWC: Array) -> Array:
        return Conv(x_BHWC.shape[-1], 3, stride=2, padding=((0, 1), (0, 1)),
                    precision=self.precision, name="conv")(x_BHWC)


class Upsample(nn.Module):
    """Nearest ×2 then conv3×3."""

    precision: Any = "highest"

    @nn.compact
    def __call__(self, x_BHWC: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
        return Conv(x_BHWC.shape[-1], 3, precision=self.precision, name="conv")(x)


class Level(nn.Module):
    """One ``conv_blocks[i]`` entry: ResnetBlocks (each followed by an AttnBlock if ``attn``),
    then an optional ``downsample`` / ``upsample``."""

    features: int
    num_blocks: int
    attn: bool
    resample: str | None  # "down" | "up" | None
    cfg: VQ16Config
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.num_blocks):
            x = ResnetBlock(self.features, self.cfg, self.precision, name=f"res_{i}")(x)
            if self.attn:
                x = AttnBlock(self.cfg, self.precision, name=f"attn_{i}")(x)
        if self.resample == "down":
            x = Downsample(self.precision, name="downsample")(x)
        elif self.resample == "up":
            x = Upsample(self.precision, name="upsample")(x)
        return x


def _mid(x, width, cfg, precision):
    x = ResnetBlock(width, cfg, precision, name="mid_0")(x)
    x = AttnBlock(cfg, precision, name="mid_1")(x)
    return ResnetBlock(width, cfg, precision, name="mid_2")(x)


class Encoder(nn.Module):
    """``[B, H, W, 3]`` in [-1, 1] → ``[B, h, w, z_channels]``."""

    cfg: VQ16Config
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x_BHWC: Array) -> Array:
        cfg, mult = self.cfg, self.cfg.encoder_ch_mult
        x = Conv(cfg.ch, 3, precision=self.precision, name="conv_in")(x_BHWC)
        n = len(mult)
        for l, m in enumerate(mult):
            x = Level(cfg.ch * m, cfg.num_res_blocks, attn=l == n - 1,
                      resample="down" if l != n - 1 else None, cfg=cfg,
                      precision=self.precision, name=f"conv_blocks_{l}")(x)
        x = _mid(x, cfg.ch * mult[-1], cfg, self.precision)
        x = swish(GroupNorm(cfg.norm_groups, cfg.norm_eps, name="norm_out")(x))
        return Conv(cfg.z_channels, 3, precision=self.precision, name="conv_out")(x)


class Decoder(nn.Module):
    """``[B, h, w, z_channels]`` → ``[B, H, W, 3]`` (not clamped)."""

    cfg: VQ16Config
    precision: Any = "highest"

    @nn.compact
    def __call__(self, z_BhwC: Array) -> Array:
        cfg, mult = self.cfg, self.cfg.decoder_ch_mult
        n = len(mult)
        x = Conv(cfg.ch * mult[-1], 3, precision=self.precision, name="conv_in")(z_BhwC)
        x = _mid(x, cfg.ch * mult[-1], cfg, self.precision)
        for j, level in enumerate(reversed(range(n))):  # j = 0 is the lowest resolution
            x = Level(cfg.ch * mult[level], cfg.num_res_blocks + 1, attn=level == n - 1,
                      resample="up" if level != 0 else None, cfg=cfg,
                      precision=self.precision, name=f"conv_blocks_{j}")(x)
        x = swish(GroupNorm(cfg.norm_groups, cfg.norm_eps, name="norm_out")(x))
        return Conv(3, 3, precision=self.precision, name="conv_out")(x)


def _l2_normalize(x, axis=-1, eps=1e-12):
    """``F.normalize``: x / max(‖x‖, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


class VectorQuantizer(nn.Module):
    """Codebook ``embedding [V, D]`` (rows L2-normalised at use when ``codebook_l2_norm``)."""

    cfg: VQ16Config
    precision: Any = "highest"

    def setup(self):
        V, D = self.cfg.codebook_size, self.cfg.codebook_embed_dim
        l2 = self.cfg.codebook_l2_norm

        def emb_init(key, shape, dtype=jnp.float32):
            e = jax.random.uniform(key, shape, dtype, -1.0 / V, 1.0 / V)
            return _l2_normalize(e) if l2 else e
        self.embedding = self.param("embedding", nn.with_logical_partitioning(
            emb_init, ("vocab", None)), (V, D))
        if self.cfg.codebook_show_usage:  # inert usage history; kept for exact round trips
            self.codebook_used = self.param("codebook_used", nn.with_logical_partitioning(
                nn.initializers.zeros, (None,)), (self.cfg.usage_buffer_size,))

    def codebook(self) -> Array:
        """``[V, D]`` rows as used for lookup and decoding."""
        e = self.embedding.astype(jnp.float32)
        return _l2_normalize(e) if self.cfg.codebook_l2_norm else e

    def normalize_latent(self, z_BhwD: Array) -> Array:
        return _l2_normalize(z_BhwD) if self.cfg.codebook_l2_norm else z_BhwD

    def nearest(self, z_BhwD: Array) -> Array:
        """Code indices ``[B, h, w]`` int32: argmin of ``|z|² + |e|² − 2 z·e`` (first on ties).

        The ``[*, V]`` distance rows are built one latent row at a time (``lax.map`` over ``h``)
        so memory stays at ``B·w·V`` floats even for the 16384-entry codebook.
        """
        e = self.codebook()
        e_sq = jnp.sum(e ** 2, axis=1)
        prec = _precision(self.precision)

        def row(z_BwD):
            d = (jnp.sum(z_BwD ** 2, axis=-1, keepdims=True) + e_sq
                 - 2 * jnp.einsum("bwd,vd->bwv", z_BwD, e, precision=prec))
            return jnp.argmin(d, axis=-1).astype(jnp.int32)
        z = self.normalize_latent(z_BhwD.astype(jnp.float32))
        return jnp.moveaxis(jax.lax.map(row, jnp.moveaxis(z, 1, 0)), 0, 1)

    def lookup(self, codes: Array) -> Array:
        """``codes [...]`` → rows ``[..., D]`` (``get_codebook_entry``)."""
        return jnp.take(self.codebook(), codes, axis=0)

    def __call__(self, z_BhwD: Array) -> tuple[Array, Array]:
        """Eval-mode ``quantize``: (straight-through ``z + (e − z)`` ``[B,h,w,D]``, codes ``[B,h,w]``)."""
        codes = self.nearest(z_BhwD)
        z = self.normalize_latent(z_BhwD.astype(jnp.float32))
        return z + (self.lookup(codes) - z), codes


class VQModel(nn.Module):
    """The whole tokenizer. Methods (use with ``apply(..., method=...)``): ``encode_h``,
    ``encode_latent``, ``encode``, ``decode``, ``decode_code``, ``__call__`` (reconstruction)."""

    cfg: VQ16Config
    precision: Any = "highest"

    def setup(self):
        cfg = self.cfg
        self.encoder = Encoder(cfg, self.precision)
        self.decoder = Decoder(cfg, self.precision)
        self.quantize = VectorQuantizer(cfg, self.precision)
        self.quant_conv = Conv(cfg.codebook_embed_dim, 1, precision=self.precision)
        self.post_quant_conv = Conv(cfg.z_channels, 1, precision=self.precision)

    def encode_h(self, x_BHWC: Array) -> Array:
        """Encoder output ``[B, h, w, z_channels]``."""
        return self.encoder(x_BHWC)

    def encode_latent(self, x_BHWC: Array) -> Array:
        """``quant_conv(encoder(x))`` ``[B, h, w, D]`` (before L2 normalisation)."""
        return self.quant_conv(self.encoder(x_BHWC))

    def encode(self, x_BHWC: Array) -> Array:
        """Images ``[B, H, W, 3]`` in [-1, 1] → codes ``[B, h·w]`` int32, raster order."""
        codes = self.quantize.nearest(self.encode_latent(x_BHWC))
        return codes.reshape(codes.shape[0], -1)

    def decode(self, quant_BhwD: Array) -> Array:
        return self.decoder(self.post_quant_conv(quant_BhwD))

    def code_embed(self, codes_BL: Array, hw: tuple[int, int] | None = None) -> Array:
        """Codes ``[B, L]`` → normalised rows ``[B, h, w, D]`` (square grid unless ``hw`` given)."""
        B, L = codes_BL.shape
        if hw is None:
            side = int(round(math.sqrt(L)))
            if side * side != L:
                raise ValueError(f"{L} codes per image is not a square grid; pass hw=(h, w).")
            hw = (side, side)
        return self.quantize.lookup(codes_BL).reshape(B, hw[0], hw[1], -1)

    def decode_code(self, codes_BL: Array, hw: tuple[int, int] | None = None) -> Array:
        """``decode_code``: codes ``[B, L]`` → images ``[B, H, W, 3]``, not clamped."""
        return self.decode(self.code_embed(codes_BL, hw))

    def __call__(self, x_BHWC: Array) -> Array:
        """``VQModel.forward(x)[0]``: decode of the straight-through quantised latents."""
        quant, _ = self.quantize(self.encode_latent(x_BHWC))
        return self.decode(quant)


# ----------------------------------------------------------------------------------------------
# Pure functions over a params pytree


def init_boxed(cfg: VQ16Config, rng: Array) -> dict:
    """Params with their logical-partitioning boxes (for ``sharding.sharded_init``)."""
    x = jnp.zeros((1, 2 * cfg.downsample, 2 * cfg.downsample, 3), jnp.float32)
    return VQModel(cfg).init(rng, x, method=VQModel.__call__)["params"]


def init_params(cfg: VQ16Config, rng: Array | int = 0) -> dict:
    """Official-style random init: PyTorch's default conv init U(±1/sqrt(fan_in)) for weights
    and biases, GroupNorm 1/0, codebook U(±1/V) with L2-normalised rows, usage buffer 0.

    Drawn on the host with numpy from the module's parameter shapes (the same distributions as
    the modules' own initialisers): jit-compiling a conv net's init takes minutes on CPU.
    """
    seed = (np.asarray(jax.random.key_data(rng)).ravel().tolist()
            if isinstance(rng, jax.Array) else [int(rng)])
    gen = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(init_boxed(cfg, jax.random.PRNGKey(0))))

    def init_node(node):
        out = {}
        fan_in = None
        if "kernel" in node:
            kh, kw, cin, _ = node["kernel"].shape
            fan_in = kh * kw * cin
        for name, leaf in node.items():
            if isinstance(leaf, dict):
                out[name] = init_node(leaf)
            elif name in ("kernel", "bias") and fan_in is not None:
                b = 1.0 / math.sqrt(fan_in)
                out[name] = gen.uniform(-b, b, leaf.shape).astype(np.float32)
            elif name == "scale":
                out[name] = np.ones(leaf.shape, np.float32)
            elif name in ("bias", "codebook_used"):
                out[name] = np.zeros(leaf.shape, np.float32)
            elif name == "embedding":
                V = leaf.shape[0]
                e = gen.uniform(-1.0 / V, 1.0 / V, leaf.shape).astype(np.float32)
                if cfg.codebook_l2_norm:
                    e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
                out[name] = e
            else:
                raise AssertionError(f"no initialiser for parameter {name}")
        return out
    return jax.tree_util.tree_map(jnp.asarray, init_node(shapes))


@functools.partial(jax.jit, static_argnames=("cfg", "precision"))
def encode(params, cfg: VQ16Config, images_BHWC: Array, precision: Any = "highest") -> Array:
    """Codes ``[B, h·w]`` int32 for images ``[B, H, W, 3]`` in [-1, 1]."""
    return VQModel(cfg, precision).apply({"params": params}, images_BHWC, method=VQModel.encode)


@functools.partial(jax.jit, static_argnames=("cfg", "hw", "precision"))
def decode_code(params, cfg: VQ16Config, codes_BL: Array, hw: tuple[int, int] | None = None,
                precision: Any = "highest") -> Array:
    """Images ``[B, H, W, 3]`` (≈[-1, 1], not clamped) from codes ``[B, L]``."""
    return VQModel(cfg, precision).apply({"params": params}, codes_BL, hw, method=VQModel.decode_code)


def params_checksum(params) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes: identifies the tokenizer weights
    independently of the container (official ``.pt`` or Orbax)."""
    import hashlib
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params),
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()
