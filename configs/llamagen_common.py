"""LlamaGen c2i GPT model sections and the official CCA fine-tuning recipe (shared by configs/llamagen_*.py).

Sizes from ../shared/spec/llamagen.md §1.1 (``GPT_models`` in the official gpt.py); the CCA recipe
from ../shared/spec/cca.md §5 (the thu-ml/CCA README commands).
"""

from __future__ import annotations

import ml_collections

from configs import common

# factory key -> (n_layer, n_head, dim)
SIZES = {
    "B": (12, 12, 768),
    "L": (24, 16, 1024),
    "XL": (36, 20, 1280),
    "XXL": (48, 24, 1536),
    "XXXL": (48, 40, 2560),
    "3B": (24, 32, 3200),
}
# λ of the README commands (cca.md §5.6); XXXL has no released checkpoint or recipe
CCA_LAMBDA = {"B": 1000.0, "L": 300.0, "XL": 1000.0, "XXL": 1000.0, "XXXL": 1000.0, "3B": 500.0}
# sizes the official code trains with FSDP (class_dropout_prob 1e-6, bare state-dict files)
FSDP_SIZES = ("XXL", "XXXL", "3B")
# guidance-free FID-50k (384 px model, evaluated at 256) after CCA, thu-ml/CCA README
PAPER_FID_AFTER_CCA = {"B": 7.04, "L": 3.43, "XL": 3.10, "XXL": 3.12, "3B": 2.69}


def model_config(size: str, image_size: int) -> ml_collections.ConfigDict:
    """``config.model`` for ``GPT-<size>`` at ``image_size`` px (VQ-16: (image_size/16)² tokens).

    Field names are the official ``ModelArgs`` ones plus ``family`` and ``image_size``; the dropout
    values are the CCA ``--keep_dropout`` ones (the pre-training defaults).
    """
    size = size.upper().removeprefix("GPT-")
    if size not in SIZES:
        raise ValueError(f"LlamaGen size {size!r} unknown; choose one of {sorted(SIZES)}.")
    if image_size % 16:
        raise ValueError(f"image_size={image_size} must be a multiple of 16 (VQ-16 tokenizer).")
    n_layer, n_head, dim = SIZES[size]
    m = ml_collections.ConfigDict()
    m.family = "llamagen"
    m.image_size = image_size  # pixels; block_size = (image_size // 16) ** 2
    m.dim = dim
    m.n_layer = n_layer
    m.n_head = n_head
    m.n_kv_head = ml_collections.config_dict.placeholder(int)  # None: MHA (every released model)
    m.vocab_size = 16384  # VQ-16 codebook size
    m.num_classes = 1000  # ImageNet; row 1000 of the class table is the null class
    m.cls_token_num = 1
    m.block_size = (image_size // 16) ** 2  # 256 (256 px) or 576 (384 px)
    m.multiple_of = 256  # SwiGLU hidden size rounding
    m.ffn_dim_multiplier = ml_collections.config_dict.placeholder(float)
    m.rope_base = 10000.0
    m.norm_eps = 1e-5
    m.initializer_range = 0.02
    # CCA: 1e-5 (DDP script) / 1e-6 (FSDP script); > 0 keeps the 1001-row class table
    m.class_dropout_prob = 1e-6 if size in FSDP_SIZES else 1e-5
    m.token_dropout_p = 0.1
    m.attn_dropout_p = 0.0
    m.resid_dropout_p = 0.1
    m.ffn_dropout_p = 0.1
    m.drop_path_rate = 0.0
    return m


def official_checkpoint_name(size: str, image_size: int) -> str:
    """Released pre-trained file name, e.g. ``c2i_B_256.pt`` / ``c2i_3B_384.pt``."""
    return f"c2i_{size}_{image_size}.pt"


def cca_config(size: str, image_size: int, checkpoint_dir: str | None = None
               ) -> ml_collections.ConfigDict:
    """base_config() + ``GPT-<size>`` + the official LlamaGen CCA recipe (cca.md §5).

    checkpoint_dir (a recipe's ``get_config`` arg): directory holding the official
    ``c2i_<size>_<image_size>.pt`` and the VQ-16 tokenizer ``vq_ds16_c2i.pt``.
    """
    size = size.upper().removeprefix("GPT-")
    c = common.base_config()
    c.model = model_config(size, image_size)
    c.tokenizer.family = "vq16"  # LlamaGen VQ-16 (tokenizers.md); training reads pre-extracted codes
    if checkpoint_dir:
        root = checkpoint_dir.rstrip("/")
        c.init.reference_checkpoint = f"{root}/{official_checkpoint_name(size, image_size)}"
        c.init.tokenizer_checkpoint = f"{root}/vq_ds16_c2i.pt"

    c.loss.type = "cca"
    c.loss.beta = 0.02
    c.loss.lambda_ = CCA_LAMBDA[size]
    c.loss.uncond_ratio = 0.1
    c.loss.uncond_zero_form = "llamagen"  # uncond_ratio == 0 would be the linear official form
    # global_roll (default) rolls labels over the global batch: device-count invariant, and with
    # shuffled data the same distribution of negatives as the official per-GPU roll. Set
    # negatives="group_roll" (roll_group 2 = the official per-GPU micro-batch) to reproduce the
    # official pairing exactly.
    c.loss.negatives = "global_roll"
    c.loss.roll_group = 2

    c.optim.lr = 1e-5  # constant, no warm-up
    c.optim.schedule = "constant"
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.weight_decay_end = -1.0
    c.optim.decay_rule = "ndim"  # decay >= 2-D params (everything but the RMSNorm weights)
    c.optim.grad_clip = 1.0
    c.optim.grad_accum_steps = 16
    c.optim.accum = "sum"  # official: un-normalised micro-step gradients are summed, then clipped
    c.optim.sum_steps = 16  # ... 16 of them: kept when grad_accum_steps changes with the topology

    c.train.global_batch_size = 256
    c.train.num_epochs = 1.0  # 5,004 optimizer steps over the 1,281,167 ImageNet codes
    c.train.num_steps = -1
    c.train.keep_dropout = True  # --keep_dropout: policy and reference run with dropout on
    c.train.compute_dtype = "bfloat16"  # official bf16 autocast; fp32 master weights
    c.train.ckpt_every = 1000

    c.sample.cfg_scale = 1.0  # guidance-free: the point of CCA
    c.sample.top_k = 0
    c.sample.top_p = 1.0
    c.sample.temperature = 1.0
    # the official FID samplers cast the GPT to bf16 (--precision bf16) and decode with the VQ
    # model in fp32; so does this (--config.sample.dtype=float32 samples in full precision)
    c.sample.dtype = "bfloat16"
    return c
