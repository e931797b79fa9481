"""Pieces shared by the VAR recipes (configs/var_d16.py ... var_d30.py).

``model_config(depth, ...)`` is the official ``build_vae_var`` / CCA ``build_vae_var_with_ref``
builder: width 64*depth, heads = depth, MLP ratio 4, LayerNorm eps 1e-6, attn_l2_norm,
``drop_path_rate = dpr_ratio * 0.1 * depth / 24``, ``cond_drop_rate = 0`` (CCA builder).
``tokenizer_config()`` is ``vae_ch160v4096z32``. ``cca_recipe(...)`` fills loss / optim / train
from the README command of the CCA VAR fine-tuning (spec cca.md §6.6, 8 GPUs).
"""

from __future__ import annotations

import math

import ml_collections

from configs.common import base_config

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
IMAGENET_TRAIN_SIZE = 1_281_167  # VAR counts iterations per epoch from the full train split
OFFICIAL_WORLD = 8  # the README commands run on 8 GPUs
NULL_LABEL = 1000  # num_classes; the CCA trainer hard-codes 1000 as the null class


def model_config(depth: int, *, dpr_ratio: float = 1.0, shared_aln: bool = False,
                 patch_nums=PATCH_NUMS_256, vocab_size: int = 4096, Cvae: int = 32,
                 num_classes: int = 1000, cond_drop_rate: float = 0.0,
                 init_adaln_gamma: float = 1e-5) -> ml_collections.ConfigDict:
    """``config.model`` for VAR-d{depth} (fields of cca_jax.models.var.VARConfig)."""
    m = ml_collections.ConfigDict()
    m.family = "var"
    m.depth = depth
    m.embed_dim = 64 * depth  # C; head dim is always 64
    m.num_heads = depth
    m.mlp_ratio = 4.0
    m.vocab_size = vocab_size  # = tokenizer.vocab_size
    m.Cvae = Cvae  # = tokenizer.z_channels
    m.num_classes = num_classes  # class table has num_classes + 1 rows; row num_classes = null
    m.patch_nums = tuple(patch_nums)  # = tokenizer.patch_nums; L = sum(pn^2) = 680
    m.norm_eps = 1e-6
    m.shared_aln = shared_aln  # False for d16-d30; the 512-px d36 uses True
    m.attn_l2_norm = True
    m.cond_drop_rate = cond_drop_rate  # 0.0 in the CCA builder (0.1 in VAR pre-training)
    m.drop_rate = 0.0
    m.attn_drop_rate = 0.0
    m.dpr_ratio = dpr_ratio  # informational: drop_path_rate below is derived from it
    m.drop_path_rate = dpr_ratio * 0.1 * depth / 24  # max; block i gets linspace(0, max, depth)[i]
    # init_weights arguments (only used by config.init.from_scratch)
    m.init_adaln = 0.5
    m.init_adaln_gamma = init_adaln_gamma  # README --alng: 1e-3 d16/d20, 1e-4 d24, 1e-5 d30
    m.init_head = 0.02
    m.init_std = -1.0  # < 0: sqrt(1 / (3C))
    return m


def tokenizer_config(patch_nums=PATCH_NUMS_256) -> ml_collections.ConfigDict:
    """``config.tokenizer`` for the multi-scale VQVAE ``vae_ch160v4096z32.pth``."""
    t = ml_collections.ConfigDict()
    t.family = "vqvae"
    t.vocab_size = 4096
    t.z_channels = 32  # Cvae
    t.ch = 160
    t.ch_mult = (1, 1, 2, 2, 4)  # downsample 16: 256 px -> 16x16 latent
    t.num_res_blocks = 2
    t.dropout = 0.0
    t.beta = 0.25
    t.using_znorm = False
    t.quant_conv_ks = 3
    t.quant_resi = 0.5
    t.share_quant_resi = 4
    t.default_qresi_counts = 0
    t.patch_nums = tuple(patch_nums)  # v_patch_nums
    t.image_size = 16 * patch_nums[-1]
    return t


def lin0_schedule(accum: int, per_gpu_batch: int, *, epochs: float = 1.0, world: int = OFFICIAL_WORLD,
                  n_train: int = IMAGENET_TRAIN_SIZE) -> tuple[float, float]:
    """(warmup_steps, schedule_steps) in optimizer steps of VAR's per-micro-iteration schedule.

    glb_bs = per_gpu_batch*world per micro-step; iters = ceil(n_train/glb_bs) micro-iterations per
    epoch; max_it = epochs*iters; wp_it = round(epochs/50 * iters). Both divided by accum
    (fractional on purpose: optim.make_schedules multiplies back by accum).
    """
    iters = math.ceil(n_train / (per_gpu_batch * world))
    max_it = epochs * iters
    wp_it = round(epochs / 50 * iters)
    return wp_it / accum, max_it / accum


