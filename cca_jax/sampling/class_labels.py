"""Class labels for the samplers: the official ``label_B`` forms, checked before they reach a
jitted embedding lookup (which would clamp an out-of-range label silently).

Labels ``0 .. num_classes - 1`` are classes; ``num_classes`` is the null (unconditional) class
where the model has that row.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

Labels = Union[None, int, np.ndarray, jax.Array]


def resolve(label_B: Labels, rng: jax.Array, *, num_classes: int, batch: Optional[int] = None,
            allow_null: bool = True) -> tuple[jax.Array, jax.Array]:
    """``(labels [B] int32, rng)`` from VAR's ``autoregressive_infer_cfg`` label forms.

    None: ``batch`` labels drawn uniformly from ``[0, num_classes)`` (with replacement, as the
      official multinomial) with a key split off ``rng``; the returned ``rng`` is the other half.
    int: that class for all ``batch`` rows; a negative int means the null class ``num_classes``.
    array ``[B]``: as it is (``batch``, if given, must equal ``B``).
    Concrete labels are checked against ``[0, num_classes]`` (``[0, num_classes)`` without a null
    row, ``allow_null=False``); traced ones cannot be and are passed through.
    """
    if label_B is None or isinstance(label_B, (int, np.integer)):
        if batch is None or int(batch) < 1:
            raise ValueError(f"label_B={label_B!r} needs batch=B (a positive number of images), "
                             f"got batch={batch!r}.")
        if label_B is None:
            rng, key = jax.random.split(rng)
            return jax.random.randint(key, (int(batch),), 0, num_classes, jnp.int32), rng
        label = num_classes if int(label_B) < 0 else int(label_B)
        label_B = np.full((int(batch),), label, np.int32)
    if not isinstance(label_B, jax.core.Tracer):
        arr = np.asarray(label_B)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"label_B must be a 1-D integer array [B], got {arr.dtype} "
                             f"{arr.shape}.")
        if batch is not None and arr.shape[0] != int(batch):
            raise ValueError(f"label_B has {arr.shape[0]} labels but batch={batch}.")
        top = num_classes if allow_null else num_classes - 1
        bad = arr[(arr < 0) | (arr > top)]
        if bad.size:
            null = (f"; {num_classes} is the null (unconditional) class" if allow_null
                    else "; this model has no null class row")
            shown = sorted(set(bad.tolist()))[:8]
            raise ValueError(f"label_B has labels outside [0, {top}]: {shown}. "
                             f"Classes are 0..{num_classes - 1}{null}.")
    return jnp.asarray(label_B, jnp.int32), rng
