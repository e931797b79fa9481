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
    c.loss.negatives = "global_roll"  # roll labels by -1 over each micro-batch (global_roll: the
    #   same pairing on any device count) | group_roll: within consecutive groups of roll_group rows
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
    c.optim.warmup_steps = 0.0  # var_lin0: linear warm-up length in optimizer steps (VAR: wp_it / accum)
    c.optim.warmup_start = 0.005  # var_lin0: lr ratio at step 0 (wp0)
    c.optim.end_ratio = 0.1  # var_lin0: final lr ratio (wpe)
    c.optim.schedule_steps = -1.0  # var_lin0: schedule length in optimizer steps (may be
    #   fractional: VAR's max_it / accum); < 0: the run's number of optimizer steps
    c.optim.grad_clip = 1.0  # global-norm clip threshold (applied to the accumulated gradient)
    c.optim.grad_accum_steps = 1  # micro-steps per optimizer step
    c.optim.accum = "mean"  # "sum" (LlamaGen: sum of micro-step gradients, so the clip acts on
    #   sum_steps x the mean gradient) | "mean" (VAR). Default "mean": the update does not depend on
    #   how the batch is split; LlamaGen recipes set "sum" to reproduce the official update.
    c.optim.sum_steps = 0  # accum="sum": the gradient is sum_steps x the mean micro-step gradient
    #   whatever grad_accum_steps is (official LlamaGen: 16); 0 = grad_accum_steps

    # --- training loop (cca_jax/train.py) -------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 256  # images per optimizer step, over all hosts
    c.train.num_epochs = 1.0  # used when num_steps < 0
    c.train.num_steps = -1  # optimizer steps; < 0: num_epochs over the dataset
    c.train.keep_dropout = True  # policy and reference keep dropout/drop path, independent masks
    #   (official recipes); False: every dropout/drop-path rate 0 (class-label dropout kept)
    c.train.compute_dtype = "float32"  # float32 | bfloat16 | float16 (fp32 master weights always)
    c.train.loss_scale = "auto"  # auto (dynamic for float16) | dynamic | none: GradScaler-style
    #   loss scaling (cca_jax/loss_scale.py): overflowing steps are skipped and halve the scale
    c.train.loss_scale_init = 2.0 ** 11  # torch GradScaler's init_scale as VAR sets it
    c.train.loss_scale_growth_interval = 1000  # finite steps in a row before the scale doubles
    c.train.loss_scale_cap = 0.0  # > 0: a step run above it resets the scale to it (VAR: 2^15)
    c.train.reference_dtype = "float32"  # dtype the frozen reference is held in
    c.train.remat = False  # rematerialise transformer blocks to save activation memory
    c.train.nonfinite = "error"  # error | skip: what a non-finite loss/gradient does (the update
    #   is never applied; error stops the run naming the step, skip logs it and continues)
    c.train.token_metrics = True  # also log VAR's token metrics Lm/Lt/Accm/Acct (one argmax pass)
    c.train.log_every = 50  # steps between metric writes
    c.train.ckpt_every = 1000  # steps between checkpoints (and one at the end)
    c.train.keep_checkpoints = 3  # how many checkpoints Orbax keeps
    c.train.eval_every = 0  # steps between small-N FID evaluations during training (0: off);
    #   samples with config.sample, scores with config.eval.train_num_samples / train_metrics

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
    # further crop sets of the same images, comma-separated (LlamaGen's optional ten_crop_105
    # codes): each example then comes from each set with equal probability, as the official dataset
    c.data.mix_paths = ""
    c.data.views = "random"  # random: one augmentation (view) per image per epoch | all: every record
    c.data.prefetch = 2  # batches read ahead by a background thread (0: read in the caller)
    c.data.tokenizer_checksum = ""  # if set, must equal the dataset's tokenizer checksum

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
    c.sample.cfg_interval = -1  # LlamaGen: > -1 stops guiding after that many tokens
    c.sample.labels = "auto"  # auto (VAR: balanced, LlamaGen: uniform) | balanced | uniform
    c.sample.image_size_eval = 256  # LlamaGen: decoded images are bicubic-resized to this (0: keep)
    c.sample.dtype = "float32"  # compute dtype of the sampler (bfloat16 on TPU for speed)
    c.sample.cache_block_len = -1  # LlamaGen KV cache block (slots): -1 auto (~64), 0 one static cache
    c.sample.name = ""  # output file stem under <workdir>/samples ("" = samples_<N>)

    # --- evaluation (cca_jax/evaluate.py) -------------------------------------------------------------
    c.eval = ml_collections.ConfigDict()
    c.eval.samples_npz = ""  # ADM-format npz to evaluate ("" = sample from the checkpoint first)
    c.eval.reference_npz = ""  # ADM reference batch (VIRTUAL_imagenet256_labeled.npz)
    c.eval.inception_weights = ""  # pt_inception-2015-12-05 weights file (never downloaded)
    c.eval.batch_size = 200  # images per device per feature-network call
    c.eval.inception_preprocess = "tf1"  # tf1: ADM graph's front end (TF1 resize, (x-128)/128) | pytorch_fid
    c.eval.inception_resolution = 299  # feature-network input size (299 for real evaluations; >= 75)
    c.eval.tf_graph = ""  # ADM's classify_image_graph_def.pb: exact ADM features via TensorFlow instead
    c.eval.reference_stats = "file"  # file: the reference npz's own mu/sigma(_s) if present (ADM) | recompute
    c.eval.reference_image_size = 256  # reference given as an image directory: ADM center crop to this size
    c.eval.cache_dir = ""  # cache of reference features ("" = <workdir>/eval_cache)
    c.eval.metrics = "fid,sfid,inception_score,precision,recall"  # comma-separated; also: accuracy
    c.eval.labels_key = ""  # npz key of the sample labels for accuracy ("" = labels or arr_1)
    c.eval.is_split_size = 5000  # Inception-Score split size (ADM: 5000, so 10 splits for 50k)
    c.eval.pr_k = 3  # precision/recall neighbourhood size
    c.eval.pr_batch_size = 10000  # precision/recall row/column batch (ADM: 10000)
    c.eval.fid_method = "sqrtm"  # sqrtm: ADM's numerics | eigh: fast, for N < feature dim (in-training FID uses it)
    c.eval.step = -1  # TensorBoard step of the eval job's metrics (-1: the sampled checkpoint's train step)
    c.eval.output_name = ""  # JSON file name under <workdir>/eval ("" = the samples npz's stem)
    c.eval.train_num_samples = 1000  # samples per in-training evaluation (every train.eval_every steps)
    c.eval.train_metrics = "fid"  # metrics of the in-training evaluation

    # --- capacity planner (cca_jax/plan.py; job "plan") -----------------------------------------------
    c.plan = ml_collections.ConfigDict()
    c.plan.topology = "v5p-8"  # what to plan for: v4-32, v5p-64, v5e-256, v6e-64, 8xH100, 8xA100-80G...
    c.plan.micro_batch = -1  # per-device micro-batch; < 0: global_batch_size / grad_accum_steps / (data*fsdp)
    c.plan.hbm_fraction = 0.9  # share of HBM the step may use (rest: XLA scratch, runtime, fragmentation)

    # --- checkpoint conversion (cca_jax/convert/job.py; job "convert") ---------------------------------
    c.convert = ml_collections.ConfigDict()
    c.convert.direction = "to_orbax"  # to_orbax: official files -> <workdir>/params, <workdir>/tokenizer_params
    #                                   to_official: Orbax params -> <workdir>/model.pt(h), tokenizer.pt(h)
    c.convert.source = ""  # model to convert; "" = config.init.reference_checkpoint (file, Orbax params
    #                        dir, or a train workdir: its latest checkpoint's params)
    c.convert.tokenizer = True  # also convert config.init.tokenizer_checkpoint when it is set
    c.convert.wrap = "auto"  # to_official: "auto" (the family's official layout), "none" (bare state dict), or a key
    c.convert.overwrite = False  # replace existing outputs instead of stopping with an error
    return c


