"""The CCA train step and loop: ``python -m cca_jax.main --config=configs/<recipe>.py --workdir=DIR``.

One jitted, sharded step per optimizer update (spec ../shared/spec/cca.md):

1. the global batch ``tokens [B, L]``, ``labels [B]`` is split into ``grad_accum_steps``
   micro-batches (micro-batch ``j`` = rows ``r`` with ``r % accum == j``, so every device keeps
   its own rows) and ``lax.scan`` runs them;
2. per micro-batch: negatives and the null-class (TBM) mask (losses.build_cca_labels), one
   reference forward and one policy forward on ``[x; x]`` with ``[y; ỹ]`` (rows interleaved
   ``y_0, ỹ_0, y_1, ỹ_1, ...`` so that no row changes device), with independent dropout rngs,
   sequence log-likelihoods and the loss (losses.cca_loss / mle_loss);
3. the micro-step gradients are summed, scaled for the accumulation mode (optim.py), clipped and
   applied by AdamW; a non-finite loss or gradient leaves params and optimizer state unchanged
   and is reported (``config.train.nonfinite``: ``error`` stops the run naming the step,
   ``skip`` logs it and goes on). With float16 compute the loss is scaled as torch's GradScaler
   does (loss_scale.py): there an overflowing step is routine, skipped and logged, and only a
   non-finite step at a loss scale below 1 counts as non-finite above.

State: :class:`TrainState` (step, policy params, optimizer state, base rng; the loss scale in
float16 runs). The frozen reference params are a separate argument (never differentiated,
optionally bfloat16). Randomness of step ``k`` is ``fold_in(rng, k)`` (threefry, partitionable:
the same bits on any mesh), so a resumed run, or one on another device count, draws exactly what
an uninterrupted one would.
Params and optimizer state are sharded from ``jax.eval_shape`` + the logical rules
(sharding.py), the batch over ``data × fsdp``; the state is donated; everything is traced under
``sharding.use_mesh`` so the models' logical activation constraints take effect.

The loop (:func:`train_and_evaluate`): resume from the newest complete Orbax checkpoint in
``<workdir>/checkpoints`` (cca_jax/checkpoint.py; also onto another mesh), data position
included; each process feeds only its rows of the global batch
(``jax.make_array_from_process_local_data``); clu metric writers (TensorBoard in ``workdir``, only
process 0 writes) get the loss, every CCA metric, lr, weight decay, grad norm, steps/s and tokens/s
every ``train.log_every`` steps, plus ``ReportProgress`` and a console line; a checkpoint every
``train.ckpt_every`` steps and at the end; SIGTERM (preemption.py) saves and stops at an agreed
step; ``train.eval_every > 0`` adds a small-N FID of policy samples (evaluate.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from cca_jax import families, losses, optim, sharding
from cca_jax import loss_scale as loss_scale_lib
from cca_jax.models import matmul

BATCH_AXES = ("data", "fsdp")
HPARAM_SECTIONS = ("seed", "model", "init", "loss", "optim", "train", "mesh", "data")


# ============================================================================ state and config

@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # policy params (float32 master weights)
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; step k uses fold_in(rng, k)
    loss_scale: Optional[loss_scale_lib.LossScaleState] = None  # float16 runs only

    def to_tree(self) -> dict:
        """The dict saved in checkpoints (``params`` at the top, as the samplers expect)."""
        tree = {"step": self.step, "params": self.params, "opt_state": self.opt_state,
                "rng": self.rng}
        if self.loss_scale is not None:
            tree["loss_scale"] = flax.serialization.to_state_dict(self.loss_scale)
        return tree

    @classmethod
    def from_tree(cls, tree: dict) -> "TrainState":
        ls = tree.get("loss_scale")
        return cls(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                   rng=tree["rng"],
                   loss_scale=None if ls is None else loss_scale_lib.LossScaleState(**ls))


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static (trace-time) options of the step, read from the config once."""

    loss_type: str = "cca"
    beta: float = 0.02
    lambda_: float = 1000.0
    uncond_ratio: float = 0.1
    uncond_zero_form: str = "llamagen"
    negatives: str = "global_roll"
    roll_group: int = 2
    label_dropout: float = 0.1
    accum_steps: int = 1
    accum_scale: float = 1.0
    compute_dtype: Any = jnp.float32
    token_metrics: bool = True
    loss_scale: Optional[loss_scale_lib.LossScaleOptions] = None

    @classmethod
    def from_config(cls, config) -> "StepOptions":
        lc = config.loss
        if lc.type not in losses.LOSS_TYPES:
            raise ValueError(f"config.loss.type={lc.type!r}; expected one of {losses.LOSS_TYPES}.")
        if lc.negatives not in losses.NEGATIVES:
            raise ValueError(f"config.loss.negatives={lc.negatives!r}; expected one of "
                             f"{losses.NEGATIVES}.")
        return cls(loss_type=lc.type, beta=float(lc.beta), lambda_=float(lc.lambda_),
                   uncond_ratio=float(lc.uncond_ratio), uncond_zero_form=lc.uncond_zero_form,
                   negatives=lc.negatives, roll_group=int(lc.roll_group),
                   label_dropout=float(lc.label_dropout),
                   accum_steps=int(config.optim.grad_accum_steps),
                   accum_scale=optim.accumulation_scale(config.optim),
                   compute_dtype=families.parse_dtype(config.train.compute_dtype),
                   token_metrics=bool(config.train.get("token_metrics", True)),
                   loss_scale=loss_scale_lib.from_config(config.train))


