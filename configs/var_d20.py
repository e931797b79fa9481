"""VAR-d20 + CCA (256 px, guidance-free). Target after CCA: guidance-free FID 3.02 (CCA README).

Official recipe (cca.md §6.6, 8 GPUs): global batch 256 per optimizer step as 8 micro-steps
(per-GPU micro-batch 4, the group the negatives are rolled in), beta 0.02,
lambda 50, uncond_ratio 0.1, AdamW lr 2e-5 with warm-up + lin0 decay to 0.1x, weight decay 0.05,
clip 2.0, dpr_ratio 1.0 (max drop path 0.0833), 1 epoch. Sampling for the FID: cfg 0, top_k 900,
top_p 0.96, 50 images per class.

    python -m cca_jax.main --config=configs/var_d20.py:CKPT_DIR --workdir=DIR

where CKPT_DIR holds var_d20.pth and vae_ch160v4096z32.pth.
"""

from configs.var_common import var_config


def get_config(arg=None):
    return var_config(20, accum=8, lambda_=50, end_ratio=0.1, dpr_ratio=1.0,
                      init_adaln_gamma=1e-3, weight_decay_end=-1.0, checkpoint_dir=arg)