def demo_pretrain_config(model: ml_collections.ConfigDict, tokenizer: ml_collections.ConfigDict, *,
                         decay_rule: str, grad_clip: float, data_path: str) -> ml_collections.ConfigDict:
    """The demo reference models' maximum-likelihood pretraining from scratch (both families): 10 %
    label dropout, AdamW 2e-3 with linear warm-up then decay, 500 steps of 64 (~18 epochs of the
    digits)."""
    c = base_config()
    c.job = "train"
    c.seed = 0
    c.model = model
    c.tokenizer = tokenizer
    c.init.from_scratch = True

    c.loss.type = "mle"
    c.loss.label_dropout = 0.1

    c.optim.lr = 2e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.05
    c.optim.decay_rule = decay_rule
    c.optim.schedule = "var_lin0"  # linear warm-up, then linear decay to end_ratio
    c.optim.warmup_steps = 50.0
    c.optim.warmup_start = 0.01
    c.optim.end_ratio = 0.05
    c.optim.grad_clip = grad_clip

    c.train.global_batch_size = 64
    c.train.num_steps = 500
    c.train.keep_dropout = True
    c.train.compute_dtype = "float32"
    c.train.log_every = 100
    c.train.ckpt_every = 250
    c.train.keep_checkpoints = 1
    c.train.token_metrics = True

    c.data.source = "shards"
    c.data.path = data_path
    c.data.prefetch = 2
    return c
