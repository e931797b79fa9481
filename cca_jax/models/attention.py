"""The attention core shared by LlamaGen and VAR, for training and for KV-cached decoding.

Each model projects its own q/k/v (LlamaGen: fused ``wqkv`` + 2-D RoPE; VAR: ``mat_qkv`` with
q/v biases and L2-normalised q/k) and then calls :func:`attend`. Decoding keeps the keys and values
of all earlier positions in a :class:`KVCache` of static size ``S`` and writes new ones at a traced
offset with :func:`KVCache.update`, so a whole generation jits into one ``lax`` loop.

Shapes: ``B`` batch, ``L`` query positions, ``S`` key positions, ``H`` query heads, ``K`` key/value
heads (``H % K == 0``; GQA repeats each key head ``H // K`` times), ``D`` head dim.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cca_jax.models import matmul


def attend(q_BLHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, *,
           mask: Optional[jax.Array] = None, scale: jax.Array | float | None = None,
           dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None,
           deterministic: bool = True) -> jax.Array:
    """Softmax attention; returns ``[B, L, H, D]`` in q's dtype.

    mask: boolean, broadcastable to ``[B, H, L, S]``; True = may attend.
    scale: multiplies q·k (default ``1/sqrt(D)``); may be an array broadcastable to
      ``[B, H, L, S]`` (VAR scales each head separately and passes its scale in q instead).
    Logits and softmax are computed in float32 whatever the activation dtype.
    """
    return attend_kv_blocks(q_BLHD, ((k_BSKD, v_BSKD),), mask=mask, scale=scale,
                            dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                            deterministic=deterministic)


def attend_kv_blocks(q_BLHD: jax.Array, kv_blocks: Sequence[tuple[jax.Array, jax.Array]], *,
                     mask: Optional[jax.Array] = None, scale: jax.Array | float | None = None,
                     dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None,
                     deterministic: bool = True) -> jax.Array:
    """:func:`attend` over keys/values held in consecutive blocks ``((k_j, v_j) [B, S_j, K, D],
    ...)``: the result of attending to their concatenation along ``S`` (``mask`` and ``scale``
    are over that concatenation, ``S = sum S_j``), without ever concatenating them. Decoding uses
    it to read only the filled blocks of a blocked KV cache; the softmax is one float32 softmax
    over all blocks' logits (small: ``[B, H, L, S]``), then each block's values are mixed and
    the partial results summed.
    """
    out_BHLD = _attend_head_major(
        _heads_first(q_BLHD), [(_heads_first(k), _heads_first(v)) for k, v in kv_blocks],
        mask=mask, scale=scale, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        deterministic=deterministic)
    return nn.with_logical_constraint(_heads_first(out_BHLD),
                                      ("act_batch", "act_length", "act_heads", "act_kv"))


def _heads_first(x: jax.Array) -> jax.Array:
    """``[B, L, H, D] <-> [B, H, L, D]``.

    Why the attention products run head-major: with the (batch, head) axes leading, each is a
    plain batched GEMM. Given ``[B, L, H, D]`` operands XLA:CPU picks strided layouts in which
    the score and value products run at 13-40 GFLOP/s; one explicit transpose per operand costs
    less (BENCH-LLAMAGEN step profile: attention products and their copies 0.88 -> 0.52 s of
    thread time; ``python -m cca_jax.bench.attention --shape llamagen``: forward 1.3-1.5x
    faster). A head-major KV cache (llamagen.HeadMajorKVCache) hands out ``[B, S, K, D]`` views
    of ``[B, K, S, D]`` buffers, so there the two transposes cancel and nothing is copied.
    """
    return jnp.swapaxes(x, 1, 2)


def _attend_head_major(q_BHLD: jax.Array, kv_blocks: Sequence[tuple[jax.Array, jax.Array]], *,
                       mask: Optional[jax.Array], scale: jax.Array | float | None,
                       dropout_rate: float, dropout_rng: Optional[jax.Array],
                       deterministic: bool) -> jax.Array:
    """The attention core on head-major operands: ``q [B, H, L, D]``, blocks ``(k, v) [B, K, S_j,
    D]`` -> ``[B, H, L, D]`` in q's dtype (``mask``/``scale`` broadcastable to ``[B, H, L, S]``)."""
    B, H, L, D = q_BHLD.shape
    K = kv_blocks[0][0].shape[1]
    if H % K:
        raise ValueError(f"{H} query heads are not a multiple of {K} key/value heads.")
    if K != H:  # GQA: each key/value head serves H // K consecutive query heads
        kv_blocks = [(jnp.repeat(k, H // K, axis=1), jnp.repeat(v, H // K, axis=1))
                     for k, v in kv_blocks]
    if scale is None:
        scale = 1.0 / jnp.sqrt(jnp.float32(D))
    logits = [matmul.einsum("bhld,bhsd->bhls", q_BHLD, k, dtype=q_BHLD.dtype, out_dtype=jnp.float32)
              for k, _ in kv_blocks]
    logits_BHLS = (logits[0] if len(logits) == 1 else jnp.concatenate(logits, axis=-1)) * scale
    if mask is not None:
        logits_BHLS = jnp.where(mask, logits_BHLS, jnp.finfo(jnp.float32).min)
    probs_BHLS = jax.nn.softmax(logits_BHLS, axis=-1)
    if dropout_rate > 0.0 and not deterministic:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BHLS.shape)
        probs_BHLS = jnp.where(keep, probs_BHLS / (1.0 - dropout_rate), 0.0)
    out, begin = None, 0
    for _, v in kv_blocks:
        S = v.shape[2]
        p = probs_BHLS if len(kv_blocks) == 1 else probs_BHLS[..., begin:begin + S]
        part = matmul.einsum("bhls,bhsd->bhld", p, v, dtype=v.dtype, out_dtype=q_BHLD.dtype)
        out = part if out is None else out + part
        begin += S
    return out


def level_blocks(level_L: Sequence[int], min_rows: int = 1) -> tuple[tuple[int, int], ...]:
    """Query blocks ``(begin, end)`` of a nondecreasing ``[L]`` level sequence (VAR: the scale of
    each token), cut only where the level changes and merged until each has ``>= min_rows`` rows
    (the last may be smaller)."""
    level = np.asarray(level_L)
    if level.ndim != 1 or np.any(np.diff(level) < 0):
        raise ValueError(f"level_L must be a nondecreasing 1-D sequence, got {level!r}.")
    cuts = [int(i) for i in np.flatnonzero(np.diff(level)) + 1] + [len(level)]
    blocks, begin = [], 0
    for end in cuts:
        if end - begin >= min_rows or end == len(level):
            blocks.append((begin, end))
            begin = end
    return tuple(blocks)


def attend_block_causal(q_BLHD: jax.Array, k_BLKD: jax.Array, v_BLKD: jax.Array, level_L: Sequence[int], *,
                        min_rows: int = 1, scale: jax.Array | float | None = None,
                        dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None,
                        deterministic: bool = True) -> jax.Array:
    """Block-causal attention (query sees key iff ``level[key] <= level[query]``) that never
    computes the masked part: each query block of :func:`level_blocks` attends only to the key
    prefix ending with it, which holds every key it may see. Equal to :func:`attend` with the
    full ``[L, L]`` mask; for VAR's ten scales it does 64 % of the score FLOPs and no masking
    outside the merged small scales. ``level_L`` is static (numpy / tuple); returns ``[B, L, H, D]``.
    """
    level = np.asarray(level_L)
    L = q_BLHD.shape[1]
    if level.shape != (L,) or k_BLKD.shape[1] != L:
        raise ValueError(f"level_L has shape {level.shape} and keys {k_BLKD.shape[1]} positions; "
                         f"both must match the {L} queries.")
    q, k, v = _heads_first(q_BLHD), _heads_first(k_BLKD), _heads_first(v_BLKD)
    outs = []
    for i, (b, e) in enumerate(level_blocks(level, min_rows)):
        lvl_q = level[b:e]
        # keys before the block all have a lower level; only a merged block needs a mask
        mask = None if lvl_q[0] == lvl_q[-1] else (lvl_q[:, None] >= level[None, :e])[None, None]
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
        outs.append(_attend_head_major(q[:, :, b:e], [(k[:, :, :e], v[:, :, :e])], mask=mask,
                                       scale=scale, dropout_rate=dropout_rate, dropout_rng=rng,
                                       deterministic=deterministic))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return nn.with_logical_constraint(_heads_first(out),
                                      ("act_batch", "act_length", "act_heads", "act_kv"))


def causal_mask(L: int) -> jax.Array:
    """``[1, 1, L, L]``: position i attends to j <= i."""
    return jnp.tril(jnp.ones((L, L), bool))[None, None]


@flax.struct.dataclass
class KVCache:
    """Keys and values of one attention layer for positions ``[0, S)``: ``k, v [B, S, K, D]``."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, max_len, kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def kv_blocks(self) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """The cache as :func:`attend_kv_blocks` reads it: ``((k, v) [B, S, K, D],)``."""
        return ((self.k, self.v),)

    def update(self, k_BLKD: jax.Array, v_BLKD: jax.Array, index: jax.Array | int) -> "KVCache":
        """Writes ``L`` new positions starting at (traced) ``index``."""
        index = jnp.asarray(index, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        start = (zero, index, zero, zero)
        return KVCache(k=jax.lax.dynamic_update_slice(self.k, k_BLKD.astype(self.k.dtype), start),
                       v=jax.lax.dynamic_update_slice(self.v, v_BLKD.astype(self.v.dtype), start))


def cached_mask(index: jax.Array | int, L: int, S: int, *, causal: bool) -> jax.Array:
    """``[1, 1, L, S]`` mask for ``L`` queries at positions ``[index, index+L)`` over a cache of ``S``.

    causal=True (LlamaGen): query at position p sees keys ``<= p``.
    causal=False (VAR, block-causal by scale): every query of the block sees keys ``< index+L``.
    """
    q_pos = jnp.asarray(index, jnp.int32) + jnp.arange(L)[:, None]
    k_pos = jnp.arange(S)[None, :]
    m = k_pos <= q_pos if causal else k_pos < jnp.asarray(index, jnp.int32) + L
    return m[None, None]
