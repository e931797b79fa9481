"""Tokenize ImageNet train for LlamaGen at 256 px: ten-crop + flip VQ-16 codes (16×16 = 256 each).

``extract_codes_c2i.py --ten-crop --crop-range 1.1 --image-size 256``: ADM centre crop to 281 px,
TenCrop(256) → 10 views per image (data.md §1.2).

    python -m cca_jax.main --config=configs/tokenize_imagenet_llamagen_256.py:CKPT_DIR \
        --config.tokenize.input_dir=/data/imagenet/train \
        --config.data.path=/data/tokens/imagenet256_vq16_ten_crop --workdir=runs/tok256
"""

from configs.tokenize_common import tokenize_config


def get_config(arg=None):
    c = tokenize_config(name="imagenet256_vq16_ten_crop", views="ten_crop", image_size=256)
    c.tokenizer.family = "vq16"
    c.tokenizer.precision = "highest"
    if arg:
        c.init.tokenizer_checkpoint = f"{arg.rstrip('/')}/vq_ds16_c2i.pt"
    return c
