"""Sections shared by every recipe. Each field is documented here, once.

A recipe (``configs/<name>.py``) calls :func:`base_config`, fills ``config.model`` (and
``config.tokenizer``) from its family's helper module and overrides what its paper row changes.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "train"  # train | sample | eval | tokenize | convert | plan | demo (see cca_jax/main.py)
    c.seed = 0  # master seed: init, dropout, label masks, negatives, data order

    # --- model / tokenizer: filled by configs/llamagen_common.py or configs/var_common.py -------
    c.model = ml_collections.ConfigDict()  # .family = "llamagen" | "var" plus the family's fields
    c.tokenizer = ml_collections.ConfigDict()  # VQ tokenizer hyper-parameters (.family vq16 | vqvae)

    # --- where weights come from ---------------------------------------------------------------
    c.init = ml_collections.ConfigDict()
    c.init.reference_checkpoint = ""  # official .pt/.pth file or an Orbax params dir; policy starts here
    c.init.tokenizer_checkpoint = ""  # official tokenizer file (VAR: vae_ch160v4096z32.pth) or Orbax dir
    c.init.from_scratch = False  # True: random official init instead of a checkpoint (demo pretraining)

    # --- objective (cca_jax/losses.py; ../shared/spec/cca.md) ------------------------------------
    c.loss = ml_collections.ConfigDict()
    c.loss.type = "cca"  # cca | dpo | unlearning | mle (maximum likelihood with label dropout)
    c.loss.beta = 0.02  # β: scale of the log-likelihood-ratio inside the sigmoid
    c.loss.lambda_ = 1000.0  # λ: weight of the negative-condition term (loss divided by max(λ, 1))
    c.loss.uncond_ratio = 0.1  # share of rows whose labels are both set to the null class
    c.loss.uncond_zero_form = "llamagen"  # uncond_ratio == 0 form: "llamagen" (linear) | "var" (sigmoid)
    c.loss.negatives = "global_roll"  # global_roll (device-count invariant) | group_roll (official)
    c.loss.roll_group = 2  # group_roll: official per-GPU micro-batch the labels are rolled within
    c.loss.label_dropout = 0.1  # mle only: share of labels replaced by the null class

    # --- optimiser (cca_jax/optim.py) ---------------------------------------------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5  # peak learning rate
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05  # start value (VAR anneals to weight_decay_end by cosine)
    c.optim.weight_decay_end = -1.0  # < 0: constant weight_decay
    c.optim.decay_rule = "ndim"  # which params decay: "ndim" (>= 2-D, LlamaGen) | "var" (VAR's name rule)
    c.optim.schedule = "constant"  # constant | var_lin0 (warm-up then VAR's linear decay)
    c.optim.warmup_steps = 0  # var_lin0: linear warm-up length in optimizer steps
    c.optim.warmup_start = 0.005  # var_lin0: lr ratio at step 0 (wp0)
    c.optim.end_ratio = 0.1  # var_lin0: final lr ratio (wpe)
    c.optim.grad_clip = 1.0  # global-norm clip threshold (applied to the accumulated gradient)
    c.optim.grad_accum_steps = 1  # micro-steps per optimizer step
    c.optim.accum = "mean"  # "sum" (LlamaGen: sum of micro-step gradients) | "mean" (VAR)

    # --- training loop (cca_jax/train.py) -------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 256  # images per optimizer step, over all hosts
    c.train.num_epochs = 1.0  # used when num_steps < 0
    c.train.num_steps = -1  # optimizer steps; < 0: num_epochs over the dataset
    c.train.keep_dropout = True  # policy and reference keep dropout/drop path (official recipes)
    c.train.compute_dtype = "float32"  # float32 | bfloat16 (fp32 master weights either way)
    c.train.reference_dtype = "float32"  # dtype the frozen reference is held in
    c.train.remat = False  # rematerialise transformer blocks to save activation memory
    c.train.nonfinite = "error"  # error | skip: what a non-finite loss/gradient does
    c.train.log_every = 50  # steps between metric writes
    c.train.ckpt_every = 1000  # steps between checkpoints (and one at the end)
    c.train.keep_checkpoints = 3  # how many checkpoints Orbax keeps
    c.train.eval_every = 0  # steps between small-N FID evaluations during training (0: off)

    # --- device mesh (cca_jax/sharding.py) ------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: all remaining devices
    c.mesh.tensor = 1

    # --- data (cca_jax/data/) ----------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.source = "shards"  # shards (tokenised dataset written by the tokenize job) | synthetic
    c.data.path = ""  # directory of token shards (local or gs://)
    c.data.shuffle_seed = 0
    c.data.synthetic_size = 1024  # synthetic: number of random examples
    c.data.on_bad_record = "error"  # error | skip (skipped records are counted in the logs)

    # --- sampling (cca_jax/sampling/) -----------------------------------------------------------------
    c.sample = ml_collections.ConfigDict()
    c.sample.checkpoint = ""  # params to sample from (Orbax export dir or official file); "" = workdir's latest
    c.sample.num_samples = 50000
    c.sample.batch_size = 64  # per-device batch
    c.sample.cfg_scale = 1.0  # guidance scale (family convention; see sampling.md)
    c.sample.temperature = 1.0
    c.sample.top_k = 0
    c.sample.top_p = 1.0
    c.sample.seed = 0

    # --- evaluation (cca_jax/evaluate.py) -------------------------------------------------------------
    c.eval = ml_collections.ConfigDict()
    c.eval.samples_npz = ""  # ADM-format npz to evaluate ("" = sample from the checkpoint first)
    c.eval.reference_npz = ""  # ADM reference batch (VIRTUAL_imagenet256_labeled.npz)
    c.eval.inception_weights = ""  # pt_inception-2015-12-05 weights file (never downloaded)
    c.eval.batch_size = 200
    return c
