"""LlamaGen class-conditional GPT (c2i), the official ``autoregressive/models/gpt.py`` in Flax linen.

Spec: ../shared/spec/llamagen.md. One module serves teacher forcing (training, CCA scoring) and
KV-cached decoding (sampling): :class:`Transformer` runs a window of positions
``[index, index + L)``; without a cache the window is the whole sequence under a causal mask, with
a cache (a tuple of :class:`~cca_jax.models.attention.KVCache`, one per layer, passed in and
returned) the window's keys/values are written at ``index`` and attend to everything before.

Sequence layout: position 0 holds the class embedding, position t >= 1 holds image token
z_{t-1}; logits at position t predict z_t. 2-D RoPE rotates position t by the grid cell of
z_{t-1}; the class slot's table row is all zeros, so the class token's q and k are zero vectors.

Precision: parameters are float32; ``dtype`` is the matmul/attention compute dtype. The residual
stream stays float32 (as under PyTorch bf16 autocast), RMSNorm and RoPE run in float32, logits
are returned as float32.

Shapes: ``B`` batch, ``L`` positions in the window, ``N`` image tokens (= block_size), ``C`` dim,
``H`` heads, ``K`` key/value heads, ``D`` head dim, ``V`` vocab, ``S`` cache length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cca_jax.models import attention as attn_lib
from cca_jax.models import layers

Cache = tuple[attn_lib.KVCache, ...]

# Official ModelArgs fields that have no effect on a c2i model (t2i / cache-size knobs).
_IGNORED_MODEL_ARGS = ("caption_dim", "max_batch_size", "max_seq_len")
TOKENIZER_DOWNSAMPLE = 16  # VQ-16: image_size // 16 tokens per side


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is >= ``n``."""
    return n if n % k == 0 else n + k - (n % k)