def cca_recipe(config: ml_collections.ConfigDict, *, accum: int, lambda_: float, end_ratio: float,
               weight_decay_end: float = -1.0) -> ml_collections.ConfigDict:
    """The official CCA VAR fine-tuning (README, 8 GPUs, global batch 256 per optimizer step)."""
    global_batch = 256
    per_gpu = global_batch // accum // OFFICIAL_WORLD  # 8 / 4 / 4 / 2: the official roll group

    config.loss.type = "cca"
    config.loss.beta = 0.02
    config.loss.lambda_ = float(lambda_)
    config.loss.uncond_ratio = 0.1
    config.loss.uncond_zero_form = "var"
    config.loss.negatives = "group_roll"  # roll within the official per-GPU micro-batch
    config.loss.roll_group = per_gpu

    config.optim.lr = 2e-5  # tlr = ac * tblr * glb_bs / 256 = 2e-5 for every README recipe
    config.optim.b1 = 0.9
    config.optim.b2 = 0.95
    config.optim.eps = 1e-8
    config.optim.weight_decay = 0.05
    config.optim.weight_decay_end = float(weight_decay_end)  # < 0: constant 0.05
    config.optim.decay_rule = "var"
    config.optim.schedule = "var_lin0"
    warmup, sched = lin0_schedule(accum, per_gpu)
    config.optim.warmup_steps = warmup  # wp = ep/50 -> ~100 optimizer steps
    config.optim.warmup_start = 0.005  # wp0
    config.optim.end_ratio = float(end_ratio)  # wpe
    config.optim.schedule_steps = sched  # max_it / accum (~5004.6)
    config.optim.grad_clip = 2.0  # tclip
    config.optim.grad_accum_steps = accum
    config.optim.accum = "mean"  # loss / ac, DDP-averaged

    config.train.global_batch_size = global_batch
    config.train.num_epochs = 1.0  # the official run makes 5004 optimizer steps
    config.train.num_steps = -1
    config.train.keep_dropout = True  # the reference runs in train mode (drop path) too
    # The official run uses fp16 autocast (--fp16=1) with a GradScaler; bf16 is the TPU's 16-bit
    # type and needs no scaling. --config.train.compute_dtype=float16 runs the official scheme
    # (loss_scale "auto" turns the scaler on, capped at 2^15 as VAR's trainer does).
    config.train.compute_dtype = "bfloat16"
    config.train.loss_scale_cap = 2.0 ** 15
    return config


def var_config(depth: int, *, accum: int, lambda_: float, end_ratio: float, dpr_ratio: float,
               init_adaln_gamma: float, weight_decay_end: float = -1.0,
               checkpoint_dir: str | None = None) -> ml_collections.ConfigDict:
    """A complete VAR-d{depth} CCA recipe. ``checkpoint_dir`` (the recipe's ``get_config`` arg)
    holds ``var_d{depth}.pth`` and ``vae_ch160v4096z32.pth``."""
    c = base_config()
    c.model = model_config(depth, dpr_ratio=dpr_ratio, init_adaln_gamma=init_adaln_gamma)
    c.tokenizer = tokenizer_config()
    if checkpoint_dir:
        root = checkpoint_dir.rstrip("/")
        c.init.reference_checkpoint = f"{root}/var_d{depth}.pth"
        c.init.tokenizer_checkpoint = f"{root}/vae_ch160v4096z32.pth"
    cca_recipe(c, accum=accum, lambda_=lambda_, end_ratio=end_ratio, weight_decay_end=weight_decay_end)

    # guidance-free evaluation of CCA (CCA README: --cfg 0.0, top_k 900, top_p 0.96, 50 per class)
    c.sample.cfg_scale = 0.0  # VAR convention: 0 = guidance-free; CFG ramps t = cfg * si / (S-1)
    c.sample.top_k = 900
    c.sample.top_p = 0.96
    c.sample.temperature = 1.0  # the VAR sampler has no temperature
    c.sample.more_smooth = False  # Gumbel-softmax smoothing (visualisation only)
    return c
