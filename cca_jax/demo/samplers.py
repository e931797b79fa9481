"""Sampling for the demo: the repository's jitted KV-cached samplers on the demo tokenizers,
timed per image.

* LlamaGen family: ``cca_jax.sampling.llamagen.generate_fn`` (one ``lax.fori_loop`` over the 64
  pixel tokens, CFG with the official ``cfg_scale`` semantics, guidance-free runs only the B
  conditional rows) followed by the pixel tokenizer's decode.
* VAR family: the sample job's ``var_sampler`` (``cca_jax.sampling.var``: next-scale generation,
  VAR's CFG ramp, guidance-free = cfg 0 without the doubled batch) with the demo VQVAE decode.

Both return :class:`cca_jax.sampling.job.ImageSampler`. :func:`sample_timed` compiles ahead of
time (``jit(...).lower(...).compile()``) so the per-image time it reports is generation only.

Images come back as uint8 ``[N, 8, 8, 3]`` (grey repeated; the ADM npz layout).
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cca_jax import families
from cca_jax.sampling import job as sample_job


def llamagen_sampler(family: families.Family, params: Any, pixel_tok, sample_cfg) -> sample_job.ImageSampler:
    """``sample_cfg``: ``cfg_scale`` (1 = guidance-free), ``temperature``, ``top_k``, ``top_p``."""
    from cca_jax.sampling import llamagen as lgs

    opts = lgs.SampleOptions.from_config(sample_cfg)
    tokens_fn = lgs.generate_fn(family.model_cfg, opts)

    def generate(p, tok_params, labels_B, rng):
        del tok_params  # the pixel tokenizer has no parameters
        return pixel_tok.decode_uint8(tokens_fn(p, labels_B, rng))

    return sample_job.ImageSampler(generate, params, None, family.num_classes)


def var_sampler(family_config, params: Any, vq_params: Any) -> sample_job.ImageSampler:
    """``family_config``: the full VAR run config (model, tokenizer, sample sections);
    ``config.sample.cfg_scale`` is VAR's ``cfg`` (0 = guidance-free)."""
    from cca_jax.sampling import var as vs
    from cca_jax.demo import tokenizers as demo_tok

    family = families.from_config(family_config)
    vq_cfg = demo_tok.vqvae_config(family_config.tokenizer)
    image_fn = vs.image_sampler_fn(family.model_cfg, vq_cfg, family_config.sample)

    def generate(p, tok_params, labels_B, rng):
        img = image_fn(p, tok_params, labels_B, rng)  # [B, H, W, C] in [0, 1]
        u8 = jnp.clip(img * 255.0, 0.0, 255.0).astype(jnp.uint8)  # official truncating cast
        return jnp.repeat(u8, 3, axis=-1) if u8.shape[-1] == 1 else u8

    return sample_job.ImageSampler(generate, params, vq_params, family.num_classes)


def sample_timed(sampler: sample_job.ImageSampler, labels: np.ndarray, *, seed: int,
                 batch_size: int, repeats: int = 2) -> tuple[np.ndarray, dict]:
    """All ``labels`` in chunks of ``batch_size`` (the last one padded); chunk ``k`` uses key
    ``fold_in(key(seed), k)``. Returns ``(images uint8 [N, H, W, 3], timing)``.

    Timing (compilation excluded: the program is compiled ahead of time): every chunk is timed
    alone, then chunk 0 is run ``repeats`` more times; ``sec_per_image`` is the fastest chunk's
    time / ``batch_size`` — the minimum is the figure least disturbed by other processes on a
    shared machine (``mean_sec_per_image`` is the plain average over the chunks).
    """
    N = len(labels)
    chunks = math.ceil(N / batch_size)
    padded = np.concatenate([labels, np.zeros(chunks * batch_size - N, labels.dtype)]).astype(np.int32)
    params = jax.device_put(sampler.params)
    tok = jax.device_put(sampler.tokenizer_params)
    key = jax.random.key(seed)
    t0 = time.perf_counter()
    lab0 = jnp.asarray(padded[:batch_size])
    compiled = jax.jit(sampler.generate).lower(params, tok, lab0, jax.random.fold_in(key, 0)).compile()
    compile_s = time.perf_counter() - t0
    outs, times = [], []
    for k in list(range(chunks)) + [0] * int(repeats):
        lab = jnp.asarray(padded[k * batch_size:(k + 1) * batch_size])
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(params, tok, lab, jax.random.fold_in(key, k)))
        times.append(time.perf_counter() - t0)
        if len(outs) < chunks:
            outs.append(np.asarray(out))
    images = np.concatenate(outs)[:N]
    return images, {"compile_s": compile_s, "chunk_s": times,
                    "sec_per_image": min(times) / batch_size,
                    "mean_sec_per_image": float(np.mean(times[:chunks])) / batch_size,
                    "batch_size": int(batch_size)}