# ================================================================================ the objective

def _interleave(a, b):
    """``[B, ...]``, ``[B, ...]`` -> ``[2B, ...]`` rows a_0, b_0, a_1, b_1, ..."""
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def micro_loss_and_grads(params, ref_params, tokens_BL, labels_B, key, aux, *,
                         family: families.Family, opts: StepOptions,
                         uncond_B: Optional[jax.Array] = None, scale=None):
    """Loss, metrics, gradients and per-sample extras of one micro-batch.

    Returns ``(loss, metrics, grads, extras)``; ``extras`` holds ``policy_logp [B, 2]`` and
    ``ref_logp [B, 2]`` (column 0: positive condition, 1: negative) and the labels fed to the
    models. ``uncond_B`` overrides the drawn TBM mask (parity tests). ``scale`` (float32 scalar,
    a power of two): the loss is differentiated times ``scale`` (float16 loss scaling) and the
    loss and gradients are returned divided by it again.
    """
    k_lab, k_pol, k_ref = jax.random.split(key, 3)
    B, L = tokens_BL.shape
    dtype = opts.compute_dtype
    tokens_BL = tokens_BL.astype(jnp.int32)

    def cast_kernels(p):
        # the layers would cast the kernels anyway; casting first lets FSDP all-gather half the
        # bytes. Kernels the model multiplies in float32 (VAR's word_embed, head_nm) stay float32.
        return matmul.cast_kernels(p, dtype, keep=family.float32_kernels)

    if opts.loss_type == "mle":
        y_B = losses.drop_labels(k_lab, labels_B, rate=opts.label_dropout,
                                 null_label=family.null_label)

        def f(p):
            logits = family.logits(cast_kernels(p), tokens_BL, y_B, train=True, rng=k_pol,
                                   dtype=dtype, aux=aux)
            tok_BL, top1_BL = losses.token_logp_and_top1(logits, tokens_BL)
            logp_B = jnp.sum(tok_BL, axis=-1)
            out = losses.mle_loss(logp_B=logp_B, num_tokens=L)
            m = dict(out.metrics)
            if opts.token_metrics:
                m.update(losses.token_metrics_from(tok_BL, top1_BL, last_l=family.last_l))
            return out.loss, (m, {"policy_logp": logp_B[:, None], "pos_labels": y_B})

        (loss, (m, extras)), g = _value_and_grad(f, params, scale)
        return loss, m, g, extras

    lab = losses.build_cca_labels(labels_B, null_label=family.null_label, rng=k_lab,
                                  uncond_ratio=opts.uncond_ratio, mask_B=uncond_B,
                                  negatives=opts.negatives, roll_group=opts.roll_group)
    tokens2 = _interleave(tokens_BL, tokens_BL)
    labels2 = _interleave(lab.pos_B, lab.neg_B)
    ref_logits = family.logits(cast_kernels(ref_params), tokens2, labels2, train=True,
                               rng=k_ref, dtype=dtype, aux=aux)
    ref_logp = jax.lax.stop_gradient(losses.sequence_logp(ref_logits, tokens2)).reshape(B, 2)
    del ref_logits

    def f(p):
        logits = family.logits(cast_kernels(p), tokens2, labels2, train=True, rng=k_pol,
                               dtype=dtype, aux=aux)
        tok_2BL, top1_2BL = losses.token_logp_and_top1(logits, tokens2)
        logp = jnp.sum(tok_2BL, axis=-1).reshape(B, 2)
        out = losses.cca_loss(
            policy_pos_B=logp[:, 0], policy_neg_B=logp[:, 1], ref_pos_B=ref_logp[:, 0],
            ref_neg_B=ref_logp[:, 1], pos_labels_B=lab.pos_B, neg_labels_B=lab.neg_B,
            uncond_B=lab.uncond_B, loss_type=opts.loss_type, beta=opts.beta,
            lambda_=opts.lambda_, uncond_ratio=opts.uncond_ratio,
            uncond_zero_form=opts.uncond_zero_form, num_tokens=L)
        m = dict(out.metrics)
        if opts.token_metrics:  # positive-condition rows are the even ones
            m.update(losses.token_metrics_from(tok_2BL[0::2], top1_2BL[0::2],
                                               last_l=family.last_l))
        extras = {"policy_logp": logp, "ref_logp": ref_logp, "pos_labels": lab.pos_B,
                  "neg_labels": lab.neg_B, "neg_weight": out.neg_weight_B,
                  "mixed_weight": out.mixed_weight_B}
        return out.loss, (m, extras)

    (loss, (m, extras)), g = _value_and_grad(f, params, scale)
    return loss, m, g, extras


