"""Dynamic loss scaling for float16 compute: ``torch.cuda.amp.GradScaler`` as VAR's trainer runs it.

Float16 has 5 exponent bits: an activation gradient below about 6e-8 flushes to zero and one
above 65504 overflows. VAR's CCA recipe trains under fp16 autocast (``--fp16=1``, cca.md §6.3)
with a GradScaler: the loss is multiplied by a power of two ``s`` before the backward pass, the
float32 gradients are divided by ``s`` again before clipping, and

* a step whose loss or gradients are not finite applies no update and halves ``s``;
* after ``growth_interval`` (1000) finite steps in a row ``s`` doubles;
* ``cap`` (VAR: 2^15): when the scale used for a step is above it, the next scale is ``cap``
  instead of the rule above (VAR calls ``scaler.update(new_scale=32768)``; the count of finite
  steps is left as it is).

Scaling by a power of two is exact, so a step that stays finite computes the same update as
without scaling, except for the gradients float16 would have flushed to zero. bfloat16 has
float32's exponent range and needs none of this (``config.train.loss_scale = "auto"`` turns it
on for ``compute_dtype = "float16"`` only).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax
import jax
import jax.numpy as jnp

MODES = ("auto", "dynamic", "none")


@flax.struct.dataclass
class LossScaleState:
    scale: jax.Array  # float32 scalar: the multiplier of the next step's loss
    good_steps: jax.Array  # int32 scalar: finite steps since the scale last grew or backed off


@dataclasses.dataclass(frozen=True)
class LossScaleOptions:
    init: float = 2.0 ** 11
    growth_interval: int = 1000
    growth: float = 2.0
    backoff: float = 0.5
    cap: float = 0.0  # > 0: a step run at a scale above it resets the scale to it


def from_config(train_config) -> Optional[LossScaleOptions]:
    """``config.train`` → options, or None when the run does not scale its loss."""
    mode = train_config.get("loss_scale", "auto")
    if mode not in MODES:
        raise ValueError(f"config.train.loss_scale={mode!r}; expected one of {MODES} (auto: "
                         "dynamic loss scaling when config.train.compute_dtype is float16).")
    enabled = mode == "dynamic" or (mode == "auto" and train_config.compute_dtype == "float16")
    if not enabled:
        return None
    get = train_config.get
    opts = LossScaleOptions(init=float(get("loss_scale_init", 2.0 ** 11)),
                            growth_interval=int(get("loss_scale_growth_interval", 1000)),
                            cap=float(get("loss_scale_cap", 0.0)))
    if not opts.init > 0 or opts.growth_interval < 1 or opts.cap < 0:
        raise ValueError(f"config.train.loss_scale_init={opts.init}, loss_scale_growth_interval="
                         f"{opts.growth_interval}, loss_scale_cap={opts.cap}: need init > 0, "
                         "interval >= 1 and cap >= 0 (0: no cap).")
    return opts


def init(opts: LossScaleOptions) -> LossScaleState:
    return LossScaleState(scale=jnp.float32(opts.init), good_steps=jnp.int32(0))


def abstract() -> LossScaleState:
    return LossScaleState(scale=jax.ShapeDtypeStruct((), jnp.float32),
                          good_steps=jax.ShapeDtypeStruct((), jnp.int32))


def replicated(sharding) -> LossScaleState:
    """The state's shardings: ``sharding`` (replicated) for both scalars."""
    return LossScaleState(scale=sharding, good_steps=sharding)


def update(state: LossScaleState, finite: jax.Array, opts: LossScaleOptions) -> LossScaleState:
    """The scale and count after a step run at ``state.scale`` (``finite``: bool scalar)."""
    good = state.good_steps + 1
    grow = finite & (good >= opts.growth_interval)
    scale = jnp.where(finite, jnp.where(grow, state.scale * opts.growth, state.scale),
                      state.scale * opts.backoff)
    good = jnp.where(finite & ~grow, good, 0)
    if opts.cap > 0:
        capped = state.scale > opts.cap
        scale = jnp.where(capped, jnp.float32(opts.cap), scale)
        good = jnp.where(capped, state.good_steps, good)
    return LossScaleState(scale=scale.astype(jnp.float32), good_steps=good.astype(jnp.int32))
