"""VAR next-scale generation (official ``autoregressive_infer_cfg``; spec sampling.md §2-3).

Per scale ``si`` (a Python loop over the <= 10 scales at trace time; every shape is static):

1. run the scale's token map through the transformer with the per-layer KV cache
   (``VAR.decode_scale``; the scale writes its keys at its static offset and attends to the
   static prefix of the cache), or — ``use_cache=False``, for benchmarks / tests — recompute
   the whole prefix of scales with the block-causal teacher-forcing forward;
2. classifier-free guidance with VAR's ramp ``t = cfg * si / (S - 1)``:
   ``logits = (1 + t) * cond - t * uncond`` (cond rows first, null-class rows second);
   **cfg = 0 is guidance-free and runs only the B conditional rows** (the official sampler always
   runs 2B rows);
3. top-k then top-p filtering with the official ``sample_with_top_k_top_p_`` semantics (no
   temperature), one categorical draw per token;
4. codebook lookup (or, ``more_smooth``, a Gumbel-softmax mixture of codebook rows), then the
   VQVAE quantiser's ``next_autoregressive_input``: ``f_hat += Phi(bicubic(h))`` and the
   area-downsampled ``f_hat`` is the next scale's input.

At the end ``f_hat`` is decoded: image = (clamp(decoder(post_quant_conv(f_hat)), -1, 1) + 1) / 2.

Shapes: ``B`` images, ``L`` tokens of all scales, ``l`` tokens of one scale, ``V`` vocab,
``Cvae`` latent channels; images NHWC ``[B, H, W, 3]`` unless ``layout="NCHW"``.

Exact fp32 parity on GPU/TPU needs full-precision matmuls: wrap calls in
``jax.default_matmul_precision("highest")`` (CPU is always full precision).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from cca_jax.models import matmul, vqvae
from cca_jax.models.var import FLOAT32_KERNELS, VAR, VARConfig, init_cache
from cca_jax.sampling import class_labels, select


@dataclasses.dataclass(frozen=True)
class VARSampleOptions:
    """Static sampling options (a jit is compiled per distinct value)."""

    cfg: float = 0.0  # VAR guidance: 0 = guidance-free (B rows); > 0 runs 2B rows with the ramp
    top_k: int = 0  # 0: off
    top_p: float = 0.0  # 0: off (official convention; 1.0 keeps everything too)
    more_smooth: bool = False  # Gumbel-softmax smoothing (visualisation only, not for FID)
    use_cache: bool = True  # False: recompute every prefix without a cache (benchmark / tests)

    @classmethod
    def from_config(cls, sample_cfg) -> "VARSampleOptions":
        """From ``config.sample`` (``cfg_scale`` is VAR's ``cfg``)."""
        get = sample_cfg.get if hasattr(sample_cfg, "get") else (lambda k, d=None: getattr(sample_cfg, k, d))
        top_p = float(get("top_p", 0.0))
        return cls(cfg=float(get("cfg_scale", 0.0)), top_k=int(get("top_k", 0)),
                   top_p=0.0 if top_p >= 1.0 else top_p, more_smooth=bool(get("more_smooth", False)),
                   use_cache=bool(get("use_cache", True)))

    @property
    def guided(self) -> bool:
        return self.cfg != 0.0


# ---------------------------------------------------------------------------------- filtering
def top_k_top_p_filter(logits_BlV: jax.Array, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
    """Official ``sample_with_top_k_top_p_`` filtering (removed logits -> -inf), float32.

    top-k: remove logits strictly below the k-th largest (ties survive). top-p (after top-k):
    sort ascending, remove entries whose cumulative softmax mass is <= 1 - top_p, always keep
    the largest.

    Nothing is sorted (:mod:`cca_jax.sampling.select`): the k-th largest logit and the first value
    ``b`` the nucleus keeps are found by bitwise searches, and the removed entries are those below
    ``b``. Equal logits at ``b`` are ordered by index, as a stable sort orders them (torch's sort is
    stable for the small V where ties are likely): of the ``n`` entries equal to ``b``, the
    ``floor((1 - top_p - mass below b) / p(b))`` lowest-index ones are removed (at most ``n - 1``).
    """
    logits = logits_BlV.astype(jnp.float32)
    V = logits.shape[-1]
    if 0 < top_k < V:
        logits = jnp.where(logits < select.kth_largest(logits, top_k), -jnp.inf, logits)
    if top_p > 0:
        m = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - m)
        z = jnp.sum(e, axis=-1, keepdims=True)
        thr = 1.0 - top_p
        b = select.mass_cut(logits, e / z, thr)
        below = jnp.sum(jnp.where(logits < b, e, 0.0), axis=-1, keepdims=True) / z
        logits = jnp.where(logits < b, -jnp.inf, logits)
        n_b = jnp.sum(logits == b, axis=-1, keepdims=True)
        cut_b = jnp.clip(jnp.floor((thr - below) / (jnp.exp(b - m) / z)), 0, n_b - 1).astype(jnp.int32)

        def cut_ties(lg):  # index order among the entries equal to b
            tie_rank = jnp.cumsum(lg == b, axis=-1) - 1
            return jnp.where((lg == b) & (tie_rank < cut_b), -jnp.inf, lg)

        # exact ties at the cut are rare in float logits: skip the extra pass over V without them
        logits = jax.lax.cond(jnp.any(cut_b > 0), cut_ties, lambda lg: lg, logits)
    return logits


def categorical(rng: jax.Array, logits_BlV: jax.Array) -> jax.Array:
    """One draw per position from softmax(logits) by inverse CDF (one uniform per position;
    ``jax.random.categorical`` draws V Gumbel variates per position, which dominates on CPU).
    Entries at -inf are never drawn."""
    p = jax.nn.softmax(logits_BlV.astype(jnp.float32), axis=-1)
    cdf = jnp.cumsum(p, axis=-1)
    u = jax.random.uniform(rng, cdf.shape[:-1] + (1,), jnp.float32) * cdf[..., -1:]
    hit = cdf > u
    # u rounding up to the total (probability ~2^-24) would leave no hit: fall back to the mode
    return jnp.where(jnp.any(hit, -1), jnp.argmax(hit, -1), jnp.argmax(p, -1)).astype(jnp.int32)


def guide(logits_2BlV: jax.Array, B: int, t: float) -> jax.Array:
    """``(1 + t) * cond - t * uncond`` with cond = rows [0, B), uncond = rows [B, 2B)."""
    return (1.0 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]


def smooth_embed(logits_BlV: jax.Array, codebook_VC: jax.Array, ratio: float, rng: jax.Array) -> jax.Array:
    """``more_smooth``: soft Gumbel-softmax over ``logits * (1 + ratio)`` with
    tau = max(0.27 * (1 - 0.95 ratio), 0.005), mixed into codebook rows -> ``[B, l, Cvae]``."""
    tau = max(0.27 * (1.0 - ratio * 0.95), 0.005)
    gumbel = -jnp.log(jax.random.exponential(rng, logits_BlV.shape, jnp.float32))
    y = jax.nn.softmax((logits_BlV * (1.0 + ratio) + gumbel) / tau, axis=-1)
    return jnp.einsum("blv,vc->blc", y, codebook_VC.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------------- generation
def _generate(var_params, vq_params, label_B, rng, *, cfg: VARConfig, vq_cfg: vqvae.VQVAEConfig,
              opts: VARSampleOptions, dtype, decode: bool, return_logits: bool, layout: str):
    B = label_B.shape[0]
    S = cfg.num_scales
    model = VAR(cfg, dtype)
    # 16-bit kernels cast once, not per scale
    var_params = matmul.cast_kernels(var_params, dtype, keep=FLOAT32_KERNELS)
    label_B = jnp.asarray(label_B, jnp.int32)
    labels = (jnp.concatenate([label_B, jnp.full_like(label_B, cfg.num_classes)])
              if opts.guided else label_B)
    rows = labels.shape[0]
    caches = init_cache(cfg, rows, dtype) if opts.use_cache else None
    f_hat = vqvae.empty_fhat(vq_cfg, B)
    book = vqvae.codebook(vq_params)
    x_next = None  # [B, l, Cvae] input of the current scale (None at scale 0)
    inputs = []  # use_cache=False: every scale's input so far (the teacher-forcing prefix)
    idx_all, logits_all = [], []
    for si, (begin, end) in enumerate(cfg.begin_ends):
        ratio = si / (S - 1) if S > 1 else 0.0
        x_rows = None if x_next is None else (jnp.concatenate([x_next, x_next]) if opts.guided else x_next)
        if opts.use_cache:
            logits, caches = model.apply({"params": var_params}, labels, x_rows, caches, si,
                                         method=VAR.decode_scale)
        else:
            if x_rows is not None:
                inputs.append(x_rows)
            prefix = (jnp.concatenate(inputs, axis=1) if inputs
                      else jnp.zeros((rows, 0, cfg.Cvae), jnp.float32))
            logits = model.apply({"params": var_params}, labels, prefix, False)[:, begin:end]
        if opts.guided:
            logits = guide(logits, B, opts.cfg * ratio)
        if return_logits:
            logits_all.append(logits)
        logits = top_k_top_p_filter(logits, opts.top_k, opts.top_p)
        rng, k_tok = jax.random.split(rng)
        if opts.more_smooth:
            h_BlC = smooth_embed(logits, book, ratio, k_tok)
            idx_Bl = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # informational only
        else:
            idx_Bl = categorical(k_tok, logits)
            h_BlC = vqvae.lookup_codes(vq_params, idx_Bl)
        f_hat, x_next = vqvae.next_autoregressive_input(vq_params, vq_cfg, si, f_hat, h_BlC)
        idx_all.append(idx_Bl)
    out = {"idx_BL": jnp.concatenate(idx_all, axis=1), "f_hat": f_hat}
    if return_logits:
        out["logits_BLV"] = jnp.concatenate(logits_all, axis=1)
    if decode:
        out["img"] = (vqvae.fhat_to_img(vq_params, vq_cfg, f_hat, layout) + 1.0) * 0.5
    return out


def _check(cfg: VARConfig, vq_cfg: vqvae.VQVAEConfig):
    for name, a, b in (("vocab_size", cfg.vocab_size, vq_cfg.vocab_size),
                       ("Cvae / z_channels", cfg.Cvae, vq_cfg.z_channels),
                       ("patch_nums", tuple(cfg.patch_nums), tuple(vq_cfg.patch_nums))):
        if a != b:
            raise ValueError(f"config.model {name}={a} but config.tokenizer has {b}; make them agree.")


@functools.lru_cache(maxsize=64)
def generate_fn(cfg: VARConfig, vq_cfg: vqvae.VQVAEConfig, opts: VARSampleOptions = VARSampleOptions(), *,
                dtype=jnp.float32, decode: bool = True, return_logits: bool = False, layout: str = "NHWC"):
    """One jitted function ``(var_params, vq_params, label_B [B], rng) -> dict``:

    ``idx_BL [B, L]`` int32 sampled indices (all scales concatenated), ``f_hat [B, h, w, Cvae]``,
    ``img [B, H, W, 3]`` in [0, 1] (``decode``), ``logits_BLV [B, L, V]`` float32 — the guided
    logits of every scale before top-k/top-p filtering (``return_logits``).
    """
    _check(cfg, vq_cfg)
    return jax.jit(functools.partial(_generate, cfg=cfg, vq_cfg=vq_cfg, opts=opts, dtype=dtype,
                                     decode=decode, return_logits=return_logits, layout=layout))


def generate(var_params, vq_params, label_B: class_labels.Labels, rng, *, cfg: VARConfig,
             vq_cfg: vqvae.VQVAEConfig, opts: VARSampleOptions = VARSampleOptions(),
             dtype=jnp.float32, decode: bool = True, return_logits: bool = False,
             layout: str = "NHWC", batch: int | None = None) -> dict[str, jax.Array]:
    """:func:`generate_fn` with the official ``label_B`` forms (:func:`class_labels.resolve`): an
    array ``[B]``, an int for all ``batch`` images (negative = unconditional), or None for
    ``batch`` uniformly random classes; labels are range-checked. The dict also holds the
    ``label_B [B]`` used."""
    label_B, rng = class_labels.resolve(label_B, rng, num_classes=cfg.num_classes, batch=batch)
    fn = generate_fn(cfg, vq_cfg, opts, dtype=dtype, decode=decode, return_logits=return_logits, layout=layout)
    return {**fn(var_params, vq_params, label_B, rng), "label_B": label_B}


def decode_fn(vq_cfg: vqvae.VQVAEConfig, layout: str = "NHWC"):
    """Jitted ``(vq_params, f_hat) -> image in [0, 1]`` (the VQ decode alone, for benchmarks)."""
    return jax.jit(lambda p, f: (vqvae.fhat_to_img(p, vq_cfg, f, layout) + 1.0) * 0.5)


def image_sampler_fn(cfg: VARConfig, vq_cfg: vqvae.VQVAEConfig, sample_cfg: Any):
    """For the sample job: ``(var_params, vq_params, label_B, rng) -> img [B, H, W, 3]`` in [0, 1],
    options from ``config.sample`` (``cfg_scale``, ``top_k``, ``top_p``, ``more_smooth``, ``dtype``)."""
    from cca_jax.families import parse_dtype

    opts = VARSampleOptions.from_config(sample_cfg)
    get = sample_cfg.get if hasattr(sample_cfg, "get") else (lambda k, d=None: getattr(sample_cfg, k, d))
    dtype = parse_dtype(get("dtype", "float32"), "config.sample.dtype")
    fn = generate_fn(cfg, vq_cfg, opts, dtype=dtype)

    def sample_images(var_params, vq_params, label_B, rng):
        return fn(var_params, vq_params, label_B, rng)["img"]

    return sample_images
