"""AdamW as the official CCA recipes use it (spec cca.md §5.4, §6.3-§6.5).

    tx = chain(clip_by_global_norm_torch(clip), scale_by_adam(b1, b2, eps),
               add_decayed_weights(wd(step), mask), scale(-lr(step)))

which is torch's ``AdamW`` (decoupled decay ``p ← p − lr·wd·p``) after
``torch.nn.utils.clip_grad_norm_``. Gradient accumulation is not an optax wrapper: the train
step sums the micro-step gradients itself inside one jitted step (``lax.scan``) and passes

* ``accum="sum"`` (LlamaGen): the *sum* of micro-step mean gradients — so the clip threshold acts
  on ``accum ×`` the mean gradient, exactly the official update (cca.md §5.3);
* ``accum="mean"`` (VAR, and the default in configs/common.py): their mean (cca.md §6.3).

Schedules are functions of the optimizer step ``k`` (0-based). ``var_lin0`` evaluates VAR's
per-micro-iteration ``lr_wd_annealing`` at the last micro-iteration of the step,
``g = (k+1)·accum − 1``, because the official optimizer step uses the LR/WD set there.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

# VAR's filter_params: names containing any of these never decay (VAR_finetune.py nowd_keys)
VAR_NOWD_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC",
                 "pos_start", "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias",
                 "scale_mul")
DECAY_RULES = ("ndim", "var")
SCHEDULES = ("constant", "var_lin0")
ACCUM_MODES = ("sum", "mean")


# --------------------------------------------------------------------------- weight-decay masks
def ndim_decay(ndim: int) -> bool:
    """LlamaGen ``creat_optimizer``: every parameter with >= 2 dims decays (norm weights don't)."""
    return ndim >= 2


def var_decay(name: str, ndim: int) -> bool:
    """VAR ``filter_params``: official state-dict key ``name`` of an ``ndim``-D tensor decays?"""
    return not (ndim == 1 or name.endswith("bias") or any(k in name for k in VAR_NOWD_KEYS))


def ndim_decay_mask(params: Any) -> Any:
    """Pytree of bools like ``params``: True where the leaf has >= 2 dims."""
    return jax.tree_util.tree_map(lambda p: ndim_decay(len(p.shape)), params)


# --------------------------------------------------------------------------------- schedules
class Schedules(NamedTuple):
    lr: Callable[[jax.Array], jax.Array]  # optimizer step -> learning rate
    wd: Callable[[jax.Array], jax.Array]  # optimizer step -> weight decay coefficient


def var_lr_ratio(g, *, wp_it: float, max_it: float, wp0: float, wpe: float):
    """VAR ``lr_wd_annealing(sche='lin0')`` LR ratio at micro-iteration ``g`` (jnp or float)."""
    wp_it = round(wp_it)
    g = jnp.asarray(g, jnp.float32)
    warm = wp0 + (1.0 - wp0) * g / max(wp_it, 1)
    span = max(max_it - 1 - wp_it, 1e-12)
    pasd = (g - wp_it) / span
    rest = (max_it - 1 - g) / span  # 1 - pasd without float32 cancellation near the end
    decay = jnp.where(pasd < 0.05, 1.0, wpe + (1.0 - wpe) * rest / 0.95)
    return jnp.where(g < wp_it, warm, decay)


def var_wd(g, *, max_it: float, wd: float, wd_end: float):
    """VAR's cosine weight-decay annealing from ``wd`` to ``wd_end`` over ``max_it`` iterations."""
    g = jnp.asarray(g, jnp.float32)
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * jnp.cos(math.pi * g / max(max_it - 1, 1e-12)))


def make_schedules(optim_cfg, *, total_steps: float) -> Schedules:
    """LR / WD schedules from ``config.optim`` (fields documented in configs/common.py).

    ``total_steps``: optimizer steps of the run (``optim.schedule_steps`` overrides it, and may be
    fractional to reproduce VAR's ``max_it`` micro-iterations exactly).
    """
    lr = float(optim_cfg.lr)
    wd = float(optim_cfg.weight_decay)
    wd_end = float(optim_cfg.weight_decay_end)
    if wd_end < 0:
        wd_end = wd
    accum = int(optim_cfg.grad_accum_steps)
    kind = optim_cfg.schedule
    if kind == "constant":
        const_lr = lambda k: jnp.full((), lr, jnp.float32)
        if wd_end == wd:
            return Schedules(const_lr, lambda k: jnp.full((), wd, jnp.float32))
    elif kind != "var_lin0":
        raise ValueError(f"config.optim.schedule={kind!r}; expected one of {SCHEDULES}.")
    sched_steps = float(optim_cfg.get("schedule_steps", -1.0))
    if sched_steps <= 0:
        sched_steps = float(total_steps)
    max_it = sched_steps * accum
    wp_it = float(optim_cfg.warmup_steps) * accum

    def micro_it(k):
        return (jnp.asarray(k, jnp.float32) + 1.0) * accum - 1.0

    def lr_fn(k):
        if kind == "constant":
            return jnp.full((), lr, jnp.float32)
        return lr * var_lr_ratio(micro_it(k), wp_it=wp_it, max_it=max_it,
                                 wp0=float(optim_cfg.warmup_start), wpe=float(optim_cfg.end_ratio))

    def wd_fn(k):
        return var_wd(micro_it(k), max_it=max_it, wd=wd, wd_end=wd_end)

    return Schedules(lr_fn, wd_fn)


