"""The embedded demo: CCA on scikit-learn's digits, LlamaGen- and VAR-style, CPU, minutes.

    make demo    # = python -m cca_jax.main --config=configs/demo.py --workdir=runs/demo

Stages and outputs: cca_jax/demo/pipeline.py. Each family starts from a small class-conditional
reference pretrained with 10% label dropout (``configs/demo_pretrain_<family>.py``, shipped in
cca_jax/demo/assets; ``--config.demo.reference=pretrain`` retrains it here), is CCA-fine-tuned at
every λ in ``demo.<family>.cca.lambdas`` and sampled guidance-free; the base model is sampled
guidance-free and with CFG at every ``demo.<family>.cfg_scales``.

Hyper-parameter choices (tiny models, 1,797 images; not the ImageNet values):
* CCA lr is 10-30x the paper's (1e-5 / 2e-5) and the run is a few epochs of the digits instead of
  one epoch of ImageNet (5,000 steps): a few hundred steps must move a model that sees each image
  ~10 times. β is larger than the paper's 0.02 because the demo's sequences are short (64 / 85
  tokens vs 256 / 680), so the log-likelihood ratios inside the sigmoid are smaller; β·Δ should
  reach O(1) within the run.
* λ sweep: larger λ weights the negative-condition term more (stronger "guidance"); the values
  span the trade-off the way the CFG scales do (chosen from a coarse sweep, not to flatter any
  single number).
* Sampling: plain multinomial (temperature 1, no top-k / top-p) for every mode, so that only
  guidance / CCA differ between rows; 1,000 samples per mode, 100 per class.
"""

import ml_collections

from configs import demo_pretrain_llamagen, demo_pretrain_var
from configs.common import base_config


def _family(pretrain, *, cfg_scales, lambdas, beta, lr, steps) -> ml_collections.ConfigDict:
    f = ml_collections.ConfigDict()
    f.pretrain = pretrain  # the full pretraining config (model, tokenizer, optimiser, ...)
    f.cfg_scales = tuple(cfg_scales)  # the family's own CFG convention (see cca_jax/demo/report.py)
    f.cca = ml_collections.ConfigDict()
    f.cca.lambdas = tuple(lambdas)
    f.cca.beta = beta
    f.cca.lr = lr
    f.cca.steps = steps
    f.cca.batch_size = 32
    f.cca.uncond_ratio = 0.1
    f.cca.weight_decay = 0.0
    f.cca.grad_clip = 1.0
    f.cca.seed = 0
    f.sample = ml_collections.ConfigDict()
    f.sample.temperature = 1.0
    f.sample.top_k = 0
    f.sample.top_p = 1.0 if pretrain.model.family == "llamagen" else 0.0
    return f


def get_config(arg=None):
    c = base_config()
    c.job = "demo"
    c.seed = 0
    c.demo = ml_collections.ConfigDict()
    c.demo.families = "llamagen,var"  # comma-separated subset
    c.demo.stages = "all"  # all | tokenizer (configs/demo_tokenizer.py: train the VQVAE only)
    c.demo.reference = "auto"  # auto: shipped assets if present, else pretrain here | assets | pretrain
    c.demo.assets_dir = ""  # "" = cca_jax/demo/assets
    c.demo.num_samples = 1000  # per mode (balanced: 100 per class)
    c.demo.sample_batch = 500
    c.demo.sample_seed = 0
    c.demo.quiet_logs = True  # hide Orbax / clu INFO log lines (cca_jax progress lines stay)

    c.demo.classifier = ml_collections.ConfigDict()
    c.demo.classifier.hidden = 128
    c.demo.classifier.features = 32  # FID feature dimension
    c.demo.classifier.steps = 600
    c.demo.classifier.lr = 3e-3
    c.demo.classifier.weight_decay = 1e-4
    c.demo.classifier.noise = 0.05
    c.demo.classifier.holdout = 0.2
    c.demo.classifier.seed = 0

    # the VQVAE of the VAR family (configs/demo_tokenizer.py trains only this)
    c.demo.vqvae_train = ml_collections.ConfigDict()
    c.demo.vqvae_train.steps = 1500
    c.demo.vqvae_train.batch_size = 128
    c.demo.vqvae_train.lr = 3e-3
    c.demo.vqvae_train.seed = 0

    # CCA: 100 steps x 32 images ~ 1.8 epochs of the digits
    c.demo.llamagen = _family(demo_pretrain_llamagen.get_config(), cfg_scales=(1.5, 2.0, 3.0),
                              lambdas=(1.0, 10.0, 100.0), beta=0.1, lr=3e-4, steps=100)
    # VAR's cfg ramps over the scales (last scale: (1 + cfg)·cond - cfg·uncond)
    c.demo.var = _family(demo_pretrain_var.get_config(), cfg_scales=(1.0, 2.0, 4.0),
                         lambdas=(1.0, 10.0, 100.0), beta=0.1, lr=3e-4, steps=100)
    return c
