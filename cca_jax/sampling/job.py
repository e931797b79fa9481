"""The sample job (``config.job = "sample"``): N images from a checkpoint, as an ADM-format npz.

    python -m cca_jax.main --config=configs/var_d16.py --workdir=DIR --config.job=sample \
        --config.sample.checkpoint=DIR/params --config.init.tokenizer_checkpoint=vae.pth

* Labels follow the official schemes (``config.sample.labels``): ``balanced`` (VAR: N/classes per
  class) or ``uniform`` (LlamaGen: i.i.d. uniform), drawn from ``config.sample.seed``.
* The work is cut into chunks of one global batch (``sample.batch_size`` per device × every
  device of every host); chunk ``k`` uses the random key ``fold_in(seed, k)``, so a run is
  reproducible and a restarted run skips the chunks already on disk.
* Output in ``<workdir>/samples/``: ``<name>.npz`` with ``arr_0`` uint8 ``[N, H, W, 3]`` (what the
  OpenAI/ADM evaluator reads) and ``labels [N]``, ``<name>.png`` (a grid), and a TensorBoard grid.
  LlamaGen images are resized to ``sample.image_size_eval`` (384 → 256 in every paper run) with
  PyTorch bicubic semantics before the uint8 conversion, as the official script does.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from cca_jax import checkpoint, families, sharding


@dataclasses.dataclass
class ImageSampler:
    """``generate(params, tokenizer_params, labels[B], rng) -> uint8 [B, H, W, 3]`` (pure)."""

    generate: Callable[..., jax.Array]
    params: Any
    tokenizer_params: Any
    num_classes: int
    abstract_params: Any = None


# ------------------------------------------------------------------------------ model loading

def load_model_params(config, workdir: str, family: families.Family):
    """Params from ``config.sample.checkpoint`` (official file or Orbax params dir), else the newest
    train checkpoint in ``workdir`` (else ``config.init.reference_checkpoint``)."""
    path = config.sample.checkpoint
    if path:
        return family.load_params(path)
    if checkpoint.checkpoint_dir(workdir).exists():
        step, params = checkpoint.load_latest_params(workdir)
        logging.info("sampling from the train checkpoint of step %d in %s", step, workdir)
        return params
    if config.init.reference_checkpoint:
        return family.load_params(config.init.reference_checkpoint)
    raise ValueError("Nothing to sample from: set config.sample.checkpoint (an Orbax params dir or an "
                     "official .pt/.pth file), or point --workdir at a training run.")


def _tokenizer_path(config) -> str:
    path = config.init.tokenizer_checkpoint
    if not path:
        raise ValueError("Decoding samples needs the tokenizer: set config.init.tokenizer_checkpoint "
                         "(LlamaGen: vq_ds16_c2i.pt; VAR: vae_ch160v4096z32.pth, or an Orbax dir).")
    return path


def llamagen_sampler(config, workdir: str, tokenizer_params=None, *, with_params: bool = True
                     ) -> ImageSampler:
    from cca_jax import resample
    from cca_jax.convert import vq16 as vq16_conv
    from cca_jax.models import vq16
    from cca_jax.sampling import llamagen as lgs

    family = families.from_config(config)
    cfg = family.model_cfg
    opts = lgs.SampleOptions.from_config(config.sample)
    dtype = families.parse_dtype(config.sample.get("dtype", "float32"), "config.sample.dtype")
    tok_cfg = vq16.VQ16Config.from_config(config.tokenizer)
    if tokenizer_params is None:
        tokenizer_params = vq16_conv.load_checkpoint(_tokenizer_path(config), tok_cfg)
    tokens_fn = lgs.generate_fn(cfg, opts, dtype=dtype)
    eval_size = int(config.sample.get("image_size_eval", 0)) or None
    grid = cfg.grid_size

    def generate(params, tok_params, labels_B, rng):
        tokens_BN = tokens_fn(params, labels_B, rng)
        img = vq16.decode_code(tok_params, tok_cfg, tokens_BN, (grid, grid))
        if eval_size == img.shape[1]:
            return resample.llamagen_eval_uint8(img, None)
        return resample.llamagen_eval_uint8(img, eval_size)

    params = load_model_params(config, workdir, family) if with_params else None
    return ImageSampler(generate, params, tokenizer_params, cfg.num_classes, family.abstract_params())


def var_sampler(config, workdir: str, tokenizer_params=None, *, with_params: bool = True
                ) -> ImageSampler:
    from cca_jax.convert import vqvae as vq_conv
    from cca_jax.models import vqvae
    from cca_jax.sampling import var as vs

    family = families.from_config(config)
    vq_cfg = vqvae.VQVAEConfig.from_config(config.tokenizer)
    if tokenizer_params is None:
        tokenizer_params = vq_conv.load_checkpoint(_tokenizer_path(config), vq_cfg)
    image_fn = vs.image_sampler_fn(family.model_cfg, vq_cfg, config.sample)

    def generate(params, tok_params, labels_B, rng):
        img = image_fn(params, tok_params, labels_B, rng)  # [B, H, W, 3] in [0, 1]
        # official: x·255 then a truncating cast (utils/misc + VAR_sample.py)
        return jnp.clip(img * 255.0, 0.0, 255.0).astype(jnp.uint8)

    params = load_model_params(config, workdir, family) if with_params else None
    return ImageSampler(generate, params, tokenizer_params, family.num_classes,
                        family.abstract_params())


SAMPLERS = {"llamagen": llamagen_sampler, "var": var_sampler}


def make_sampler(config, workdir: str, tokenizer_params=None, *, with_params: bool = True
                 ) -> ImageSampler:
    """The family's image sampler; ``with_params=False`` skips loading model params (callers that
    bring their own, like the in-training evaluation, which samples the current policy)."""
    fam = config.model.get("family", "")
    if fam not in SAMPLERS:
        raise ValueError(f"config.model.family={fam!r}; expected one of {sorted(SAMPLERS)}.")
    return SAMPLERS[fam](config, workdir, tokenizer_params, with_params=with_params)


# ------------------------------------------------------------------------------------ labels

def sample_labels(num_samples: int, num_classes: int, scheme: str, seed: int) -> np.ndarray:
    """``[N]`` int32 labels: ``balanced`` = ceil(N/C) of each class in order (VAR's 50 per class for
    N = 50,000) then shuffled by ``seed``; ``uniform`` = i.i.d. uniform (LlamaGen's samplers)."""
    rng = np.random.default_rng(seed)
    if scheme == "balanced":
        labels = np.repeat(np.arange(num_classes), math.ceil(num_samples / num_classes))[:num_samples]
        return rng.permutation(labels).astype(np.int32)
    if scheme == "uniform":
        return rng.integers(0, num_classes, num_samples).astype(np.int32)
    raise ValueError(f"config.sample.labels={scheme!r}; expected 'balanced', 'uniform' or 'auto'.")


def label_scheme(config) -> str:
    scheme = config.sample.get("labels", "auto")
    if scheme == "auto":
        return "balanced" if config.model.family == "var" else "uniform"
    return scheme


# ------------------------------------------------------------------------------------ output

def image_grid(images: np.ndarray, cols: int = 8) -> np.ndarray:
    """``[N, H, W, C]`` uint8 -> one ``[rows·H, cols·W, C]`` image (N padded with black)."""
    n, h, w, c = images.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    pad = np.zeros((rows * cols - n, h, w, c), images.dtype)
    g = np.concatenate([images, pad]).reshape(rows, cols, h, w, c)
    return g.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_png(image: np.ndarray, path: epath.Path) -> None:
    from PIL import Image
    img = image[..., 0] if image.shape[-1] == 1 else image
    with path.open("wb") as f:
        Image.fromarray(img).save(f, format="PNG")


def _save_npz(path: epath.Path, **arrays) -> None:
    """Atomic: written to a temporary name, then renamed (a killed run leaves no partial file)."""
    tmp = path.parent / (path.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    tmp.rename(path)


# ---------------------------------------------------------------------------------- the loop

def generate_samples(sampler: ImageSampler, labels: np.ndarray, out_dir: epath.Path, *,
                     seed: int, per_device_batch: int, mesh=None, progress: bool = True) -> np.ndarray:
    """Generates one image per label over every device; returns ``[N, H, W, C]`` uint8 on process 0
    (None elsewhere). Finished chunks in ``out_dir`` are reused (resume)."""
    from jax.experimental import multihost_utils
    from tqdm import tqdm

    mesh = mesh or sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    n_dev = mesh.devices.size
    G = per_device_batch * n_dev
    N = len(labels)
    num_chunks = math.ceil(N / G)
    padded = np.concatenate([labels, np.zeros(num_chunks * G - N, np.int32)])
    out_dir.mkdir(parents=True, exist_ok=True)
    batch_sh = sharding.batch_sharding(mesh, 1)

    with sharding.use_mesh(mesh):
        if sampler.abstract_params is not None:
            p_sh = sharding.boxed_shardings(sampler.abstract_params, mesh)
            params = jax.device_put(sampler.params, p_sh)
        else:
            params = jax.device_put(sampler.params, sharding.replicated(mesh))
        tok_params = jax.device_put(sampler.tokenizer_params, sharding.replicated(mesh))
        gen = jax.jit(sampler.generate, out_shardings=sharding.batch_sharding(mesh, 4))
        key = jax.random.key(seed)
        proc = jax.process_index()
        bar = tqdm(total=N, unit="img", disable=not progress or proc != 0, desc="sampling")
        t0, made = time.time(), 0
        for k in range(num_chunks):
            chunk_file = out_dir / f"chunk_{k:05d}_p{proc:03d}.npz"
            rows = min(G, N - k * G)
            if chunk_file.exists():
                bar.update(rows)
                continue
            chunk = padded[k * G:(k + 1) * G]
            labels_dev = jax.make_array_from_callback((G,), batch_sh, lambda idx: chunk[idx])
            images = gen(params, tok_params, labels_dev, jax.random.fold_in(key, k))
            idx, imgs = [], []
            for shard in images.addressable_shards:
                sl = shard.index[0]
                idx.append(np.arange(G)[sl] + k * G)
                imgs.append(np.asarray(shard.data))
            idx, imgs = np.concatenate(idx), np.concatenate(imgs)
            order = np.argsort(idx)
            _, uniq = np.unique(idx[order], return_index=True)  # replicated shards appear twice
            _save_npz(chunk_file, index=idx[order][uniq], images=imgs[order][uniq])
            made += rows
            bar.update(rows)
            bar.set_postfix(img_per_s=f"{made / max(time.time() - t0, 1e-9):.2f}")
        bar.close()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("samples written")
    if proc != 0:
        return None
    out = None
    for f in sorted(out_dir.glob("chunk_*.npz")):
        with f.open("rb") as fh, np.load(fh) as z:
            index, images = z["index"], z["images"]
        if out is None:
            out = np.zeros((N,) + images.shape[1:], np.uint8)
        keep = index < N
        out[index[keep]] = images[keep]
    return out


def run(config, workdir: str) -> str:
    """Samples ``config.sample.num_samples`` images; returns the npz path."""
    from clu import metric_writers

    workdir = epath.Path(workdir)
    sampler = make_sampler(config, str(workdir))
    N = int(config.sample.num_samples)
    labels = sample_labels(N, sampler.num_classes, label_scheme(config), int(config.sample.seed))
    name = config.sample.get("name", "") or f"samples_{N}"
    out_dir = workdir / "samples"
    mesh = sharding.make_mesh(dict(config.mesh))
    images = generate_samples(sampler, labels, out_dir / f"{name}_chunks",
                              seed=int(config.sample.seed),
                              per_device_batch=int(config.sample.batch_size), mesh=mesh)
    npz = out_dir / f"{name}.npz"
    if jax.process_index() == 0:
        _save_npz(npz, arr_0=images, labels=labels)
        grid = image_grid(images[:64])
        save_png(grid, out_dir / f"{name}.png")
        writer = metric_writers.create_default_writer(str(workdir / "tensorboard"),
                                                      just_logging=jax.process_index() > 0)
        writer.write_images(0, {f"samples/{name}": grid[None]})
        writer.flush()
        logging.info("wrote %s (%s)", npz, images.shape)
    return str(npz)
