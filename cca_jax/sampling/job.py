"""The sample job (``config.job = "sample"``): N images from a checkpoint, as an ADM-format npz.

    python -m cca_jax.main --config=configs/var_d16.py --workdir=DIR --config.job=sample \
        --config.sample.checkpoint=DIR/params --config.init.tokenizer_checkpoint=vae.pth

* Labels follow the official schemes (``config.sample.labels``): ``balanced`` (VAR: N/classes per
  class) or ``uniform`` (LlamaGen: i.i.d. uniform), drawn from ``config.sample.seed``.
* The work is cut into chunks of one global batch ``G`` (``sample.batch_size`` per device × every
  device of every host); the chunk whose first image is ``i`` uses the random key
  ``fold_in(seed, i)``, so a run is reproducible for a given ``G``.
* Resume: finished chunks are kept in ``<workdir>/samples/<name>_chunks/`` and a restarted run
  makes only the missing images (also on another device count: those images then come from other
  random draws). ``run.json`` there records what the images are samples of (labels, seed, model and
  sampling settings, a fingerprint of the weights); a run with other settings refuses the directory
  and names the differences, instead of mixing two runs' images. Multi-host runs need a workdir that
  every host sees (e.g. ``gs://``): process 0 assembles the npz from every host's chunks.
* Output in ``<workdir>/samples/``: ``<name>.npz`` with ``arr_0`` uint8 ``[N, H, W, 3]`` (what the
  OpenAI/ADM evaluator reads) and ``labels [N]``, ``<name>.png`` (a grid), and a TensorBoard grid.
  LlamaGen images are resized to ``sample.image_size_eval`` (384 → 256 in every paper run) with
  PyTorch bicubic semantics before the uint8 conversion, as the official script does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from typing import Any, Callable, Optional

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
    source: str = ""  # where ``params`` came from (recorded in the resume manifest)
    step: Optional[int] = None  # training step of ``params`` when they come from a train checkpoint


# npz key of the training step of the sampled checkpoint (absent when it is not a train checkpoint)
TRAIN_STEP_KEY = "train_step"


# ------------------------------------------------------------------------------ model loading

def load_model_params(config, workdir: str, family: families.Family
                      ) -> tuple[Any, str, Optional[int]]:
    """``(params, where they came from, training step or None)``: from ``config.sample.checkpoint``
    (official file or Orbax params dir), else the newest train checkpoint in ``workdir`` (else
    ``config.init.reference_checkpoint``). The step is known for a train checkpoint only."""
    step = None
    if config.sample.checkpoint:
        path = config.sample.checkpoint
        params, source = family.load_params(path), f"file {path}"
    elif checkpoint.checkpoint_dir(workdir).exists():
        step, params = checkpoint.load_latest_params(workdir)
        logging.info("sampling from the train checkpoint of step %d in %s", step, workdir)
        source = f"train checkpoint step {step} in {workdir}"
    elif config.init.reference_checkpoint:
        path = config.init.reference_checkpoint
        params, source = family.load_params(path), f"file {path}"
    else:
        raise ValueError("Nothing to sample from: set config.sample.checkpoint (an Orbax params dir or an "
                         "official .pt/.pth file), or point --workdir at a training run.")
    return params, source, step


def _tokenizer_path(config) -> str:
    path = config.init.tokenizer_checkpoint
    if not path:
        raise ValueError("Decoding samples needs the tokenizer: set config.init.tokenizer_checkpoint "
                         "(LlamaGen: vq_ds16_c2i.pt; VAR: vae_ch160v4096z32.pth, or an Orbax dir).")
    return path


def llamagen_sampler(config, tokenizer_params=None) -> ImageSampler:
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
    block_len = int(config.sample.get("cache_block_len", -1))
    tokens_fn = lgs.generate_fn(cfg, opts, dtype=dtype,
                                cache_block_len=None if block_len < 0 else block_len)
    eval_size = int(config.sample.get("image_size_eval", 0)) or None
    grid = cfg.grid_size

    def generate(params, tok_params, labels_B, rng):
        tokens_BN = tokens_fn(params, labels_B, rng)
        img = vq16.decode_code(tok_params, tok_cfg, tokens_BN, (grid, grid))
        if eval_size == img.shape[1]:
            return resample.llamagen_eval_uint8(img, None)
        return resample.llamagen_eval_uint8(img, eval_size)

    return ImageSampler(generate, None, tokenizer_params, cfg.num_classes, family.abstract_params())


def var_sampler(config, tokenizer_params=None) -> ImageSampler:
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

    return ImageSampler(generate, None, tokenizer_params, family.num_classes,
                        family.abstract_params())


SAMPLERS = {"llamagen": llamagen_sampler, "var": var_sampler}


def make_sampler(config, workdir: str, tokenizer_params=None, *, with_params: bool = True
                 ) -> ImageSampler:
    """The family's image sampler; ``with_params=False`` skips loading model params (callers that
    bring their own, like the in-training evaluation, which samples the current policy)."""
    fam = config.model.get("family", "")
    if fam not in SAMPLERS:
        raise ValueError(f"config.model.family={fam!r}; expected one of {sorted(SAMPLERS)}.")
    sampler = SAMPLERS[fam](config, tokenizer_params)
    if with_params:
        sampler.params, sampler.source, sampler.step = load_model_params(
            config, workdir, families.from_config(config))
    return sampler


# ------------------------------------------------------------------------------------ labels

def sample_labels(num_samples: int, num_classes: int, scheme: str, seed: int) -> np.ndarray:
    """``[N]`` int32 labels: ``balanced`` = N // C of each class (VAR's 50 per class for N = 50,000),
    the N mod C left over going to distinct classes drawn by ``seed``, then shuffled by ``seed``;
    ``uniform`` = i.i.d. uniform (LlamaGen's samplers)."""
    rng = np.random.default_rng(seed)
    if scheme == "balanced":
        labels = np.repeat(np.arange(num_classes), num_samples // num_classes)
        extra = num_samples % num_classes
        if extra:  # no class gets two more than another, and which get one more is seeded
            labels = np.concatenate([labels, np.sort(rng.permutation(num_classes)[:extra])])
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


# ---------------------------------------------------------------------------------- resume

MANIFEST = "run.json"


def params_fingerprint(params: Any) -> str:
    """Short hash of every leaf's path, shape and a strided sample of up to 4096 of its values:
    cheap, and it changes when the weights are retrained or re-exported to the same path."""
    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        h.update(f"{jax.tree_util.keystr(path)}{tuple(np.shape(x))}".encode())
        flat = x.reshape(-1)
        h.update(np.asarray(flat[::max(1, flat.size // 4096)][:4096], np.float32).tobytes())
    return h.hexdigest()[:16]


def _flat(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_manifest(out_dir: epath.Path, manifest: dict) -> None:
    """Writes ``run.json`` in a new chunk dir; in an existing one, raises unless it describes the
    same run (so a resume never mixes images of two models, seeds or sampling settings)."""
    want = json.loads(json.dumps(manifest, sort_keys=True, default=str))
    path = out_dir / MANIFEST
    if path.exists():
        have, now = _flat(json.loads(path.read_text())), _flat(want)
        diff = [f"{k}: {have.get(k)!r} on disk, {now.get(k)!r} now"
                for k in sorted(set(have) | set(now)) if have.get(k) != now.get(k)]
        if diff:
            raise ValueError(
                f"{out_dir} holds samples of another run ({'; '.join(diff[:8])}"
                f"{'; …' if len(diff) > 8 else ''}). Set config.sample.name to a new name to sample "
                "afresh, or delete that directory.")
        return
    if any(out_dir.glob("chunk_*.npz")):
        raise ValueError(f"{out_dir} has sample chunks but no {MANIFEST}, so nothing says what they are "
                         "samples of; delete the directory or set config.sample.name to a new name.")
    tmp = out_dir / f"{MANIFEST}.tmp{jax.process_index()}"
    tmp.write_text(json.dumps(want, indent=1, sort_keys=True))
    tmp.rename(path)


def _done_mask(out_dir: epath.Path, N: int) -> np.ndarray:
    """``[N]`` bool: which images some chunk file in ``out_dir`` already holds."""
    done = np.zeros(N, bool)
    for f in out_dir.glob("chunk_*.npz"):
        with f.open("rb") as fh, np.load(fh) as z:
            index = z["index"]
        done[index[(index >= 0) & (index < N)]] = True
    return done


# ---------------------------------------------------------------------------------- the loop

def generate_samples(sampler: ImageSampler, labels: np.ndarray, out_dir: epath.Path, *,
                     seed: int, per_device_batch: int, mesh=None, progress: bool = True,
                     settings: dict | None = None) -> np.ndarray:
    """Generates one image per label over every device; returns ``[N, H, W, C]`` uint8 on process 0
    (None elsewhere).

    Images already in ``out_dir`` are kept (resume); the rest are made in global batches of ``G``,
    the batch whose first image is ``i`` drawn with ``fold_in(seed, i)``. ``settings`` (with the
    labels, seed and a fingerprint of ``sampler.params``) must match the ``run.json`` of an existing
    ``out_dir``: see :func:`check_manifest`.
    """
    from jax.experimental import multihost_utils
    from tqdm import tqdm

    mesh = mesh or sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    G = per_device_batch * mesh.devices.size
    labels = np.asarray(labels, np.int32)
    N = len(labels)
    multi = jax.process_count() > 1
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"num_samples": N, "seed": int(seed), "settings": settings or {}, "params": sampler.source,
                "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest()}
    if sampler.params is not None:
        manifest["params_fingerprint"] = params_fingerprint(sampler.params)
    check_manifest(out_dir, manifest)
    done = _done_mask(out_dir, N)
    if multi:  # every host must run the same batches, or the collective program deadlocks
        done = np.asarray(multihost_utils.process_allgather(done)).reshape(-1, N).all(axis=0)
    todo = np.flatnonzero(~done)
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
        bar = tqdm(total=N, initial=N - len(todo), unit="img", disable=not progress or proc != 0,
                   desc="sampling")
        t0, made = time.time(), 0
        for start in range(0, len(todo), G):
            rows = todo[start:start + G]
            index_G = np.concatenate([rows, np.full(G - len(rows), -1)])  # -1: padding
            chunk = labels[np.maximum(index_G, 0)]
            labels_dev = jax.make_array_from_callback((G,), batch_sh, lambda idx: chunk[idx])
            images = gen(params, tok_params, labels_dev, jax.random.fold_in(key, int(rows[0])))
            idx, imgs = [], []
            for shard in images.addressable_shards:
                idx.append(index_G[shard.index[0]])
                imgs.append(np.asarray(shard.data))
            idx, imgs = np.concatenate(idx), np.concatenate(imgs)
            idx, first = np.unique(idx, return_index=True)  # replicated shards appear twice
            keep = idx >= 0
            if keep.any():  # named after its first image, which no earlier file holds
                _save_npz(out_dir / f"chunk_{idx[keep][0]:08d}_p{proc:03d}.npz",
                          index=idx[keep], images=imgs[first][keep])
            made += len(rows)
            bar.update(len(rows))
            bar.set_postfix(img_per_s=f"{made / max(time.time() - t0, 1e-9):.2f}")
        bar.close()
    if multi:
        multihost_utils.sync_global_devices("samples written")
    if proc != 0:
        return None
    out, filled = None, np.zeros(N, bool)
    for f in sorted(out_dir.glob("chunk_*.npz")):
        with f.open("rb") as fh, np.load(fh) as z:
            index, images = z["index"], z["images"]
        if out is None:
            out = np.zeros((N,) + images.shape[1:], np.uint8)
        keep = (index >= 0) & (index < N)
        out[index[keep]] = images[keep]
        filled[index[keep]] = True
    if not filled.all():
        raise RuntimeError(
            f"{int((~filled).sum())} of {N} images are missing from {out_dir} (first: "
            f"{int(np.flatnonzero(~filled)[0])}). On several hosts the workdir must be one that every "
            "host sees (e.g. gs://…); rerun the job to make the missing images.")
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
                              per_device_batch=int(config.sample.batch_size), mesh=mesh,
                              settings=image_settings(config))
    npz = out_dir / f"{name}.npz"
    if jax.process_index() == 0:
        # train_step: the eval job logs its metrics at the step of the checkpoint sampled
        step = {} if sampler.step is None else {TRAIN_STEP_KEY: np.int64(sampler.step)}
        _save_npz(npz, arr_0=images, labels=labels, **step)
        grid = image_grid(images[:64])
        save_png(grid, out_dir / f"{name}.png")
        writer = metric_writers.create_default_writer(str(workdir / "tensorboard"),
                                                      just_logging=jax.process_index() > 0)
        writer.write_images(sampler.step or 0, {f"samples/{name}": grid[None]})
        writer.flush()
        logging.info("wrote %s (%s)", npz, images.shape)
    if jax.process_count() > 1:  # the eval job reads the npz on every host next
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("sample npz written")
    return str(npz)


def image_settings(config) -> dict:
    """What the images depend on besides labels, seed and weights: the model, tokenizer and
    sampling settings (not the batch size, the output name or the checkpoint path)."""
    sample = {k: v for k, v in config.sample.to_dict().items()
              if k not in ("name", "num_samples", "batch_size", "checkpoint", "seed")}
    return {"model": config.model.to_dict(), "tokenizer": config.tokenizer.to_dict(),
            "tokenizer_checkpoint": config.init.get("tokenizer_checkpoint", ""), "sample": sample}