def _value_and_grad(f, params, scale):
    """``jax.value_and_grad(f, has_aux=True)(params)``; with a loss ``scale``, of ``scale · loss``
    with the gradients divided by ``scale`` again (exact for a power of two)."""
    if scale is None:
        return jax.value_and_grad(f, has_aux=True)(params)

    def scaled(p):
        loss, aux = f(p)
        return loss * scale, (loss, aux)

    (_, (loss, aux)), g = jax.value_and_grad(scaled, has_aux=True)(params)
    return (loss, aux), jax.tree_util.tree_map(lambda x: x / scale, g)


def _combine_metrics(ms: dict) -> dict:
    """Means over micro-batches (leading axis); uncond_reward weighted by TBM row counts."""
    out = {k: jnp.mean(v) for k, v in ms.items() if k not in ("uncond_reward", "uncond_count")}
    if "uncond_reward" in ms:
        n = ms["uncond_count"]
        tot = jnp.sum(jnp.where(n > 0, ms["uncond_reward"] * n, 0.0))
        out["uncond_reward"] = tot / jnp.sum(n)  # NaN when no row of the step was masked
        out["uncond_count"] = jnp.sum(n)
    return out


def make_train_step(family: families.Family, tx: optax.GradientTransformation,
                    schedules: optim.Schedules, opts: StepOptions, *,
                    param_shardings: Any = None) -> Callable:
    """``step(state, ref_params, batch, aux) -> (state, metrics)`` (not jitted; see Trainer).

    ``batch``: ``tokens [B, L]``, ``labels [B]`` and optionally ``uncond_mask [B]`` (fixed TBM).
    """
    A = opts.accum_steps

    def constrain(tree):
        if param_shardings is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, param_shardings)

    def step(state: TrainState, ref_params, batch, aux):
        key = jax.random.fold_in(state.rng, state.step)
        tokens, labels = batch["tokens"], batch["labels"].astype(jnp.int32)
        uncond = batch.get("uncond_mask")
        B = tokens.shape[0]
        scale = None if opts.loss_scale is None else state.loss_scale.scale
        run = functools.partial(micro_loss_and_grads, family=family, opts=opts, scale=scale)
        if A == 1:
            loss, metrics, grads, _ = run(state.params, ref_params, tokens, labels,
                                          jax.random.fold_in(key, 0), aux, uncond_B=uncond)
            metrics = _combine_metrics(jax.tree_util.tree_map(lambda x: x[None], metrics))
        else:
            def split(x):
                x = x.reshape((B // A, A) + x.shape[1:]).swapaxes(0, 1)
                spec = P(None, BATCH_AXES, *([None] * (x.ndim - 2)))
                return jax.lax.with_sharding_constraint(x, spec) if param_shardings is not None else x

            xs = {"tokens": split(tokens), "labels": split(labels), "j": jnp.arange(A)}
            if uncond is not None:
                xs["uncond"] = split(uncond)

            def body(gsum, x):
                loss_j, m_j, g_j, _ = run(state.params, ref_params, x["tokens"], x["labels"],
                                          jax.random.fold_in(key, x["j"]), aux,
                                          uncond_B=x.get("uncond"))
                return constrain(jax.tree_util.tree_map(jnp.add, gsum, g_j)), (loss_j, m_j)

            g0 = constrain(jax.tree_util.tree_map(jnp.zeros_like, state.params))
            grads, (loss_j, ms) = jax.lax.scan(body, g0, xs)
            loss = jnp.mean(loss_j)
            metrics = _combine_metrics(ms)
        if opts.accum_scale != 1.0:
            grads = jax.tree_util.tree_map(lambda g: g * opts.accum_scale, grads)
        grads = constrain(grads)
        grad_norm = optim.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
            lambda n, o: jnp.where(finite, n, o), new, old)
        new_scale = (None if opts.loss_scale is None else
                     loss_scale_lib.update(state.loss_scale, finite, opts.loss_scale))
        new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                               opt_state=optim.advance_schedules(keep(new_opt, state.opt_state),
                                                                 new_opt),
                               rng=state.rng, loss_scale=new_scale)
        metrics.update(loss=loss, grad_norm=grad_norm, lr=schedules.lr(state.step),
                       weight_decay=schedules.wd(state.step), finite=finite.astype(jnp.float32))
        if scale is not None:
            metrics["loss_scale"] = scale
        return new_state, metrics

    return step


# ================================================================================== the trainer

def _replicated(mesh):
    return NamedSharding(mesh, P())


def to_global(host_tree: Any, shardings: Any) -> Any:
    """Host numpy pytree (the same full value on every process) -> global jax arrays."""
    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.tree_util.tree_map(put, host_tree, shardings)


