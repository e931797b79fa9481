"""Tokenize ImageNet train for LlamaGen at 384 px: ten-crop + flip VQ-16 codes (24×24 = 576 each).

Official extraction (data.md §1, ``extract_codes_c2i.py --ten-crop --crop-range 1.1
--image-size 384``): ADM centre crop to 422 px, TenCrop(384) → 10 views per image, 1,281,167 × 10
records of 576 int16 tokens (~14.8 GB). The optional second set (``imagenet_code_c2i_flip_ten_crop_105``)
is ``--config.tokenize.crop_range=1.05 --config.tokenize.name=imagenet384_vq16_ten_crop_105``
(written to another ``config.data.path``); training reads both, each example from either set with
probability 1/2 as the official dataset, with ``--config.data.mix_paths=<that directory>``.

    python -m cca_jax.main --config=configs/tokenize_imagenet_llamagen_384.py:CKPT_DIR \
        --config.tokenize.input_dir=/data/imagenet/train \
        --config.data.path=/data/tokens/imagenet384_vq16_ten_crop --workdir=runs/tok384

CKPT_DIR holds ``vq_ds16_c2i.pt``. With TFDS instead: ``--config.tokenize.input=tfds
[--config.tokenize.tfds_data_dir=... --config.tokenize.manual_dir=DIR_WITH_TARS]``.
"""

from configs.tokenize_common import tokenize_config


def get_config(arg=None):
    c = tokenize_config(name="imagenet384_vq16_ten_crop", views="ten_crop", image_size=384)
    c.tokenizer.family = "vq16"  # released VQ-16: 16384 x 8 codebook, ch 128, ch_mult 1,1,2,2,4
    c.tokenizer.precision = "highest"  # fp32 convs/matmuls on TPU/GPU so the codes match torch fp32
    if arg:
        c.init.tokenizer_checkpoint = f"{arg.rstrip('/')}/vq_ds16_c2i.pt"
    return c
