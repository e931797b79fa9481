"""Metrics of demo samples in the digits classifier's feature space (the eval job's code path).

:func:`evaluate` returns, for uint8 samples ``[N, 8, 8, 3]`` with their conditioning labels:

* ``fid`` — FID between the samples' and the real digits' classifier features
  (``cca_jax.evaluate.compute_metrics`` → ``cca_jax.metrics``: ADM numerics);
* ``cfid`` — per-class (conditional) FID: FID of each class's samples against that class's real
  digits, averaged over the 10 classes (``metrics.class_conditional_fid``) — the conditional fit
  that guidance targets;
* ``accuracy`` — share of samples the classifier assigns to their conditioning label;
* ``inception_score`` (with the digits classifier), ``precision``, ``recall`` (k = 3).

:func:`data_floor` gives the same numbers for real digits (a random half against all digits),
the floor that finite-sample noise puts under FID at this N.
"""

from __future__ import annotations

import numpy as np

from cca_jax import evaluate as ev
from cca_jax import metrics as M

METRICS = ("fid", "inception_score", "precision", "recall", "accuracy")


def features(net, images_u8: np.ndarray) -> dict:
    return ev.extract_features(net, images_u8, batch_size=512, progress=False, desc="digits features")


def reference(net, real_u8: np.ndarray, real_labels: np.ndarray) -> ev.Reference:
    return ev.Reference.from_features(features(net, real_u8), labels=np.asarray(real_labels),
                                      source="sklearn_digits")


def evaluate(net, images_u8: np.ndarray, labels: np.ndarray, ref: ev.Reference,
             ref_labels: np.ndarray) -> dict:
    """See the module docstring; returns plain floats."""
    feats = features(net, images_u8)
    out = ev.compute_metrics(net, feats, ref, labels=np.asarray(labels), metrics=METRICS,
                             pr_k=M.PR_K)
    cfid, per_class = M.class_conditional_fid(feats["pool"], np.asarray(labels), ref.pool,
                                              np.asarray(ref_labels))
    out = {k: float(v) for k, v in out.items()}
    out["cfid"] = float(cfid)
    out["cfid_per_class"] = {str(k): float(v) for k, v in per_class.items()}
    out["num_samples"] = int(len(images_u8))
    return out


def data_floor(net, real_u8: np.ndarray, real_labels: np.ndarray, *, n: int, seed: int) -> dict:
    """Metrics of ``min(n, N/2)`` real digits (random, without replacement) against all digits."""
    rng = np.random.default_rng(seed)
    k = min(int(n), len(real_u8) // 2)
    idx = rng.choice(len(real_u8), k, replace=False)
    ref = reference(net, real_u8, real_labels)
    return evaluate(net, real_u8[idx], real_labels[idx], ref, real_labels)
