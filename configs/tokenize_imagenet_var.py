"""Tokenize ImageNet train for VAR (256 px): multi-scale VQVAE indices, 680 per view.

VAR tokenizes on the fly from ``Resize(288, LANCZOS)`` + ``RandomCrop(256)`` (no flip) every step
(data.md §2). Here that augmentation is fixed into ``config.tokenize.num_views`` random crops per
image (default 1: each image once with one random crop — for the one-epoch CCA recipes the same
distribution as the official pipeline, data.md §4.2; raise it to draw among more crops over
several epochs). Crop offsets are a counter-based hash of (crop_seed, image index, view), so
reruns and resumed jobs write identical tokens. 680 int16 tokens per record (~1.7 GB per view).

    python -m cca_jax.main --config=configs/tokenize_imagenet_var.py:CKPT_DIR \
        --config.tokenize.input_dir=/data/imagenet/train \
        --config.data.path=/data/tokens/imagenet256_var --workdir=runs/tokvar

CKPT_DIR holds ``vae_ch160v4096z32.pth``.
"""

from configs.tokenize_common import tokenize_config
from configs.var_common import tokenizer_config


def get_config(arg=None):
    c = tokenize_config(name="imagenet256_var_vqvae", views="var_random_crops", image_size=256)
    c.tokenizer = tokenizer_config()  # vae_ch160v4096z32: V 4096, Cvae 32, patch_nums 1..16
    c.tokenize.num_views = 1
    if arg:
        c.init.tokenizer_checkpoint = f"{arg.rstrip('/')}/vae_ch160v4096z32.pth"
    return c
