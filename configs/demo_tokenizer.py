"""Trains the demo's multi-scale VQVAE (VAR family) on the digits and nothing else.

    python -m cca_jax.main --config=configs/demo_tokenizer.py --workdir=runs/demo_tokenizer

writes the Orbax params dir ``<workdir>/tokenizer_var`` — what ships as
``cca_jax/demo/assets/vqvae``. Architecture: ``configs/demo_pretrain_var.py``
(``tokenizer_config``); training: ``config.demo.vqvae_train`` (Adam, cosine decay, batch 128,
the loss of cca_jax/demo/tokenizers.py).
"""

from configs import demo


def get_config(arg=None):
    c = demo.get_config(arg)
    c.demo.stages = "tokenizer"
    c.demo.families = "var"
    return c