class Trainer:
    """Everything static about a run: family, mesh, optimizer, shardings and the jitted step."""

    def __init__(self, config, *, total_steps: int, mesh=None, family: families.Family = None,
                 devices=None):
        self.config = config
        self.family = family or families.from_config(config)
        self.mesh = mesh or sharding.make_mesh(dict(config.mesh), devices=devices)
        self.opts = StepOptions.from_config(config)
        self.total_steps = int(total_steps)
        self._check_batch()
        boxed = self.family.abstract_params()
        self.abstract_params = nn.meta.unbox(boxed)
        self.param_shardings = sharding.boxed_shardings(boxed, self.mesh)
        mask = self.family.decay_mask(self.abstract_params, config.optim.decay_rule)
        self.tx, self.schedules = optim.make_optimizer(config.optim, decay_mask=mask,
                                                       total_steps=self.total_steps)
        repl = _replicated(self.mesh)
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, abstract_opt, self.param_shardings,
            transform_non_params=lambda _: repl)
        self.state_shardings = TrainState(
            step=repl, params=self.param_shardings, opt_state=opt_shardings, rng=repl,
            loss_scale=(None if self.opts.loss_scale is None else loss_scale_lib.replicated(repl)))
        self.ref_dtype = families.parse_dtype(config.train.reference_dtype,
                                              "config.train.reference_dtype")
        self.batch_shardings = {"tokens": sharding.batch_sharding(self.mesh, 2),
                                "labels": sharding.batch_sharding(self.mesh, 1)}
        step = make_train_step(self.family, self.tx, self.schedules, self.opts,
                               param_shardings=self.param_shardings)

        def jitted(state, ref_params, batch, aux):
            with sharding.logical_rules():  # the caller traces under use_mesh (rules + mesh)
                return step(state, ref_params, batch, aux)

        self._step = jax.jit(jitted, out_shardings=(self.state_shardings, repl),
                             donate_argnums=(0,))
        self._jits: dict = {}  # init / reference programs, compiled once per Trainer

    # ---- checks -----------------------------------------------------------------------------
    def _check_batch(self):
        B = int(self.config.train.global_batch_size)
        A = self.opts.accum_steps
        n = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if B % (A * n):
            raise ValueError(
                f"config.train.global_batch_size={B} must be a multiple of grad_accum_steps ({A}) "
                f"x batch shards (mesh data*fsdp = {n}); change the batch size, "
                "config.optim.grad_accum_steps or config.mesh.")
        o = self.opts
        uses_null = o.label_dropout > 0 if o.loss_type == "mle" else o.uncond_ratio > 0
        if uses_null and not getattr(self.family.model_cfg, "has_null_class", True):
            field = "label_dropout" if o.loss_type == "mle" else "uncond_ratio"
            raise ValueError(
                f"config.loss.{field}={getattr(o, field)} feeds the null class, but this model's class "
                "table has no null row (LlamaGen keeps it only when config.model.class_dropout_prob "
                f"> 0). Set config.model.class_dropout_prob > 0 (the official checkpoints have the "
                f"row) or config.loss.{field}=0.")
        if self.opts.negatives == "group_roll" and (B // A) % self.opts.roll_group:
            raise ValueError(f"config.loss.roll_group={self.opts.roll_group} must divide the "
                             f"micro-batch of {B // A} rows (global_batch_size / grad_accum_steps).")

    # ---- state --------------------------------------------------------------------------------
    def abstract_state(self) -> TrainState:
        opt = jax.eval_shape(self.tx.init, self.abstract_params)
        return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params,
                          opt_state=opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
                          loss_scale=(None if self.opts.loss_scale is None else
                                      loss_scale_lib.abstract()))

    def init_state(self, params=None, *, seed: int = 0, with_reference: bool = False):
        """Fresh ``(state, reference)`` from ``params`` (global arrays or host numpy), or from the
        official init with ``seed`` when ``params`` is None (one compiled program for both).

        The reference is a separate copy in ``config.train.reference_dtype`` (None unless
        ``with_reference``): the state is donated to the step, the reference never is.
        """
        if params is not None and not all(isinstance(x, jax.Array)
                                           for x in jax.tree_util.tree_leaves(params)):
            params = to_global(params, self.param_shardings)
        key = ("init", with_reference)
        if key not in self._jits:
            dt = self.ref_dtype

            def make(p, seed_):
                if p is None:
                    p = sharding.strip_boxes(self.family.init_boxed(jax.random.key(seed_)))
                state = TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                   opt_state=self.tx.init(p),
                                   rng=jax.random.PRNGKey(seed_ + 1),
                                   loss_scale=(None if self.opts.loss_scale is None else
                                               loss_scale_lib.init(self.opts.loss_scale)))
                ref = (jax.tree_util.tree_map(lambda x: jnp.array(x, dt, copy=True), p)
                       if with_reference else None)
                return state, ref

            out_sh = (self.state_shardings, self.param_shardings if with_reference else None)
            self._jits[key] = jax.jit(make, out_shardings=out_sh)
        with sharding.use_mesh(self.mesh):
            return self._jits[key](params, jnp.int32(seed))

    def reference_params(self, params=None, *, seed: int = 0) -> Any:
        """Only the reference copy: of host ``params``, or of the official init with ``seed``."""
        dt = self.ref_dtype
        if params is not None:
            params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dt), params)
            return to_global(params, self.param_shardings)
        if "ref" not in self._jits:
            def make(seed_):
                p = sharding.strip_boxes(self.family.init_boxed(jax.random.key(seed_)))
                return jax.tree_util.tree_map(lambda x: x.astype(dt), p)

            self._jits["ref"] = jax.jit(make, out_shardings=self.param_shardings)
        with sharding.use_mesh(self.mesh):
            return self._jits["ref"](jnp.int32(seed))

    def aux_global(self, aux) -> Any:
        if aux is None:
            return None
        return to_global(jax.tree_util.tree_map(np.asarray, aux),
                         jax.tree_util.tree_map(lambda _: _replicated(self.mesh), aux))

    # ---- batches ------------------------------------------------------------------------------
    def local_rows(self) -> np.ndarray:
        return process_rows(self.mesh, int(self.config.train.global_batch_size))

    def global_batch(self, local: dict) -> dict:
        """Process-local numpy rows -> global arrays sharded over ``data × fsdp``."""
        B = int(self.config.train.global_batch_size)
        out = {}
        for k, x in local.items():
            x = np.asarray(x)
            s = self.batch_shardings.get(k) or sharding.batch_sharding(self.mesh, x.ndim)
            out[k] = jax.make_array_from_process_local_data(s, x, (B,) + x.shape[1:])
        return out

    # ---- the step -------------------------------------------------------------------------------
    def step(self, state: TrainState, ref_params, batch: dict, aux=None):
        with sharding.use_mesh(self.mesh):
            return self._step(state, ref_params, batch, aux)


