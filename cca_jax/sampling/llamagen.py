"""LlamaGen c2i sampling: the official ``generate()`` as one jitted KV-cached loop.

Spec: ../shared/spec/sampling.md §1. Per call: a static-size cache (``round_up(1 + N, 8)``
slots), a prefill of the class slot, then N - 1 one-token steps inside ``lax.fori_loop``. A
long cache is split into blocks with one loop per block, so each step reads only the blocks
already written (``cache_block_len``; about half the cache traffic over a generation).
Per step, in the official order: CFG combination ``ℓ_u + s·(ℓ_c − ℓ_u)`` (only when
``cfg_scale > 1``; the prefill always guides, decode step i stops guiding once
``cfg_interval > -1 and i > cfg_interval``), then temperature, then top-k, then top-p, then a
categorical draw (or argmax when ``sample_logits=False``).

Guidance-free sampling (``cfg_scale <= 1``) runs only the conditional batch; CFG runs
``[labels ; null]`` (conditional half first) and feeds the same token to both halves.

``use_cache=False`` recomputes the whole prefix at every step with the teacher-forcing forward
(same module, causal mask): the reference for the cache tests and the benchmark baseline.

Shapes: ``B`` batch, ``N`` tokens per image, ``V`` vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from cca_jax.models import llamagen as lg
from cca_jax.models import matmul
from cca_jax.sampling import class_labels, select


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """Official ``generate``/``sample`` knobs (defaults: guidance-free, plain multinomial)."""

    cfg_scale: float = 1.0  # > 1 doubles the batch with null-class rows
    cfg_interval: int = -1  # > -1: decode step i > cfg_interval uses the conditional logits only
    temperature: float = 1.0  # divides the (guided) logits; clamped at 1e-5
    top_k: int = 0  # > 0: drop logits strictly below the k-th largest
    top_p: float = 1.0  # < 1: nucleus filtering after top-k (HF v3.2 semantics)
    sample_logits: bool = True  # False: argmax instead of a categorical draw

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0

    @classmethod
    def from_config(cls, sample_cfg: Any) -> "SampleOptions":
        """From ``config.sample`` (cfg_scale, temperature, top_k, top_p; cfg_interval optional)."""
        get = (lambda k, d: sample_cfg.get(k, d))
        return cls(cfg_scale=float(get("cfg_scale", 1.0)), cfg_interval=int(get("cfg_interval", -1)),
                   temperature=float(get("temperature", 1.0)), top_k=int(get("top_k", 0)),
                   top_p=float(get("top_p", 1.0)), sample_logits=bool(get("sample_logits", True)))


def top_k_top_p_filter(logits_BV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """HuggingFace-v3.2 ``top_k_top_p_filtering`` (removed logits become -inf).

    top-k keeps every logit >= the k-th largest (ties survive); top-p (after top-k) sorts
    descending and removes rank r iff the cumulative probability of ranks < r exceeds ``top_p``
    (rank 0 always survives).
    """
    V = logits_BV.shape[-1]
    if top_k > 0:
        k = min(max(int(top_k), 1), V)
        logits_BV = jnp.where(logits_BV < select.kth_largest(logits_BV, k), -jnp.inf, logits_BV)
    if top_p < 1.0:
        order = jnp.argsort(-logits_BV, axis=-1)
        sorted_l = jnp.take_along_axis(logits_BV, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_l, axis=-1), axis=-1)
        remove_sorted = cum > top_p
        remove_sorted = jnp.concatenate(
            [jnp.zeros_like(remove_sorted[..., :1]), remove_sorted[..., :-1]], axis=-1)
        remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logits_BV = jnp.where(remove, -jnp.inf, logits_BV)
    return logits_BV


def multinomial(rng: jax.Array, logits_BV: jax.Array) -> jax.Array:
    """One draw per row from ``softmax(logits)`` by inverse CDF (like ``torch.multinomial``).

    One uniform per row instead of the ``V`` Gumbel draws of ``jax.random.categorical``: at
    V = 16384 the Gumbel noise costs more than the model's output head on CPU. Tokens with
    probability 0 (filtered to -inf) are never drawn.
    """
    probs = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.random.uniform(rng, cdf.shape[:-1] + (1,), jnp.float32) * cdf[..., -1:]
    idx = jnp.sum(cdf <= u, axis=-1)
    # float rounding can put u at the very top of the cdf: fall back to the last possible token
    V = probs.shape[-1]
    last_possible = V - 1 - jnp.argmax((probs > 0)[..., ::-1], axis=-1)
    return jnp.minimum(idx, last_possible).astype(jnp.int32)


def sample_token(logits_BV: jax.Array, rng: jax.Array, opts: SampleOptions) -> jax.Array:
    """Official ``sample()`` on last-position logits ``[B, V]`` (after CFG) -> tokens ``[B]`` int32."""
    logits_BV = logits_BV.astype(jnp.float32) / max(opts.temperature, 1e-5)
    if opts.top_k > 0 or opts.top_p < 1.0:
        logits_BV = top_k_top_p_filter(logits_BV, opts.top_k, opts.top_p)
    if opts.sample_logits:
        return multinomial(rng, logits_BV)
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def _guide(logits_2BV: jax.Array, B: int, scale: float, on: jax.Array | bool) -> jax.Array:
    cond, uncond = logits_2BV[:B], logits_2BV[B:]
    guided = uncond + (cond - uncond) * scale
    return jnp.where(on, guided, cond)


def default_cache_block_len(max_len: int, target: int = 64) -> int:
    """Cache block length for a ``max_len``-slot cache: about ``target`` slots (a multiple of 8),
    equal blocks; 0 (one block) when the cache holds fewer than ``2·target`` slots.

    More blocks read less of the cache (``(G + 1) / 2G`` of it over a generation) but compile
    one copy of the decode step per block.
    """
    if max_len < 2 * target:
        return 0
    blocks = -(-max_len // target)
    return lg.find_multiple(-(-max_len // blocks), 8)


def generate_fn(cfg: lg.LlamaGenConfig, opts: SampleOptions = SampleOptions(), *,
                dtype: Any = jnp.float32, num_tokens: Optional[int] = None, use_cache: bool = True,
                return_logits: bool = False, cache_block_len: Optional[int] = None) -> Callable:
    """Pure function ``(params, labels[B] int, rng) -> tokens [B, N] int32`` (plus the step
    logits ``[B, N, V]`` after CFG, before temperature, when ``return_logits``); not jitted, so a
    caller can jit it with its own shardings.

    num_tokens: N (default ``cfg.block_size``; fewer gives a prefix of the raster).
    cache_block_len: split the KV cache into blocks of this many slots and decode block by
      block, each step reading only the blocks written so far (same tokens; logits equal up to
      float summation order). Default :func:`default_cache_block_len`; 0 = one static cache.
    dtype: compute dtype of the matmuls and the KV cache. Embeddings, norms and the residual
      stream stay float32 (autocast's split); the official bf16 sampler casts the whole model, so
      bf16 samples here are close to its bf16 samples, not bit-equal. float32 matches its fp32 run.
    """
    N = cfg.block_size if num_tokens is None else int(num_tokens)
    if not 1 <= N <= cfg.block_size:
        raise ValueError(f"num_tokens={N} must be in [1, block_size={cfg.block_size}].")
    if opts.guided and not cfg.has_null_class:
        raise ValueError(f"cfg_scale={opts.cfg_scale} needs the null class row, but the model has "
                         f"class_dropout_prob={cfg.class_dropout_prob} (no null row); sample with "
                         "config.sample.cfg_scale=1.0.")
    model = lg.Transformer(cfg, dtype)
    T = cfg.cls_token_num
    max_len = lg.find_multiple(T + N, 8)
    if cache_block_len is None:
        cache_block_len = default_cache_block_len(max_len)
    block_len = None if cache_block_len <= 0 or cache_block_len >= max_len else int(cache_block_len)

    def cfg_on(i):  # i = index of the token being predicted; the prefill (i = 0) always guides
        if opts.cfg_interval <= -1:
            return True
        return (i - 1) <= opts.cfg_interval

    def fn(params, labels_B, rng):
        labels_B = jnp.asarray(labels_B, jnp.int32)
        B = labels_B.shape[0]
        cond = (jnp.concatenate([labels_B, jnp.full((B,), cfg.null_class, jnp.int32)])
                if opts.guided else labels_B)
        variables = {"params": matmul.cast_kernels(params, dtype)}  # 16-bit weight reads per step

        def finish(i, raw_logits, tokens, step_logits):
            l = _guide(raw_logits, B, opts.cfg_scale, cfg_on(i)) if opts.guided else raw_logits
            tok = sample_token(l, jax.random.fold_in(rng, i), opts)
            tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
            if return_logits:
                step_logits = jax.lax.dynamic_update_slice(
                    step_logits, l[:, None].astype(jnp.float32), (0, i, 0))
            return tok, tokens, step_logits

        tokens = jnp.zeros((B, N), jnp.int32)
        step_logits = jnp.zeros((B, N, cfg.vocab_size), jnp.float32) if return_logits else None

        if use_cache:
            cache = lg.init_cache(cfg, cond.shape[0], max_len, dtype, block_len=block_len)
            logits, cache = model.apply(variables, cond, None, cache=cache, index=0)
            tok, tokens, step_logits = finish(0, logits[:, -1], tokens, step_logits)

            def body(i, carry):
                tok, cache, tokens, step_logits = carry
                x = jnp.concatenate([tok, tok]) if opts.guided else tok
                logits, cache = model.apply(variables, None, x[:, None], cache=cache,
                                            index=T + i - 1)
                tok, tokens, step_logits = finish(i, logits[:, -1], tokens, step_logits)
                return tok, cache, tokens, step_logits

            carry = (tok, cache, tokens, step_logits)
            if block_len is None:
                carry = jax.lax.fori_loop(1, N, body, carry)
            else:  # one loop per cache block: a step reads only the blocks written so far
                for lo, hi, active in lg.decode_segments(T - 1, (1, N), block_len):
                    cache = tuple(c.with_active(active) for c in carry[1])
                    carry = jax.lax.fori_loop(lo, hi, body, (carry[0], cache) + carry[2:])
            _, _, tokens, step_logits = carry
        else:
            def body(i, carry):
                tokens, step_logits = carry
                x = jnp.concatenate([tokens, tokens]) if opts.guided else tokens
                logits = model.apply(variables, cond, x[:, :cfg.block_size - 1], False)
                raw = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
                _, tokens, step_logits = finish(i, raw, tokens, step_logits)
                return tokens, step_logits

            if N < cfg.block_size:  # pad so the teacher-forcing window has its full static size
                pad = lambda t: jnp.pad(t, ((0, 0), (0, cfg.block_size - N)) + ((0, 0),) * (t.ndim - 2))
                tokens = pad(tokens)
                step_logits = pad(step_logits) if return_logits else None
            tokens, step_logits = jax.lax.fori_loop(0, N, body, (tokens, step_logits))
            tokens = tokens[:, :N]
            step_logits = step_logits[:, :N] if return_logits else None
        return (tokens, step_logits) if return_logits else tokens

    return fn


def generate(params, labels_B: jax.Array, rng: jax.Array, *, cfg: lg.LlamaGenConfig,
             opts: SampleOptions = SampleOptions(), dtype: Any = jnp.float32,
             num_tokens: Optional[int] = None, use_cache: bool = True,
             return_logits: bool = False, cache_block_len: Optional[int] = None):
    """Jitted :func:`generate_fn`: ``tokens [B, N]`` (and step logits ``[B, N, V]``). Concrete
    labels are range-checked first (``[0, num_classes)``, plus the null class where the model
    has its row): the embedding lookup under ``jit`` would clamp a bad label silently."""
    labels_B, _ = class_labels.resolve(labels_B, rng, num_classes=cfg.num_classes,
                                       allow_null=cfg.has_null_class)
    return _generate_jit(params, labels_B, rng, cfg=cfg, opts=opts, dtype=dtype,
                         num_tokens=num_tokens, use_cache=use_cache, return_logits=return_logits,
                         cache_block_len=cache_block_len)


@functools.partial(jax.jit, static_argnames=("cfg", "opts", "dtype", "num_tokens", "use_cache",
                                             "return_logits", "cache_block_len"))
def _generate_jit(params, labels_B, rng, *, cfg, opts, dtype, num_tokens, use_cache, return_logits,
                  cache_block_len):
    return generate_fn(cfg, opts, dtype=dtype, num_tokens=num_tokens, use_cache=use_cache,
                       return_logits=return_logits, cache_block_len=cache_block_len
                       )(params, labels_B, rng)
