"""The demo's two tokenizers for 8×8 digits, one per model family.

* :class:`PixelTokenizer` (LlamaGen-style raster tokens): every pixel is one token, its grey
  level quantised to ``levels`` values (a scalar codebook; the digits have 17 levels, 0..16).
  ``encode(images [B, H, W, C] in [-1, 1]) -> [B, H·W]`` int32 in raster order;
  ``decode_uint8(tokens [B, N]) -> [B, G, G, 3]`` uint8 (jittable, used by the sampler).
* the tiny multi-scale VQVAE of ``cca_jax/models/vqvae.py`` (VAR-style): ``ch_mult=(1,)`` keeps
  the 8×8 resolution, so the latent grid is 8×8 and ``patch_nums`` e.g. ``(1, 2, 4, 8)`` give
  L = 85 tokens. The repository's VQVAE is inference-only (like the official one), so this module
  adds its training objective: :func:`vqvae_losses` (multi-scale residual quantisation with the
  straight-through estimator, codebook + β·commitment terms averaged over scales as in VAR's
  ``VectorQuantizer2``, plus an L2 reconstruction loss) and :func:`train_vqvae`.

Shapes: ``B`` images, ``H = W = 8`` pixels, ``C`` channels, ``N`` tokens, ``h × w`` latent grid,
``Cvae`` latent channels, ``V`` codebook size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from cca_jax import resample
from cca_jax.models import vqvae


# ======================================================================= per-pixel tokenizer

@dataclasses.dataclass(frozen=True)
class PixelTokenizer:
    """Scalar codebook over grey levels: token ``k`` is the grey value ``k / (levels - 1)``.

    With ``levels = 17`` the digits are tokenized losslessly (their pixels are 0..16).
    """

    levels: int = 17
    image_size: int = 8
    name: str = "digits_pixels"
    family: str = "pixel"

    @property
    def vocab_size(self) -> int:
        return self.levels

    @property
    def num_tokens(self) -> int:
        return self.image_size * self.image_size

    @property
    def config(self) -> dict:
        return {"levels": self.levels, "image_size": self.image_size}

    def checksum(self) -> str:
        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()

    def encode(self, images_BHWC: np.ndarray) -> np.ndarray:
        """``[B, H, W, C]`` float in [-1, 1] (channels averaged) -> ``[B, H·W]`` int32."""
        x = np.asarray(images_BHWC, np.float32)
        if x.ndim != 4 or x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"PixelTokenizer.encode expects [B, {self.image_size}, "
                             f"{self.image_size}, C] images, got {x.shape}.")
        grey = x.mean(axis=-1)
        k = np.rint((grey + 1.0) * 0.5 * (self.levels - 1))
        return np.clip(k, 0, self.levels - 1).astype(np.int32).reshape(x.shape[0], -1)

    def decode_uint8(self, tokens_BN: jax.Array) -> jax.Array:
        """``[B, N]`` tokens -> ``[B, G, G, 3]`` uint8 (grey repeated), G = sqrt(N)."""
        B, N = tokens_BN.shape
        G = int(round(N ** 0.5))
        v = jnp.round(tokens_BN.astype(jnp.float32) * (255.0 / (self.levels - 1)))
        img = jnp.clip(v, 0, 255).astype(jnp.uint8).reshape(B, G, G, 1)
        return jnp.repeat(img, 3, axis=-1)


# ============================================================================ tiny VQVAE

def vqvae_config(tok_cfg) -> vqvae.VQVAEConfig:
    """``VQVAEConfig`` from ``config.tokenizer`` (family ``vqvae``); extra demo-only fields
    (training hyper-parameters under ``config.tokenizer.train``) are ignored here."""
    d = dict(tok_cfg.to_dict() if hasattr(tok_cfg, "to_dict") else tok_cfg)
    d.pop("train", None)
    return vqvae.VQVAEConfig.from_config(d)


def _decode_raw(params, cfg: vqvae.VQVAEConfig, f_hat_BhwC: jax.Array) -> jax.Array:
    """Decoder without the final clamp (the clamp would zero the gradient of saturated pixels)."""
    return vqvae.VQVAE(cfg).apply(
        {"params": params}, f_hat_BhwC,
        method=lambda m, f: m.decoder(m.post_quant_conv(f)))


def quantize_ste(params, cfg: vqvae.VQVAEConfig, f_BhwC: jax.Array):
    """Multi-scale residual quantisation for training.

    Same scale loop as :func:`cca_jax.models.vqvae.f_to_idxBl_or_fhat` (area-downsampled residual
    → nearest code → bicubic up → Φ → accumulate), with gradients:
    returns ``(f_hat_st [B, h, w, Cvae], vq_loss, idx list)`` where ``f_hat_st`` passes the
    decoder's gradient straight through to ``f`` and ``vq_loss`` is the mean over scales of
    ``β·‖sg(f̂) − f‖² + ‖f̂ − sg(f)‖²`` (codebook and Φ learn from the second term, the encoder
    is committed by the first).
    """
    B, H, W, C = f_BhwC.shape
    S = cfg.num_scales
    f_ng = jax.lax.stop_gradient(f_BhwC)
    f_rest = f_ng
    f_hat = jnp.zeros_like(f_ng)
    loss = 0.0
    idx_all = []
    for si, pn in enumerate(cfg.patch_nums):
        z = resample.resize_area(f_rest, pn) if si != S - 1 else f_rest
        idx = vqvae.nearest_codes(params, cfg, z.reshape(-1, C)).reshape(B, pn * pn)
        h = vqvae.lookup_codes(params, idx).reshape(B, pn, pn, C)
        if si != S - 1:
            h = resample.resize_bicubic(h, cfg.latent_size)
        h = vqvae.apply_phi(params, cfg, si, h)
        f_hat = f_hat + h
        f_rest = f_rest - jax.lax.stop_gradient(h)
        loss = loss + cfg.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f_BhwC)) \
            + jnp.mean(jnp.square(f_hat - f_ng))
        idx_all.append(idx)
    f_hat_st = f_BhwC + jax.lax.stop_gradient(f_hat - f_BhwC)
    return f_hat_st, loss / S, idx_all


def vqvae_losses(params, cfg: vqvae.VQVAEConfig, img_BHWC: jax.Array) -> tuple[jax.Array, dict]:
    """Total loss ``recon + vq`` on images in [-1, 1] and its parts (``recon``: MSE in [-1, 1])."""
    f = vqvae.encode(params, cfg, img_BHWC)
    f_hat, vq_loss, _ = quantize_ste(params, cfg, f)
    rec = _decode_raw(params, cfg, f_hat)
    recon = jnp.mean(jnp.square(rec - img_BHWC))
    return recon + vq_loss, {"recon": recon, "vq": vq_loss}


def _seed_codebook(params, cfg: vqvae.VQVAEConfig, images: np.ndarray, rng: np.random.Generator):
    """Codebook rows drawn from encoder outputs at every scale (a code that no input is near is
    dead from the start; seeding from data avoids it)."""
    f = np.asarray(jax.jit(lambda p, x: vqvae.encode(p, cfg, x))(params, jnp.asarray(images[:256])))
    pools = [np.asarray(resample.resize_area(jnp.asarray(f), pn)).reshape(-1, cfg.z_channels)
             for pn in cfg.patch_nums]
    pool = np.concatenate(pools)
    rows = pool[rng.choice(len(pool), cfg.vocab_size, replace=len(pool) < cfg.vocab_size)]
    rows = rows + 0.01 * rng.standard_normal(rows.shape).astype(np.float32)
    q = dict(params["quantize"])
    q["embedding"] = jnp.asarray(rows, jnp.float32)
    out = dict(params)
    out["quantize"] = q
    return out


def train_vqvae(images_BHWC: np.ndarray, cfg: vqvae.VQVAEConfig, *, steps: int, batch_size: int,
                lr: float, seed: int = 0, log_every: int = 100, writer=None) -> tuple[Any, dict]:
    """Trains the VQVAE on ``images [N, H, W, C]`` in [-1, 1] with Adam; returns
    ``(params, {"recon": final recon MSE over the set, "usage": share of codes used, ...})``.

    ``writer``: optional clu metric writer for the loss curve.
    """
    rng = np.random.default_rng(seed)
    params = vqvae.init_params(cfg, jax.random.key(seed))
    params = _seed_codebook(params, cfg, images_BHWC, rng)
    # the usage statistic is an inert buffer: never trained
    mask = jax.tree_util.tree_map_with_path(
        lambda p, _: "ema_vocab_hit_SV" not in jax.tree_util.keystr(p), params)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.masked(optax.adam(optax.cosine_decay_schedule(lr, steps, 0.1)), mask),
                     optax.masked(optax.set_to_zero(),
                                  jax.tree_util.tree_map(lambda m: not m, mask)))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x):
        (loss, parts), g = jax.value_and_grad(vqvae_losses, argnums=0, has_aux=True)(params, cfg, x)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss, parts

    N = len(images_BHWC)
    t0 = time.time()
    for i in range(steps):
        idx = rng.choice(N, batch_size, replace=False)
        params, opt, loss, parts = step(params, opt, jnp.asarray(images_BHWC[idx]))
        if (i + 1) % log_every == 0 or i + 1 == steps:
            scal = {"tokenizer/loss": float(loss), "tokenizer/recon": float(parts["recon"]),
                    "tokenizer/vq": float(parts["vq"])}
            logging.info("vqvae step %d/%d %s (%.1fs)", i + 1, steps,
                         " ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in scal.items()),
                         time.time() - t0)
            if writer is not None:
                writer.write_scalars(i + 1, scal)
    return params, vqvae_report(params, cfg, images_BHWC)


def vqvae_report(params, cfg: vqvae.VQVAEConfig, images_BHWC: np.ndarray) -> dict:
    """Reconstruction MSE (in [-1, 1]) through the real encode→indices→decode path, and the
    share of codebook rows used at least once over the set."""
    enc = jax.jit(lambda p, x: jnp.concatenate(vqvae.img_to_idxBl(p, cfg, x), axis=1))
    dec = jax.jit(lambda p, i: vqvae.idxBl_to_img(p, cfg, i, last_one=True))
    idx = np.concatenate([np.asarray(enc(params, jnp.asarray(images_BHWC[s:s + 512])))
                          for s in range(0, len(images_BHWC), 512)])
    rec = np.concatenate([np.asarray(dec(params, jnp.asarray(idx[s:s + 512])))
                          for s in range(0, len(idx), 512)])
    return {"recon_mse": float(np.mean((rec - images_BHWC) ** 2)),
            "code_usage": float(len(np.unique(idx)) / cfg.vocab_size),
            "tokens_per_image": int(idx.shape[1])}