# ================================================================================== data sources

def process_rows(mesh, global_batch: int) -> np.ndarray:
    """Sorted indices of the global-batch rows this process feeds: those its devices hold under
    the batch sharding (what ``jax.make_array_from_process_local_data`` expects, in order)."""
    idx = sharding.batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch,))
    rows = set()
    for sl in idx.values():
        rows.update(range(*sl[0].indices(global_batch)))
    return np.asarray(sorted(rows), np.int64)


class SyntheticData:
    """Random tokens/labels for smoke runs (``config.data.source = "synthetic"``).

    Batch ``k`` is a pure function of (seed, k), so the position is just ``k`` and any process
    count yields the same global batches; each process returns only its ``rows``.
    """

    def __init__(self, *, global_batch: int, num_tokens: int, vocab_size: int, num_classes: int,
                 seed: int, rows, size: int):
        self.B, self.L, self.V, self.C = global_batch, num_tokens, vocab_size, num_classes
        self.seed, self.rows, self.size, self.position = seed, rows, size, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        g = np.random.default_rng([self.seed, self.position])
        labels = g.integers(0, self.C, size=(self.B,), dtype=np.int32)
        # tokens correlated with the label so that a model can learn something
        base = (labels[:, None] * 7 + np.arange(self.L)[None]) % self.V
        noise = g.integers(0, self.V, size=(self.B, self.L))
        keep = g.random((self.B, self.L)) < 0.5
        tokens = np.where(keep, base, noise).astype(np.int32)
        self.position += 1
        return {"tokens": tokens[self.rows], "labels": labels[self.rows]}

    def state(self) -> dict:
        return {"source": "synthetic", "position": self.position}

    def restore(self, state: dict) -> None:
        if state:
            self.position = int(state.get("position", 0))


def check_tokenizer_matches_data(config, data) -> None:
    """VAR builds its teacher-forcing inputs with the VQVAE of ``config.init.tokenizer_checkpoint``,
    so it must be the one that tokenized the shards (their metadata records its checksum); a
    different one would train silently on wrong inputs. ``config.data.tokenizer_checksum``, when
    set, is checked by the reader instead."""
    meta = getattr(getattr(data, "store", None), "meta", None) or {}
    want = (meta.get("tokenizer") or {}).get("checksum")
    path = config.init.get("tokenizer_checkpoint", "")
    if config.model.family != "var" or not want or not path or config.data.get("tokenizer_checksum"):
        return
    from cca_jax.convert import vqvae as vq_conv
    from cca_jax.data.reader import MetadataMismatchError
    from cca_jax.models import vq16, vqvae
    have = vq16.params_checksum(vq_conv.load_checkpoint(path, vqvae.VQVAEConfig.from_config(
        config.tokenizer)))
    if have != want:
        raise MetadataMismatchError(
            f"config.init.tokenizer_checkpoint={path!r} (checksum {have[:12]}…) is not the VQVAE that "
            f"tokenized {config.data.path} (checksum {want[:12]}…, "
            f"{(meta.get('tokenizer') or {}).get('config', {}).get('checkpoint', '?')}): VAR's "
            "teacher-forcing inputs would be wrong. Point it at the tokenizer of the shards.")