@dataclasses.dataclass(frozen=True)
class LlamaGenConfig:
    """Hyper-parameters; field names and defaults are the official ``ModelArgs`` ones."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256

    def __post_init__(self):
        if self.dim % self.n_head:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_head={self.n_head}.")
        if self.n_head % self.kv_heads:
            raise ValueError(f"model.n_head={self.n_head} is not a multiple of "
                             f"model.n_kv_head={self.n_kv_head}.")
        if self.head_dim % 4:
            raise ValueError(f"head dim {self.head_dim} (= dim/n_head) must be a multiple of 4 for "
                             "2-D RoPE (two axes of interleaved pairs); change model.dim/n_head.")
        g = int(round(self.block_size ** 0.5))
        if g * g != self.block_size:
            raise ValueError(f"model.block_size={self.block_size} must be a perfect square "
                             "(2-D RoPE over a square token grid).")
        if self.cls_token_num != 1:
            raise ValueError(f"model.cls_token_num={self.cls_token_num}: the c2i class embedder "
                             "emits exactly one token; set it to 1.")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_model_args(cls, args: Mapping[str, Any]) -> "LlamaGenConfig":
        """From an official ``ModelArgs`` dict (e.g. a fixture json's ``model_args``)."""
        args = dict(args)
        model_type = args.pop("model_type", "c2i")
        if model_type != "c2i":
            raise ValueError(f"model_type={model_type!r}: only the class-conditional 'c2i' GPT "
                             "is implemented.")
        for k in _IGNORED_MODEL_ARGS:
            args.pop(k, None)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - fields)
        if unknown:
            raise ValueError(f"Unknown LlamaGen ModelArgs fields {unknown}; known: {sorted(fields)}.")
        return cls(**args)

    @classmethod
    def from_config(cls, model_cfg: Any) -> "LlamaGenConfig":
        """From ``config.model`` (official field names plus ``family`` and ``image_size``).

        ``block_size`` defaults to ``(image_size // 16)²``; if both are given they must agree.
        """
        d = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
        family = d.pop("family", "llamagen")
        if family != "llamagen":
            raise ValueError(f"config.model.family={family!r}, expected 'llamagen'.")
        image_size = d.pop("image_size", None)
        if image_size is not None:
            if image_size % TOKENIZER_DOWNSAMPLE:
                raise ValueError(f"config.model.image_size={image_size} is not a multiple of "
                                 f"{TOKENIZER_DOWNSAMPLE} (VQ-16 tokenizer).")
            n = (image_size // TOKENIZER_DOWNSAMPLE) ** 2
            if d.setdefault("block_size", n) != n:
                raise ValueError(f"config.model.block_size={d['block_size']} disagrees with "
                                 f"image_size={image_size} (expects {n}); drop one of them.")
        return cls.from_model_args(d)

    # ---- derived sizes ------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def ffn_hidden_dim(self) -> int:
        """Official FeedForward size: int(2/3 · 4·dim), optional multiplier, round up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def grid_size(self) -> int:
        return int(round(self.block_size ** 0.5))

    @property
    def has_null_class(self) -> bool:
        """The class table has the extra null row iff class_dropout_prob > 0 (official rule)."""
        return self.class_dropout_prob > 0

    @property
    def null_class(self) -> int:
        """Label of the unconditional class (row ``num_classes`` of the table)."""
        return self.num_classes

    @property
    def class_rows(self) -> int:
        return self.num_classes + int(self.has_null_class)

    @property
    def seq_len(self) -> int:
        """Sequence length in teacher forcing: class slot(s) + N - 1 tokens = N logits."""
        return self.block_size

    @property
    def cache_len(self) -> int:
        """Static KV-cache length used by the official sampler: round_up(cls + N, 8)."""
        return find_multiple(self.cls_token_num + self.block_size, 8)


# ---- 2-D rotary embedding ---------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def rope_table(grid_size: int, head_dim: int, base: float = 10000.0,
               cls_token_num: int = 1) -> np.ndarray:
    """``[cls + G², D/2, 2]`` (cos, sin) table of ``precompute_freqs_cis_2d``, float32.

    Pair k < D/4 rotates with the grid row, pair k >= D/4 with the column; the ``cls`` leading rows
    are zeros (not an identity rotation). Computed in float32 like the official table.
    """
    half = head_dim // 2
    q = half // 2
    if 2 * q != half:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 4 for 2-D RoPE.")
    expo = np.arange(0, half, 2, dtype=np.float32)[:q] / np.float32(half)
    freqs = np.float32(1.0) / np.power(np.float32(base), expo, dtype=np.float32)
    t = np.arange(grid_size, dtype=np.float32)
    f_GQ = np.outer(t, freqs).astype(np.float32)
    grid = np.concatenate([np.broadcast_to(f_GQ[:, None, :], (grid_size, grid_size, q)),
                           np.broadcast_to(f_GQ[None, :, :], (grid_size, grid_size, q))], axis=-1)
    cache = np.stack([np.cos(grid), np.sin(grid)], axis=-1).astype(np.float32)
    cache = cache.reshape(grid_size * grid_size, half, 2)
    return np.concatenate([np.zeros((cls_token_num, half, 2), np.float32), cache], axis=0)


def apply_rope(x_BLHD: jax.Array, rope_Lh2: jax.Array) -> jax.Array:
    """Rotates interleaved pairs ``(x[2k], x[2k+1])`` by the table rows; float32 math, input dtype out."""
    B, L, H, D = x_BLHD.shape
    x = x_BLHD.astype(jnp.float32).reshape(B, L, H, D // 2, 2)
    c = rope_Lh2[None, :, None, :, 0]
    s = rope_Lh2[None, :, None, :, 1]
    x0, x1 = x[..., 0], x[..., 1]
    out = jnp.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1)
    return out.reshape(B, L, H, D).astype(x_BLHD.dtype)


# ---- decode cache -------------------------------------------------------------------------------

@flax.struct.dataclass
class HeadMajorKVCache(attn_lib.KVCache):
    """A :class:`~cca_jax.models.attention.KVCache` stored head-major: ``k, v [B, K, S, D]``.

    Same ``update(k_BLKD, v_BLKD, index)`` contract; :meth:`kv_blocks` gives ``[B, S, K, D]``
    transposed views for :func:`~cca_jax.models.attention.attend_kv_blocks`. Why: XLA's batched
    dot wants the (batch, head) axes leading; with the sequence-major layout XLA copies a
    transposed cache in every layer at every decode step (on CPU, attention over the cache alone
    measured 4.9 ms vs 0.2 ms of CPU time per layer-step at B=8, S=264, H=8, D=64). With this
    layout the transposes cancel inside the dot and nothing is copied. (Official LlamaGen uses
    the same ``(batch, heads, seq, head_dim)`` buffers.)
    """

    @classmethod
    def zeros(cls, batch: int, max_len: int, kv_heads: int, head_dim: int,
              dtype=jnp.float32) -> "HeadMajorKVCache":
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k_BLKD: jax.Array, v_BLKD: jax.Array, index: jax.Array | int
               ) -> "HeadMajorKVCache":
        """Writes ``L`` new positions starting at (traced) ``index``."""
        index = jnp.asarray(index, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        start = (zero, zero, index, zero)
        put = lambda buf, x: jax.lax.dynamic_update_slice(
            buf, x.astype(buf.dtype).transpose(0, 2, 1, 3), start)
        return HeadMajorKVCache(k=put(self.k, k_BLKD), v=put(self.v, v_BLKD))

    def kv_blocks(self) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """``((k, v),)`` as ``[B, S, K, D]`` (transposed views)."""
        return ((self.k.transpose(0, 2, 1, 3), self.v.transpose(0, 2, 1, 3)),)


@flax.struct.dataclass
class BlockedKVCache:
    """One layer's cache split into ``G`` head-major blocks of ``block_len`` slots (block ``j``
    holds positions ``[j·block_len, (j+1)·block_len)``), of which the first ``active`` are read.

    Why: a decode step reads every slot of a static-size cache, filled or not, so over a
    generation it reads about twice the keys it needs (at BENCH-LLAMAGEN, 69 MB a step next to
    143 MB of weights).
    The sampler runs one ``fori_loop`` per block with ``active`` = that block + 1 (static), so a
    step reads only the blocks written so far, and writes into the last active one.
    ``update(k, v, index)`` requires positions ``[index, index + L)`` to lie in block
    ``active - 1``; :func:`decode_segments` gives the step ranges that guarantee it.
    """

    blocks: tuple[HeadMajorKVCache, ...]
    block_len: int = flax.struct.field(pytree_node=False)
    active: int = flax.struct.field(pytree_node=False, default=1)

    @classmethod
    def zeros(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, block_len: int,
              dtype=jnp.float32) -> "BlockedKVCache":
        n = -(-max_len // block_len)
        return cls(tuple(HeadMajorKVCache.zeros(batch, block_len, kv_heads, head_dim, dtype)
                         for _ in range(n)), block_len)

    @property
    def max_len(self) -> int:
        """Slots visible to the next step (the cache as :func:`cached_mask` sees it)."""
        return self.active * self.block_len

    def with_active(self, active: int) -> "BlockedKVCache":
        if not 1 <= active <= len(self.blocks):
            raise ValueError(f"active={active} blocks; the cache has {len(self.blocks)}.")
        return self.replace(active=active)

    def update(self, k_BLKD: jax.Array, v_BLKD: jax.Array, index: jax.Array | int
               ) -> "BlockedKVCache":
        """Writes ``L`` new positions at (traced) ``index`` into block ``active - 1``."""
        j = self.active - 1
        blocks = list(self.blocks)
        local = jnp.asarray(index, jnp.int32) - j * self.block_len
        blocks[j] = blocks[j].update(k_BLKD, v_BLKD, local)
        return self.replace(blocks=tuple(blocks))

    def kv_blocks(self) -> tuple[tuple[jax.Array, jax.Array], ...]:
        return tuple(b.kv_blocks()[0] for b in self.blocks[:self.active])


def decode_segments(first_slot: int, steps: tuple[int, int], block_len: int
                    ) -> tuple[tuple[int, int, int], ...]:
    """Split decode steps ``[lo, hi)`` (step ``i`` writes slot ``first_slot + i``) into
    ``(lo_g, hi_g, active)`` ranges whose slots all lie in block ``active - 1``."""
    lo, hi = steps
    out = []
    for j in range((first_slot + lo) // block_len, -(-(first_slot + hi) // block_len)):
        a, b = max(lo, j * block_len - first_slot), min(hi, (j + 1) * block_len - first_slot)
        if a < b:
            out.append((a, b, j + 1))
    return tuple(out)


# ---- modules ----------------------------------------------------------------------------------

class LabelEmbedder(nn.Module):
    """Class table ``[num_classes (+1 null row), C]``; in training, labels become the null class
    with prob ``class_dropout_prob`` (one uniform draw per sample from the 'dropout' stream)."""

    cfg: LlamaGenConfig

    @nn.compact
    def __call__(self, labels_B: jax.Array, *, train: bool) -> jax.Array:
        cfg = self.cfg
        if train and cfg.class_dropout_prob > 0:
            u = jax.random.uniform(self.make_rng("dropout"), labels_B.shape)
            labels_B = jnp.where(u < cfg.class_dropout_prob, cfg.null_class, labels_B)
        table = layers.embed(cfg.class_rows, cfg.dim, ("classes", "embed"),
                             embedding_init=layers.normal_init(cfg.initializer_range),
                             name="embedding_table")
        return table(labels_B)[:, None, :]


class Attention(nn.Module):
    """Fused-qkv attention with 2-D RoPE and GQA; optionally reads/writes a KV cache.

    ``wqkv`` kernel ``[C, (H + 2K)·D]``: output features ``[q | k | v]``, head h at ``[h·D, (h+1)·D)``.
    """

    cfg: LlamaGenConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BLC: jax.Array, rope_Lh2: jax.Array, *, train: bool,
                 cache: Optional[attn_lib.KVCache] = None, index: jax.Array | int = 0
                 ) -> tuple[jax.Array, Optional[attn_lib.KVCache]]:
        cfg = self.cfg
        B, L, _ = x_BLC.shape
        H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
        init = layers.normal_init(cfg.initializer_range)
        qkv = layers.dense((H + 2 * K) * D, ("embed", "qkv"), dtype=self.dtype, kernel_init=init,
                           name="wqkv")(x_BLC)
        q = qkv[..., :H * D].reshape(B, L, H, D)
        k = qkv[..., H * D:(H + K) * D].reshape(B, L, K, D)
        v = qkv[..., (H + K) * D:].reshape(B, L, K, D)
        q = apply_rope(q, rope_Lh2)
        k = apply_rope(k, rope_Lh2)
        names = ("act_batch", "act_length", "act_heads", "act_kv")
        q, k, v = (nn.with_logical_constraint(t, names) for t in (q, k, v))
        if cache is None:
            keys, values, mask = k, v, attn_lib.causal_mask(L)
        else:
            cache = cache.update(k, v, index)
            mask = attn_lib.cached_mask(index, L, cache.max_len, causal=True)
        use_drop = train and cfg.attn_dropout_p > 0
        kv_blocks = (((keys, values),) if cache is None else cache.kv_blocks())
        out = attn_lib.attend_kv_blocks(
            q, [(kb.astype(q.dtype), vb.astype(q.dtype)) for kb, vb in kv_blocks], mask=mask,
            dropout_rate=cfg.attn_dropout_p,
            dropout_rng=self.make_rng("dropout") if use_drop else None,
            deterministic=not use_drop)
        out = layers.dense(cfg.dim, ("heads", "embed"), dtype=self.dtype, kernel_init=init,
                           name="wo")(out.reshape(B, L, H * D))
        out = nn.Dropout(cfg.resid_dropout_p)(out, deterministic=not train)
        return out, cache


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + dp(attn(norm(x)))``, ``out = h + dp(ffn(norm(h)))``."""

    cfg: LlamaGenConfig
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BLC: jax.Array, rope_Lh2: jax.Array, train: bool,
                 cache: Optional[attn_lib.KVCache] = None, index: jax.Array | int = 0
                 ) -> tuple[jax.Array, Optional[attn_lib.KVCache]]:
        cfg = self.cfg
        dp = layers.DropPath(self.drop_path)
        a, cache = Attention(cfg, self.dtype, name="attention")(
            layers.RMSNorm(cfg.norm_eps, name="attention_norm")(x_BLC), rope_Lh2,
            train=train, cache=cache, index=index)
        h = x_BLC + dp(a, deterministic=not train)
        f = layers.SwiGLU(cfg.ffn_hidden_dim, cfg.ffn_dropout_p, self.dtype,
                          layers.normal_init(cfg.initializer_range), name="feed_forward")(
            layers.RMSNorm(cfg.norm_eps, name="ffn_norm")(h), deterministic=not train)
        out = h + dp(f, deterministic=not train)
        return nn.with_logical_constraint(out, layers.ACT_BLC), cache


