"""LlamaGen GPT-B + CCA at 256 px (block_size 256): the official fine-tuning recipe.

Target after CCA (thu-ml/CCA README): guidance-free FID 7.04 (GPT-B, 384 px, FID-50k at 256 px,
cfg_scale 1.0). 256 px variant: the same recipe on 16x16 code grids; the paper has no 256 px CCA result, the
target above is the 384 px one.

Recipe (cca.md §5.6): lambda 1000, beta 0.02, uncond_ratio 0.1, AdamW lr 1e-5 constant, betas
(0.9, 0.95), weight decay 0.05 on >= 2-D params, 16 summed micro-steps per optimizer step of 256,
clip 1.0, token/resid/ffn dropout 0.1 kept on (also in the reference), 1 epoch, bf16 compute.
Official training layout: DDP, class_dropout_prob 1e-5 (official files wrap the state dict in "model").
Pre-trained checkpoint c2i_B_256.pt: released.

    python -m cca_jax.main --config=configs/llamagen_b_256.py:CKPT_DIR --workdir=DIR \
        --config.data.path=CODES_DIR

where CKPT_DIR holds c2i_B_256.pt and vq_ds16_c2i.pt.
"""

from configs import llamagen_common


def get_config(arg=None):
    return llamagen_common.cca_config("B", 256, checkpoint_dir=arg)