def make_data(config, family: families.Family, mesh):
    """The process-local batch iterator of ``config.data.source`` (``state()``/``restore()``)."""
    src = config.data.source
    rows = process_rows(mesh, int(config.train.global_batch_size))
    if src == "synthetic":
        return SyntheticData(global_batch=int(config.train.global_batch_size),
                             num_tokens=family.num_tokens, vocab_size=family.vocab_size,
                             num_classes=family.num_classes, seed=int(config.data.shuffle_seed),
                             rows=rows, size=int(config.data.synthetic_size))
    if src == "shards":
        if not config.data.path:
            raise ValueError("config.data.source='shards' needs config.data.path (the token shard "
                             "directory written by the tokenize job), or use "
                             "--config.data.source=synthetic for a smoke run.")
        return _shard_reader(config, family, rows)
    raise ValueError(f"config.data.source={src!r}; expected 'shards' or 'synthetic'.")


def _shard_reader(config, family, rows):
    """Adapter over cca_jax.data (the shard reader): process-local numpy batches."""
    from cca_jax import data as data_lib

    make = getattr(data_lib, "make_train_iterator", None)
    if make is None:
        raise NotImplementedError("cca_jax.data has no make_train_iterator(); the token-shard "
                                  "reader is not available in this build.")
    return make(config, family=family, rows=rows)


def dataset_size(config, data) -> Optional[int]:
    if hasattr(data, "size"):
        return int(data.size)
    if hasattr(data, "num_examples"):
        return int(data.num_examples)
    return None


def resolve_num_steps(config, data) -> int:
    n = int(config.train.num_steps)
    if n > 0:
        return n
    size = dataset_size(config, data)
    if not size:
        raise ValueError("config.train.num_steps < 0 needs a dataset size; set train.num_steps.")
    return max(1, int(math.floor(float(config.train.num_epochs) * size
                                 / int(config.train.global_batch_size))))


# ================================================================================ params sources

def initial_params(config, family: families.Family):
    """Host params the policy starts from (and the reference copies), or None = official init."""
    path = config.init.reference_checkpoint
    if path:
        if not os.path.exists(path) and "://" not in path:
            raise FileNotFoundError(f"config.init.reference_checkpoint={path!r} does not exist; "
                                    "point it at the official .pt/.pth file or an Orbax params dir.")
        return family.load_params(path)
    if config.init.from_scratch or config.loss.type == "mle":
        return None
    if config.data.source == "synthetic":
        logging.warning("No config.init.reference_checkpoint: synthetic smoke run from a random "
                        "official init (policy = reference).")
        return None
    raise ValueError("CCA fine-tuning needs the pretrained model: set "
                     "config.init.reference_checkpoint (official .pt/.pth or Orbax params dir), or "
                     "config.init.from_scratch=True / config.loss.type='mle' to train from scratch.")


# ====================================================================================== the loop

def _host(x):
    x = x if getattr(x, "is_fully_addressable", True) else x.addressable_data(0)
    return np.asarray(jax.device_get(x))


def _console_line(step, total, m, steps_per_sec):
    keys = ("loss", "acc", "reward_margin", "chosen_reward", "rejected_reward", "sft_loss",
            "grad_norm", "lr")
    parts = [f"{k}={m[k]:.4g}" for k in keys if k in m]
    return f"step {step}/{total} | " + " ".join(parts) + f" | {steps_per_sec:.2f} steps/s"