class Transformer(nn.Module):
    """The c2i GPT.

    Teacher forcing: ``apply({'params': p}, cond_idx[B], idx[B, N-1], train)`` -> logits
    ``[B, N, V]`` float32 (``logits[:, t]`` predicts z_t). In train mode label dropout, token /
    residual / FFN / attention dropout and drop path draw from the ``'dropout'`` rng stream.

    Cached decoding: pass ``cache`` (tuple of per-layer ``KVCache``, see :func:`init_cache`) and
    the window start ``index``; returns ``(logits [B, L, V], new_cache)``. ``cond_idx`` alone is
    the prefill (``L = 1``, class slot), ``idx`` alone a decode window of image tokens at
    positions ``[index, index + L)`` (token z_i sits at position i + 1), both together a full
    prefix from position 0.
    """

    cfg: LlamaGenConfig
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.cfg
        self.cls_embedding = LabelEmbedder(cfg)
        self.tok_embeddings = layers.embed(cfg.vocab_size, cfg.dim, ("vocab", "embed"),
                                           embedding_init=layers.normal_init(cfg.initializer_range))
        block = nn.remat(TransformerBlock, static_argnums=(3,)) if self.remat else TransformerBlock
        self.layers = [block(cfg, rate, self.dtype)
                       for rate in layers.drop_path_rates(cfg.drop_path_rate, cfg.n_layer)]
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.norm = layers.RMSNorm(cfg.norm_eps)
        # official init zeroes the head
        self.output = layers.dense(cfg.vocab_size, ("embed", "vocab"), dtype=self.dtype,
                                   kernel_init=nn.initializers.zeros)

    def __call__(self, cond_idx: Optional[jax.Array], idx: Optional[jax.Array], train: bool = False,
                 *, cache: Optional[Cache] = None, index: jax.Array | int = 0):
        cfg = self.cfg
        parts = []
        if cond_idx is not None:
            parts.append(self.cls_embedding(cond_idx, train=train)[:, :cfg.cls_token_num])
        if idx is not None:
            parts.append(self.tok_embeddings(idx))
        if not parts:
            raise ValueError("Transformer needs cond_idx (class slot) and/or idx (image tokens).")
        h_BLC = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        # token dropout hits the class slot too (official)
        h_BLC = self.tok_dropout(h_BLC, deterministic=not train)
        h_BLC = nn.with_logical_constraint(h_BLC, layers.ACT_BLC)
        L = h_BLC.shape[1]
        table = jnp.asarray(rope_table(cfg.grid_size, cfg.head_dim, cfg.rope_base,
                                       cfg.cls_token_num))
        if cache is None:
            rope_Lh2 = table[:L]
        else:
            if len(cache) != cfg.n_layer:
                raise ValueError(f"cache has {len(cache)} layers, model has {cfg.n_layer}.")
            rope_Lh2 = jax.lax.dynamic_slice_in_dim(table, jnp.asarray(index, jnp.int32), L)
        new_cache = []
        for i, block in enumerate(self.layers):
            h_BLC, c = block(h_BLC, rope_Lh2, train, None if cache is None else cache[i], index)
            new_cache.append(c)
        h_BLC = self.norm(h_BLC)
        logits = self.output(h_BLC).astype(jnp.float32)
        logits = nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
        if cache is None:
            # training branch of the official forward: logits[:, cls_token_num - 1:]
            return logits[:, cfg.cls_token_num - 1:]
        return logits, tuple(new_cache)


