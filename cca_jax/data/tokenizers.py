"""The tokenizer interface the shard writer needs, and adapters for the two official tokenizers.

Any object with these members writes shards (the digits demo plugs its own in):

* ``encode(images [B, H, W, 3] float32 in [-1, 1]) -> tokens [B, L]`` integer array;
* ``vocab_size`` (int).

Optional members recorded in the dataset metadata (defaults in :func:`tokenizer_info`):
``name``, ``family``, ``patch_nums``, ``image_size``, ``checksum()``, ``config`` (a dict).

:class:`JaxTokenizer` wraps a pure ``encode_fn(params, images) -> tokens`` and runs it jitted with
the batch sharded over this process's devices (parameters replicated). On a multi-host job every
host encodes its own images on its own devices, so all devices of all hosts work and no host
waits for another.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@runtime_checkable
class ImageTokenizer(Protocol):
    vocab_size: int

    def encode(self, images_BHWC: np.ndarray) -> np.ndarray: ...


def tokenizer_info(tok: Any) -> dict:
    """Metadata of a tokenizer object (what the dataset's ``tokenizer`` entry records)."""
    if not hasattr(tok, "vocab_size"):
        raise TypeError(f"Tokenizer {type(tok).__name__} has no vocab_size attribute.")
    checksum = tok.checksum() if callable(getattr(tok, "checksum", None)) else ""
    pn = getattr(tok, "patch_nums", None)
    return {"name": str(getattr(tok, "name", type(tok).__name__)),
            "family": str(getattr(tok, "family", "custom")),
            "checksum": checksum,
            "vocab_size": int(tok.vocab_size),
            "patch_nums": None if pn is None else [int(p) for p in pn],
            "config": dict(getattr(tok, "config", {}) or {})}


class JaxTokenizer:
    """Jitted, batch-sharded ``encode_fn(params, images_BHWC) -> tokens_BL`` on local devices.

    ``encode`` pads every call to a multiple of ``batch_size`` rows (one compilation) and
    returns numpy int32 tokens for the real rows only.
    """

    def __init__(self, encode_fn: Callable, params: Any, *, name: str, family: str,
                 vocab_size: int, checksum: str, batch_size: int = 0,
                 patch_nums: Sequence[int] | None = None, image_size: int | None = None,
                 config: dict | None = None, devices: Sequence[jax.Device] | None = None):
        self.name, self.family, self.vocab_size = name, family, int(vocab_size)
        self.patch_nums = None if patch_nums is None else tuple(int(p) for p in patch_nums)
        self.image_size, self.config, self._checksum = image_size, dict(config or {}), checksum
        devices = list(devices or jax.local_devices())
        self.mesh = Mesh(np.asarray(devices), ("batch",))
        n = len(devices)
        self.batch_size = max(n, int(math.ceil((batch_size or n) / n) * n))
        self._params = jax.device_put(params, NamedSharding(self.mesh, P()))
        self._batch = NamedSharding(self.mesh, P("batch"))
        self._fn = jax.jit(encode_fn, in_shardings=(NamedSharding(self.mesh, P()), self._batch),
                           out_shardings=self._batch)

    def checksum(self) -> str:
        return self._checksum

    def encode_async(self, images_BHWC: np.ndarray) -> jax.Array:
        """Starts encoding exactly ``batch_size`` images; returns the (still computing) tokens."""
        x = np.asarray(images_BHWC, np.float32)
        if x.shape[0] != self.batch_size:
            raise ValueError(f"encode_async takes exactly {self.batch_size} images, got {x.shape[0]}.")
        return self._fn(self._params, jax.device_put(x, self._batch))

    def encode(self, images_BHWC: np.ndarray) -> np.ndarray:
        x = np.asarray(images_BHWC, np.float32)
        B = x.shape[0]
        out = []
        for s in range(0, B, self.batch_size):
            chunk = x[s:s + self.batch_size]
            n = chunk.shape[0]
            if n < self.batch_size:
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]),
                                                        np.float32)])
            out.append(np.asarray(self.encode_async(chunk))[:n])
        return np.concatenate(out).astype(np.int32) if out else np.zeros((0, 0), np.int32)


def vq16_tokenizer(params, cfg, *, image_size: int, batch_size: int = 0, checkpoint: str = "",
                   precision: str = "highest", devices=None) -> JaxTokenizer:
    """LlamaGen VQ-16 (``cca_jax/models/vq16.py``)."""
    import dataclasses

    from cca_jax.models import vq16
    tokens = cfg.tokens_per_image(image_size)

    def encode_fn(p, x):
        return vq16.encode(p, cfg, x, precision=precision)
    conf = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    conf.update(checkpoint=str(checkpoint), tokens_per_image=tokens, precision=precision)
    return JaxTokenizer(encode_fn, params, name="llamagen_vq16", family="vq16",
                        vocab_size=cfg.codebook_size, checksum=vq16.params_checksum(params),
                        batch_size=batch_size, image_size=image_size, config=conf, devices=devices)


def vqvae_tokenizer(params, cfg, *, image_size: int, batch_size: int = 0, checkpoint: str = "",
                    devices=None) -> JaxTokenizer:
    """VAR's multi-scale VQVAE (``cca_jax/models/vqvae.py``): the 10 scales' indices concatenated
    (``img_to_idxBl``, scale-major, raster order within a scale)."""
    from cca_jax.models import vqvae
    from cca_jax.models.vq16 import params_checksum

    def encode_fn(p, x):
        idx_Bl = vqvae.img_to_idxBl(p, cfg, x)
        return jnp.concatenate([i.reshape(i.shape[0], -1) for i in idx_Bl], axis=1).astype(jnp.int32)
    pn = tuple(int(v) for v in cfg.patch_nums)
    conf = {"patch_nums": list(pn), "vocab_size": int(cfg.vocab_size), "checkpoint": str(checkpoint)}
    return JaxTokenizer(encode_fn, params, name="var_vqvae", family="vqvae",
                        vocab_size=cfg.vocab_size, checksum=params_checksum(params),
                        batch_size=batch_size, patch_nums=pn, image_size=image_size, config=conf,
                        devices=devices)


def make_tokenizer(config, *, image_size: int, batch_size: int = 0):
    """From ``config.tokenizer`` (``family`` vq16 | vqvae) and ``config.init.tokenizer_checkpoint``."""
    family = config.tokenizer.get("family", "")
    path = config.init.get("tokenizer_checkpoint", "")
    if not path:
        raise ValueError("config.init.tokenizer_checkpoint is empty; set it to the official "
                         "tokenizer file (vq_ds16_c2i.pt / vae_ch160v4096z32.pth) or an Orbax dir.")
    if family == "vq16":
        from cca_jax.convert import vq16 as convert_vq16
        from cca_jax.models import vq16
        cfg = vq16.VQ16Config.from_config(config.tokenizer)
        params = convert_vq16.load_checkpoint(path, cfg)
        return vq16_tokenizer(params, cfg, image_size=image_size, batch_size=batch_size,
                              checkpoint=path, precision=config.tokenizer.get("precision", "highest"))
    if family == "vqvae":
        from cca_jax.convert import vqvae as convert_vqvae
        from cca_jax.models import vqvae
        cfg = vqvae.VQVAEConfig.from_config(config.tokenizer)
        params = convert_vqvae.load_checkpoint(path, cfg)
        return vqvae_tokenizer(params, cfg, image_size=image_size, batch_size=batch_size,
                               checkpoint=path)
    raise ValueError(f"config.tokenizer.family={family!r}; choose vq16 (LlamaGen) or vqvae (VAR).")