def train_and_evaluate(config, workdir: str, *, devices=None, trainer: Trainer = None) -> dict:
    """Trains per ``config`` in ``workdir`` (resuming its latest checkpoint); returns a summary
    ``{"step", "history": [metrics per step], "evals": [{"step", "eval/<metric>"} per in-training
    evaluation], "state", "trainer", "ref_params"}``.

    ``devices``: the devices of the mesh (default all). ``trainer``: reuse the compiled step of an
    earlier call with the same config, devices and step count (tests, notebooks).
    """
    from clu import metric_writers, periodic_actions

    from cca_jax import checkpoint as ckpt_lib
    from cca_jax.preemption import PreemptionWatcher

    family = trainer.family if trainer else families.from_config(config)
    mesh = trainer.mesh if trainer else sharding.make_mesh(dict(config.mesh), devices=devices)
    data = make_data(config, family, mesh)  # before the Trainer: the step count needs its size
    check_tokenizer_matches_data(config, data)
    total = resolve_num_steps(config, data)
    if trainer is None:
        trainer = Trainer(config, total_steps=total, mesh=mesh, family=family)
    elif trainer.total_steps != total and _schedule_uses_total(config):
        raise ValueError(f"trainer was built for {trainer.total_steps} steps, this run has {total} "
                         "and its LR schedule depends on the run length.")
    is_main = jax.process_index() == 0

    host_params = initial_params(config, family)  # checks the inputs before writing anything
    seed = int(config.seed)
    ckpt = ckpt_lib.CheckpointManager.from_config(config, workdir)
    abstract, shardings = _restorable_state(trainer, ckpt)
    restored = ckpt.restore_latest(abstract, shardings)
    need_ref = config.loss.type != "mle"
    if restored is not None:
        state = _with_own_loss_scale(TrainState.from_tree(restored.state), trainer)
        data.restore(restored.data_state)
        ref_params = trainer.reference_params(host_params, seed=seed) if need_ref else None
        logging.info("Resumed from step %d", restored.step)
        for change in resume_config_changes(restored.metadata, config):
            logging.warning("Resuming with a changed setting: %s", change)
    else:
        state, ref_params = trainer.init_state(host_params, seed=seed, with_reference=need_ref)
    aux = trainer.aux_global(family.make_aux(config, jax.random.key(seed + 2)))

    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    if is_main:
        writer.write_hparams({k: v for k, v in _flat_config(config).items()
                              if k.split(".")[0] in HPARAM_SECTIONS})
    report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer)
    eval_every = int(config.train.get("eval_every", 0))
    eval_hook = make_eval_hook(config, workdir, trainer) if eval_every > 0 else None
    first = int(_host(state.step))
    tokens_per_step = int(config.train.global_batch_size) * family.num_tokens * (
        1 if config.loss.type == "mle" else 2)
    log_every = max(1, int(config.train.log_every))
    history, evals, pending, prev = [], [], [], None
    t_last, steps_since = time.time(), 0
    nonfinite_mode = config.train.nonfinite
    if nonfinite_mode not in ("error", "skip"):
        raise ValueError(f"config.train.nonfinite={nonfinite_mode!r}; expected 'error' or 'skip'.")

    def check(step_metrics, step_no):
        local = {k: v if getattr(v, "is_fully_addressable", True) else v.addressable_data(0)
                 for k, v in step_metrics.items()}
        m = {k: float(v) for k, v in jax.device_get(local).items()}
        if m["finite"] < 1.0 and m.get("loss_scale", 0.0) >= 1.0:
            # float16 overflow under loss scaling: routine, the scaler backs off (torch's too)
            logging.info("Step %d overflowed at loss scale %g: update skipped, scale halved.",
                         step_no, m["loss_scale"])
        elif m["finite"] < 1.0:
            msg = (f"Non-finite loss or gradient at step {step_no} (loss={m['loss']}, "
                   f"grad_norm={m['grad_norm']}"
                   + (f", loss scale {m['loss_scale']:g}" if "loss_scale" in m else "")
                   + "); the update was not applied.")
            if nonfinite_mode == "error":
                raise FloatingPointError(msg + " Lower config.optim.lr / check the data, or set "
                                         "config.train.nonfinite='skip' to skip such steps.")
            logging.warning(msg + " Skipping (config.train.nonfinite='skip').")
        m["step"] = step_no
        history.append(m)
        return m

    try:
        with PreemptionWatcher() as preempt:
            for step_no in range(first + 1, total + 1):
                local = next(data)
                batch = trainer.global_batch(local)
                state, metrics = trainer.step(state, ref_params, batch, aux)
                if prev is not None:  # one step behind, so the host never stalls the device
                    pending.append(check(*prev))
                prev = (metrics, step_no)
                report(step_no)
                steps_since += 1
                stop = preempt.reached(step_no)
                if step_no % log_every == 0 or step_no == total or stop:
                    pending.append(check(*prev))
                    prev = None
                    dt = max(time.time() - t_last, 1e-9)
                    sps = steps_since / dt
                    scalars = _mean_metrics(pending)
                    scalars.update(steps_per_sec=sps, tokens_per_sec=sps * tokens_per_step)
                    if is_main:
                        writer.write_scalars(step_no, scalars)
                        logging.info("%s", _console_line(step_no, total, scalars, sps))
                    pending, t_last, steps_since = [], time.time(), 0
                if eval_hook is not None and step_no % eval_every == 0 and not stop:
                    # (not after a preemption notice: the grace period is for the checkpoint)
                    ev = eval_hook(state.params, step_no)
                    evals.append({"step": step_no, **ev})
                    if is_main:
                        writer.write_scalars(step_no, ev)
                        logging.info("step %d eval: %s", step_no,
                                     " ".join(f"{k}={v:.4g}" for k, v in ev.items()))
                ckpt.save(step_no, state.to_tree(), data_state=data.state(),
                          force=stop or step_no == total)
                if stop:  # wait while SIGTERM is still handled: a second one must not kill the write
                    ckpt.wait_until_finished()
                    logging.info("Preemption notice: saved step %d and stopping.", step_no)
                    break
            if prev is not None:
                check(*prev)
    finally:  # also on errors: finish pending checkpoint writes, stop the data threads
        ckpt.close()
        writer.flush()
        if hasattr(data, "close"):
            data.close()
    return {"step": int(_host(state.step)), "history": history, "evals": evals, "state": state,
            "trainer": trainer, "ref_params": ref_params}