# ---- functional helpers -----------------------------------------------------------------------

def init_cache(cfg: LlamaGenConfig, batch: int, max_len: Optional[int] = None,
               dtype: Any = jnp.float32, *, block_len: Optional[int] = None) -> Cache:
    """Zeroed per-layer :class:`HeadMajorKVCache` s, ``k, v [batch, K, max_len, D]`` (default
    ``max_len = cfg.cache_len``), or with ``block_len`` per-layer :class:`BlockedKVCache` s of
    ``ceil(max_len / block_len)`` blocks (``active`` = 1). The model also accepts plain
    sequence-major ``KVCache`` s."""
    max_len = cfg.cache_len if max_len is None else max_len
    if block_len is not None:
        return tuple(BlockedKVCache.zeros(batch, max_len, cfg.kv_heads, cfg.head_dim, block_len,
                                          dtype) for _ in range(cfg.n_layer))
    return tuple(HeadMajorKVCache.zeros(batch, max_len, cfg.kv_heads, cfg.head_dim, dtype)
                 for _ in range(cfg.n_layer))


def _init_boxed(cfg: LlamaGenConfig, rng: jax.Array):
    model = Transformer(cfg)
    return model.init({"params": rng}, jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                      False)["params"]


def init_params(cfg: LlamaGenConfig, rng: jax.Array, *, boxed: bool = False):
    """Official initialisation: Linear/Embedding ~ N(0, initializer_range²), head 0, norms 1.

    boxed=True keeps the ``nn.Partitioned`` logical-axis boxes (for ``sharding.sharded_init``).
    """
    params = jax.jit(functools.partial(_init_boxed, cfg))(rng)
    return params if boxed else nn.meta.unbox(params)


def param_shapes(cfg: LlamaGenConfig):
    """Abstract (``ShapeDtypeStruct``) params without allocating anything."""
    return nn.meta.unbox(jax.eval_shape(functools.partial(_init_boxed, cfg), jax.random.key(0)))


def param_count(cfg: LlamaGenConfig) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(param_shapes(cfg))))


def logical_specs(cfg: LlamaGenConfig):
    """Pytree of logical ``PartitionSpec``s matching the params pytree."""
    return nn.get_partition_spec(jax.eval_shape(functools.partial(_init_boxed, cfg),
                                                jax.random.key(0)))


def sequence_logits(params, cfg: LlamaGenConfig, cond_idx_B: jax.Array, tokens_BN: jax.Array, *,
                    train: bool = False, rng: Optional[jax.Array] = None, dtype: Any = jnp.float32
                    ) -> jax.Array:
    """Teacher-forcing logits ``[B, N, V]`` for full token sequences ``tokens [B, N]``."""
    rngs = {"dropout": rng} if rng is not None else {}
    return Transformer(cfg, dtype).apply({"params": params}, cond_idx_B, tokens_BN[:, :-1], train,
                                         rngs=rngs)
