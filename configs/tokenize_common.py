"""The ``tokenize`` job's config (shared by configs/tokenize_imagenet_*.py).

``config.tokenize`` fields are documented once here; the recipes set the views of their model's
official pipeline (../shared/spec/data.md). Output goes to ``config.data.path`` — the field the
training recipes read the shards from.
"""

from __future__ import annotations

import ml_collections

from configs.common import base_config


def tokenize_config(*, name: str, views: str, image_size: int) -> ml_collections.ConfigDict:
    c = base_config()
    c.job = "tokenize"
    t = c.tokenize = ml_collections.ConfigDict()
    t.name = name  # dataset name: shard files are <name>-train.array_record-XXXXX-of-YYYYY
    t.input = "imagefolder"  # imagefolder | tfds
    t.input_dir = ""  # imagefolder: the directory with one sub-directory per class (ImageNet train/)
    t.tfds_name = "imagenet2012"  # tfds: builder name (labels = its ClassLabel ids, standard order)
    t.tfds_split = "train"
    t.tfds_data_dir = ""  # tfds: TFDS data_dir ("" = the TFDS default)
    t.manual_dir = ""  # tfds: if set, download_and_prepare from these manually downloaded tars first
    t.views = views  # ten_crop | center_flip (LlamaGen) | var_random_crops (VAR)
    t.image_size = image_size  # side of every view in pixels (the tokenizer's input resolution)
    t.crop_range = 1.1  # LlamaGen: ADM centre crop to int(image_size * crop_range) before TenCrop
    t.num_views = 1  # var_random_crops: fixed random crops per image (ten_crop: 10, center_flip: 2)
    t.crop_seed = 0  # var_random_crops: crop offsets = f(crop_seed, image index, view)
    t.mid_reso = 1.125  # var_random_crops: Resize short side to round(mid_reso * image_size)
    t.hflip = False  # var_random_crops: random horizontal flip (off in every official recipe)
    t.images_per_shard = 1024  # images per ArrayRecord shard (x views records)
    t.encode_batch_per_device = 16  # views encoded per device per step
    t.num_workers = 16  # host threads decoding / resizing images
    t.progress = True  # tqdm progress bar per host
    c.data.path = ""  # output directory ("" = <workdir>/tokens)
    return c