def _restorable_state(trainer: Trainer, ckpt) -> tuple[dict, dict]:
    """The abstract train state (and shardings) to restore the newest checkpoint into: this run's,
    with the float16 loss scale added or left out as the checkpoint has it, so that a run can
    resume in another precision (see :func:`_with_own_loss_scale`)."""
    abstract = trainer.abstract_state().to_tree()
    shardings = trainer.state_shardings.to_tree()
    step = ckpt.latest_step()
    if step is None:
        return abstract, shardings
    saved = "loss_scale" in ckpt.saved_state_keys(step)
    if saved and "loss_scale" not in abstract:
        abstract["loss_scale"] = flax.serialization.to_state_dict(loss_scale_lib.abstract())
        shardings["loss_scale"] = flax.serialization.to_state_dict(
            loss_scale_lib.replicated(_replicated(trainer.mesh)))
    elif not saved:
        abstract.pop("loss_scale", None)
        shardings.pop("loss_scale", None)
    return abstract, shardings


def _with_own_loss_scale(state: TrainState, trainer: Trainer) -> TrainState:
    """A restored state with this run's loss scaling: dropped when the run has none, started
    afresh when the checkpoint (written without float16 scaling) had none."""
    opts = trainer.opts.loss_scale
    if opts is None:
        return state.replace(loss_scale=None)
    if state.loss_scale is None:
        logging.warning("The checkpoint has no float16 loss scale; starting it at %g.", opts.init)
        fresh = jax.device_put(loss_scale_lib.init(opts), _replicated(trainer.mesh))
        return state.replace(loss_scale=fresh)
    return state


def make_eval_hook(config, workdir: str, trainer: Trainer) -> Callable:
    """``hook(params, step) -> {'eval/<metric>': value}``: small-N FID (``config.eval.train_*``)
    of images sampled from the current policy with the family's sampler and
    ``config.sample`` settings, every ``config.train.eval_every`` steps (evaluate.py)."""
    from cca_jax import evaluate
    from cca_jax.sampling import job as sample_job

    # only the tokenizer and the sampling function: the params are the policy's at each eval
    sampler = sample_job.make_sampler(config, workdir, with_params=False)
    mesh = trainer.mesh
    rows = int(config.sample.batch_size) * int(mesh.devices.size)
    n_cls = int(sampler.num_classes)
    with sharding.use_mesh(mesh):
        tok = jax.device_put(sampler.tokenizer_params, _replicated(mesh))

    def sample(params, tok_params, key):
        labels = jax.random.randint(jax.random.fold_in(key, 7), (rows,), 0, n_cls)
        return sampler.generate(params, tok_params, labels, key), labels

    gen = jax.jit(sample, out_shardings=(sharding.batch_sharding(mesh, 4),
                                         sharding.batch_sharding(mesh, 1)))

    def sample_fn(params, key):
        with sharding.use_mesh(mesh):
            return gen(params, tok, key)

    return evaluate.make_train_eval_hook(config, workdir, sample_fn, mesh=mesh)


def _schedule_uses_total(config) -> bool:
    """Whether the LR/WD schedule depends on the run length (see optim.make_schedules)."""
    o = config.optim
    wd_anneals = 0.0 <= float(o.weight_decay_end) != float(o.weight_decay)
    varies = o.schedule != "constant" or wd_anneals
    return varies and float(o.get("schedule_steps", -1.0)) <= 0


def _mean_metrics(rows: list[dict]) -> dict:
    out = {}
    for k in rows[0] if rows else ():
        if k == "step":
            continue
        vals = np.asarray([r[k] for r in rows], np.float64)
        out[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return out


# what the run's numbers depend on: a change there on resume is worth a warning
RESUME_CHECKED = ("model.", "loss.", "optim.", "init.reference_checkpoint", "data.path", "seed")


def resume_config_changes(saved: dict | None, config) -> list[str]:
    """``"<field>: <saved> -> <now>"`` for every model/loss/optim field, reference checkpoint,
    data path or seed that differs from the config snapshot of the checkpoint being resumed."""
    if not saved:
        return []
    before = _flat_config(saved)
    now = _flat_config(config)
    keys = sorted(k for k in set(before) | set(now) if k.startswith(RESUME_CHECKED))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


def _flat_config(config) -> dict:
    flat = {}

    def walk(prefix, d):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            elif isinstance(v, (int, float, str, bool)):
                flat[key] = v

    walk("", config.to_dict() if hasattr(config, "to_dict") else dict(config))
    return flat


def run(config, workdir: str) -> None:
    """``job=train`` entry point (cca_jax/main.py)."""
    train_and_evaluate(config, workdir)
