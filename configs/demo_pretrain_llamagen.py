"""Demo reference model, LlamaGen family: a tiny class-conditional GPT on 8×8 digits.

Maximum-likelihood pretraining with class-label dropout (``loss.type = "mle"``, 10% of labels
replaced by the null class, so the model also learns p(x) and classifier-free guidance works),
through the same train step as the real recipes. Tokens: one per pixel, the grey level 0..16
(``cca_jax/demo/tokenizers.py`` PixelTokenizer, vocab 17, 64 tokens in raster order).

The shipped reference ``cca_jax/demo/assets/llamagen_ref`` is this run's final params:

    python -m cca_jax.demo.assets --family=llamagen     # data shards + this config + export

or by hand, after ``make demo`` wrote the shards (``runs/demo/data/llamagen``):

    python -m cca_jax.main --config=configs/demo_pretrain_llamagen.py:runs/demo/data/llamagen \
        --workdir=runs/demo_pretrain_llamagen
"""

import ml_collections

from configs.common import demo_pretrain_config

DEFAULT_DATA = "runs/demo/data/llamagen"


def model_config() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.family = "llamagen"
    m.dim = 64
    m.n_layer = 3
    m.n_head = 4  # head dim 16 (a multiple of 4 for 2-D RoPE)
    m.n_kv_head = ml_collections.config_dict.placeholder(int)
    m.vocab_size = 17  # grey levels 0..16
    m.num_classes = 10  # row 10 of the class table is the null class
    m.cls_token_num = 1
    m.block_size = 64  # 8×8 pixel tokens
    m.multiple_of = 32  # SwiGLU hidden: int(2/3·4·64) = 170 -> 192
    m.ffn_dim_multiplier = ml_collections.config_dict.placeholder(float)
    m.rope_base = 10000.0
    m.norm_eps = 1e-5
    m.initializer_range = 0.02
    # > 0 keeps the null-class row; the model's own train-mode label dropout stays negligible
    # (as in the official CCA runs), label dropout for pretraining is loss.label_dropout
    m.class_dropout_prob = 1e-5
    # no dropout: the run is short (18 epochs) and dropout masks cost more than the tiny matmuls
    # on a CPU (the VAR demo model has none either)
    m.token_dropout_p = 0.0
    m.attn_dropout_p = 0.0
    m.resid_dropout_p = 0.0
    m.ffn_dropout_p = 0.0
    m.drop_path_rate = 0.0
    return m


def tokenizer_config() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.family = "pixel"  # cca_jax/demo/tokenizers.py PixelTokenizer
    t.levels = 17
    t.image_size = 8
    return t


def get_config(arg=None):
    c = demo_pretrain_config(model_config(), tokenizer_config(), decay_rule="ndim", grad_clip=1.0,
                             data_path=arg or DEFAULT_DATA)
    return c
