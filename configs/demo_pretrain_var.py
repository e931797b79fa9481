"""Demo reference model, VAR family: a tiny next-scale transformer on 8×8 digits.

Tokens: the demo's multi-scale VQVAE (``configs/demo_tokenizer.py``; shipped as
``cca_jax/demo/assets/vqvae``): scales (1, 2, 4, 8) on an 8×8 latent, 85 tokens, vocab 32.
Maximum-likelihood pretraining with 10% class-label dropout (``loss.type = "mle"``) through the
same train step as the real recipes (teacher-forcing inputs from the VQVAE quantiser).

The shipped reference ``cca_jax/demo/assets/var_ref`` is this run's final params:

    python -m cca_jax.demo.assets --family=var

or by hand, after ``make demo`` wrote the shards (``runs/demo/data/var``):

    python -m cca_jax.main --config=configs/demo_pretrain_var.py:runs/demo/data/var \
        --workdir=runs/demo_pretrain_var
"""

import os

import ml_collections

from configs.common import demo_pretrain_config

DEFAULT_DATA = "runs/demo/data/var"
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "cca_jax", "demo", "assets")
PATCH_NUMS = (1, 2, 4, 8)


def tokenizer_config() -> ml_collections.ConfigDict:
    """The tiny VQVAE (fields of cca_jax.models.vqvae.VQVAEConfig); how it is trained is in
    configs/demo_tokenizer.py."""
    t = ml_collections.ConfigDict()
    t.family = "vqvae"
    t.vocab_size = 32
    t.z_channels = 4  # Cvae
    t.ch = 16
    t.ch_mult = (1,)  # no downsampling: 8×8 image -> 8×8 latent
    t.num_res_blocks = 1
    t.in_channels = 1  # grey digits
    t.using_sa = False
    t.using_mid_sa = False
    t.num_groups = 8
    t.beta = 0.25
    t.quant_conv_ks = 3
    t.quant_resi = 0.5
    t.share_quant_resi = 4
    t.patch_nums = PATCH_NUMS
    t.image_size = 8
    return t


def model_config() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.family = "var"
    m.depth = 3
    m.embed_dim = 64
    m.num_heads = 4
    m.mlp_ratio = 4.0
    m.vocab_size = 32  # = tokenizer.vocab_size
    m.Cvae = 4  # = tokenizer.z_channels
    m.num_classes = 10  # row 10 of the class table is the null class
    m.patch_nums = PATCH_NUMS
    m.norm_eps = 1e-6
    m.shared_aln = False
    m.attn_l2_norm = True
    m.cond_drop_rate = 0.0  # label dropout comes from loss.label_dropout (mle)
    m.drop_rate = 0.0
    m.attn_drop_rate = 0.0
    m.drop_path_rate = 0.0
    m.init_adaln = 0.5
    m.init_adaln_gamma = 1e-3
    m.init_head = 0.02
    m.init_std = -1.0
    return m


def get_config(arg=None):
    c = demo_pretrain_config(model_config(), tokenizer_config(), decay_rule="var", grad_clip=2.0,
                             data_path=arg or DEFAULT_DATA)
    c.init.tokenizer_checkpoint = os.path.join(ASSETS, "vqvae")
    return c
