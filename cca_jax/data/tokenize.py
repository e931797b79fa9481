"""The ``tokenize`` job: ImageNet (ImageFolder tree or TFDS ``imagenet2012``) → token shards.

    python -m cca_jax.main --config=configs/tokenize_imagenet_llamagen_384.py:CKPT_DIR \
        --config.tokenize.input_dir=/data/imagenet/train --config.data.path=/data/tokens/lg384 \
        --workdir=runs/tokenize_lg384

``config.tokenize`` (see configs/tokenize_*.py) picks the input, the official views of the recipe
(``cca_jax/data/preprocess.py``), the shard size and the encode batch; ``config.tokenizer`` and
``config.init.tokenizer_checkpoint`` the tokenizer; ``config.data.path`` the output directory
(default ``<workdir>/tokens``) — the same field the training recipes read. Every host encodes
its own shards on its own devices; rerunning resumes (finished shards are skipped).
"""

from __future__ import annotations

import os

import jax
from absl import logging

from cca_jax.data import preprocess, sources, tokenizers, writer


def make_source(t):
    """``config.tokenize.input``: imagefolder (``input_dir`` = the train/ dir holding one folder
    per class) | tfds (``tfds_name``/``tfds_split``/``tfds_data_dir``; ``manual_dir`` prepares)."""
    if t.input == "imagefolder":
        if not t.input_dir:
            raise ValueError("config.tokenize.input_dir is empty; set it to the ImageNet train "
                             "directory (train/<wnid>/*.JPEG).")
        return sources.ImageFolderSource(t.input_dir)
    if t.input == "tfds":
        if t.get("manual_dir", ""):
            if jax.process_index() == 0:
                sources.TfdsSource.prepare(t.tfds_name, t.tfds_data_dir, t.manual_dir)
            writer._barrier("cca_tokenize_tfds_prepared")
        return sources.TfdsSource(t.tfds_name, t.tfds_split, t.tfds_data_dir or None)
    raise ValueError(f"config.tokenize.input={t.input!r}; choose imagefolder or tfds.")


def run(config, workdir: str) -> dict:
    t = config.tokenize
    out_dir = config.data.path or os.path.join(workdir, "tokens")
    source = make_source(t)
    views = preprocess.make_views(t)
    batch = int(t.encode_batch_per_device) * jax.local_device_count()
    tok = tokenizers.make_tokenizer(config, image_size=int(t.image_size), batch_size=batch)
    logging.info("tokenize: %d images, %d classes, %d views of %d px, tokenizer %s -> %s",
                 source.num_images, source.num_classes, views.num_views, t.image_size,
                 tok.name, out_dir)
    meta = writer.write_dataset(
        out_dir, source=source, views=views, tokenizer=tok, name=t.name,
        images_per_shard=int(t.images_per_shard), num_workers=int(t.num_workers),
        progress=bool(t.progress), resolution=int(t.image_size))
    logging.info("tokenize: wrote %d records (%d tokens each) in %d shards to %s",
                 meta["num_records"], meta["tokens_per_example"], len(meta["shards"]), out_dir)
    return meta