# ----------------------------------------------------------------------------- transforms
def global_norm(tree: Any) -> jax.Array:
    """float32 L2 norm over all leaves."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: scale by ``min(1, max_norm / (norm + 1e-6))``."""

    def update(updates, state, params=None):
        del params
        if max_norm <= 0:
            return updates, state
        coef = jnp.minimum(1.0, max_norm / (global_norm(updates) + 1e-6))
        return jax.tree_util.tree_map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class ScheduleState(NamedTuple):
    count: jax.Array  # int32 optimizer steps applied so far


def advance_schedules(kept_state: Any, new_state: Any) -> Any:
    """``kept_state`` (the optimizer state of a skipped update) with the schedule counters of
    ``new_state``: a skipped step leaves Adam's moments and bias correction alone, but the LR and
    weight-decay schedules keep following the train step (as the official loops set the LR per
    iteration whatever happens), so the applied LR stays the logged one."""
    is_sched = lambda x: isinstance(x, ScheduleState)  # noqa: E731
    return jax.tree_util.tree_map(lambda k, n: n if is_sched(k) else k, kept_state, new_state,
                                  is_leaf=is_sched)


def _scheduled(fn_of_count_and_updates) -> optax.GradientTransformation:
    def init(params):
        del params
        return ScheduleState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        new = fn_of_count_and_updates(state.count, updates, params)
        return new, ScheduleState(count=state.count + 1)

    return optax.GradientTransformation(init, update)


def decoupled_weight_decay(wd_fn: Callable, mask: Any) -> optax.GradientTransformation:
    """Adds ``wd(step) · p`` to the update where ``mask`` is True (AdamW's decoupled decay)."""

    def fn(count, updates, params):
        if params is None:
            raise ValueError("decoupled_weight_decay needs params in tx.update(...).")
        wd = wd_fn(count)
        return jax.tree_util.tree_map(
            lambda u, p, m: (u + wd * p.astype(u.dtype)) if m else u, updates, params, mask)

    return _scheduled(fn)


def scale_by_schedule_lr(lr_fn: Callable) -> optax.GradientTransformation:
    def fn(count, updates, params):
        del params
        lr = lr_fn(count)
        return jax.tree_util.tree_map(lambda u: (-lr * u).astype(u.dtype), updates)

    return _scheduled(fn)


def make_optimizer(optim_cfg, *, decay_mask: Any, total_steps: float) -> tuple[
        optax.GradientTransformation, Schedules]:
    """The official AdamW (+ clip) from ``config.optim``; returns ``(tx, schedules)``.

    ``decay_mask``: pytree of Python bools shaped like the params (see ``ndim_decay_mask`` and
    ``families.Family.decay_mask``).
    """
    if optim_cfg.accum not in ACCUM_MODES:
        raise ValueError(f"config.optim.accum={optim_cfg.accum!r}; expected one of {ACCUM_MODES}.")
    if int(optim_cfg.grad_accum_steps) < 1:
        raise ValueError(f"config.optim.grad_accum_steps={optim_cfg.grad_accum_steps} must be >= 1.")
    sched = make_schedules(optim_cfg, total_steps=total_steps)
    tx = optax.chain(
        clip_by_global_norm_torch(float(optim_cfg.grad_clip)),
        optax.scale_by_adam(b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps)),
        decoupled_weight_decay(sched.wd, decay_mask),
        scale_by_schedule_lr(sched.lr),
    )
    return tx, sched


def accumulation_scale(optim_cfg) -> float:
    """Factor applied to the SUM of the ``A = grad_accum_steps`` micro-step gradients before the
    optimizer: ``1/A`` for ``accum="mean"``; ``sum_steps/A`` for ``"sum"``.

    The official LlamaGen step sums 16 micro-step gradients, i.e. clips and applies 16 × the mean
    gradient. ``A`` is a memory knob here (another topology or micro-batch changes it), so ``sum``
    keeps the official scale through ``optim.sum_steps`` (16 in the LlamaGen recipes; 0 = ``A``).
    """
    n = int(optim_cfg.grad_accum_steps)
    if optim_cfg.accum != "sum":
        return 1.0 / n
    sum_steps = int(optim_cfg.get("sum_steps", 0))
    if sum_steps < 0:
        raise ValueError(f"config.optim.sum_steps={sum_steps} must be >= 0 (0: grad_accum_steps).")
    return (sum_steps or n) / n
