"""FID, sFID, Inception Score, precision and recall with the numerics of the OpenAI/ADM evaluator.

Pure host-side numpy functions over feature arrays (``N`` images, ``F`` features); the features
come from any network (``cca_jax/evaluate.py``). ``../shared/spec/evaluation.md`` §3 describes the
reference semantics reproduced here:

* FID: μ = float32 mean, Σ = ``np.cov`` (float64, N − 1); d = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ −
  2 tr √(Σ₁Σ₂) with ``scipy.linalg.sqrtm``; non-finite √ → ε = 1e-6 added to both diagonals and
  recomputed; complex √ → error if any diagonal |imag| > 1e-3, else the real part. Sample
  statistics first, reference second. sFID is the same on the spatial features.
* IS: softmax over ``pool3 · W`` (no bias), consecutive splits of 5000 rows (10 splits for 50k),
  score = exp(mean KL(p ‖ p̄)), IS = mean over splits.
* Precision/recall (Kynkäänniemi et al., k = 3): squared distances computed first in float16 and
  used if every entry of the (row batch × column batch) block is finite, else recomputed in
  float32; radius = k-th smallest distance of a point to its own set (index 0 is itself);
  row/column batches of 10,000 like ADM.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import numpy as np
from scipy import linalg

IS_SPLIT_SIZE = 5000
PR_BATCH_SIZE = 10000
PR_K = 3
FID_EPS = 1e-6


class InvalidFIDError(ValueError):
    """The matrix square root of Σ₁Σ₂ has a significant imaginary part."""


# --------------------------------------------------------------------------------------------
# FID / sFID


@dataclasses.dataclass(frozen=True)
class FIDStatistics:
    """mu [F] and sigma [F, F] of a feature set; ``factor`` [N, F] with Σ = factorᵀ·factor is kept
    when N < F, so the ``eigh`` FID method works in N×N instead of F×F."""

    mu: np.ndarray
    sigma: np.ndarray
    factor: np.ndarray | None = None

    @classmethod
    def from_features(cls, features_NF: np.ndarray) -> "FIDStatistics":
        """ADM's ``compute_statistics``: mean in the features' dtype, ``np.cov`` (float64)."""
        features_NF = np.asarray(features_NF)
        if features_NF.ndim != 2 or features_NF.shape[0] < 2:
            raise ValueError(f"FID statistics need features of shape [N >= 2, F], got "
                             f"{features_NF.shape}; evaluate at least 2 images.")
        n, f = features_NF.shape
        factor = None
        if n < f:
            x = features_NF.astype(np.float64)
            factor = (x - x.mean(0)) / np.sqrt(n - 1)
        return cls(np.mean(features_NF, axis=0), np.cov(features_NF, rowvar=False), factor)


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray,
                             factor1: np.ndarray | None = None,
                             factor2: np.ndarray | None = None) -> float:
    """tr √(Σ₁Σ₂) = Σ √λ(√Σ₁ Σ₂ √Σ₁), negative round-off eigenvalues clipped to 0.

    With a factor Σ₁ = AᵀA (A: N×F) the nonzero eigenvalues are those of A Σ₂ Aᵀ (N×N). Same
    value as sqrtm for PSD inputs, but fast for 2048-d rank-deficient covariances (N < 2048),
    where scipy's sqrtm takes its complex path and minutes.
    """
    if factor1 is None and factor2 is not None:
        sigma1, sigma2, factor1 = sigma2, sigma1, factor2
    if factor1 is not None:
        m = factor1 @ sigma2 @ factor1.T
    else:
        w, v = np.linalg.eigh(sigma1)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        m = root @ sigma2 @ root
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sum(np.sqrt(np.clip(lam, 0, None))))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FID_EPS, method: str = "sqrtm", factor1: np.ndarray | None = None,
                     factor2: np.ndarray | None = None) -> float:
    """Fréchet distance between N(mu1, sigma1) (samples) and N(mu2, sigma2) (reference).

    method ``"sqrtm"``: ADM's numerics (scipy sqrtm, ε fallback, imaginary check). ``"eigh"``:
    :func:`_trace_sqrt_product_eigh` (optional low-rank factors; for small-N in-training FID;
    not ADM-exact).
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"Statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, sigma "
                         f"{sigma1.shape} vs {sigma2.shape}; the reference was computed with "
                         "another feature network (check config.eval.reference_npz).")
    diff = mu1 - mu2
    if method == "eigh":
        tr = _trace_sqrt_product_eigh(sigma1, sigma2, factor1, factor2)
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr)
    if method != "sqrtm":
        raise ValueError(f"FID method {method!r} (config.eval.fid_method); expected 'sqrtm' "
                         "(ADM) or 'eigh'.")
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular product; adding {eps} to the diagonal of the covariances")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise InvalidFIDError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in "
                                  "sqrtm(sigma1 @ sigma2); too few images for the feature size?")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_stats(samples: FIDStatistics, reference: FIDStatistics, method: str = "sqrtm") -> float:
    return frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma,
                            method=method, factor1=samples.factor, factor2=reference.factor)


def fid_from_features(sample_features_NF: np.ndarray, reference_features_MF: np.ndarray,
                      method: str = "sqrtm") -> float:
    return fid_from_stats(FIDStatistics.from_features(sample_features_NF),
                          FIDStatistics.from_features(reference_features_MF), method)


def class_conditional_fid(sample_features_NF: np.ndarray, sample_labels_N: np.ndarray,
                          reference_features_MF: np.ndarray, reference_labels_M: np.ndarray,
                          method: str = "sqrtm") -> tuple[float, dict[int, float]]:
    """Mean over classes of the FID between the samples and the references of that class.

    Classes with fewer than 2 images on either side are skipped. Returns (mean, {class: fid}).
    """
    sample_labels_N, reference_labels_M = np.asarray(sample_labels_N), np.asarray(reference_labels_M)
    per_class = {}
    for c in np.intersect1d(np.unique(sample_labels_N), np.unique(reference_labels_M)):
        s, r = sample_features_NF[sample_labels_N == c], reference_features_MF[reference_labels_M == c]
        if len(s) >= 2 and len(r) >= 2:
            per_class[int(c)] = fid_from_features(s, r, method)
    if not per_class:
        raise ValueError("class_conditional_fid: no class has >= 2 samples and >= 2 references.")
    return float(np.mean(list(per_class.values()))), per_class


# --------------------------------------------------------------------------------------------
# Inception Score


def softmax(logits_NK: np.ndarray) -> np.ndarray:
    """Float32 row softmax (what TF's ``tf.nn.softmax`` computes in the ADM graph)."""
    x = np.asarray(logits_NK, np.float32)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def inception_score(probs_NK: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Mean over consecutive ``split_size``-row splits of exp(mean_rows KL(p ‖ p̄_split)).

    Terms with p = 0 count as 0 (the limit of p·log p); ADM's formula gives NaN there, and is
    identical wherever it is finite.
    """
    preds = np.asarray(probs_NK, np.float32)
    if preds.ndim != 2 or len(preds) == 0:
        raise ValueError(f"inception_score needs probabilities [N > 0, K], got {preds.shape}.")
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i: i + split_size]
        mean = np.expand_dims(np.mean(part, 0), 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(mean)), np.float32(0))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def accuracy(logits_NK: np.ndarray, labels_N: np.ndarray) -> float:
    """Share of rows whose argmax is their label (a classifier recognising its conditioning)."""
    return float(np.mean(np.argmax(np.asarray(logits_NK), axis=1) == np.asarray(labels_N)))


# --------------------------------------------------------------------------------------------
# Precision / recall


def _sq_distances(u: np.ndarray, v: np.ndarray, dtype) -> np.ndarray:
    """max(‖u‖² − 2u·v + ‖v‖², 0) with every op rounded to ``dtype`` (products and sums
    accumulated in float32, as TF's half-precision GPU kernels do)."""
    with np.errstate(over="ignore", invalid="ignore"):  # fp16 overflow is detected by the caller
        u, v = u.astype(dtype), v.astype(dtype)
        norm_u = np.sum(np.square(u).astype(np.float32), axis=1).astype(dtype)
        norm_v = np.sum(np.square(v).astype(np.float32), axis=1).astype(dtype)
        uv = (u.astype(np.float32) @ v.astype(np.float32).T).astype(dtype)
        d = norm_u[:, None] - dtype(2) * uv
        d = d + norm_v[None, :]
        return np.maximum(d, dtype(0))


def pairwise_distances(u_AF: np.ndarray, v_BF: np.ndarray) -> np.ndarray:
    """ADM's ``DistanceBlock``: float32 [A, B] squared distances, float16 if all finite."""
    d16 = _sq_distances(u_AF, v_BF, np.float16)
    if np.isfinite(d16).all():
        return d16.astype(np.float32)
    return _sq_distances(np.asarray(u_AF, np.float32), np.asarray(v_BF, np.float32), np.float32)


def manifold_radii(features_NF: np.ndarray, k: int = PR_K, row_batch_size: int = PR_BATCH_SIZE,
                   col_batch_size: int = PR_BATCH_SIZE) -> np.ndarray:
    """[N] float32: k-th smallest squared distance of each point to its own set (incl. itself)."""
    n = len(features_NF)
    if n <= k:
        raise ValueError(f"Precision/recall with k={k} needs more than {k} images, got {n}.")
    radii = np.zeros([n], np.float32)
    for b1 in range(0, n, row_batch_size):
        rows = features_NF[b1: b1 + row_batch_size]
        dist = np.concatenate([pairwise_distances(rows, features_NF[b2: b2 + col_batch_size])
                               for b2 in range(0, n, col_batch_size)], axis=1)
        radii[b1: b1 + len(rows)] = np.partition(dist, k, axis=1)[:, k]
    return radii


def precision_recall(reference_features_MF: np.ndarray, sample_features_NF: np.ndarray,
                     k: int = PR_K, row_batch_size: int = PR_BATCH_SIZE,
                     col_batch_size: int = PR_BATCH_SIZE) -> tuple[float, float]:
    """(precision, recall) of the samples against the reference manifold (ADM ``evaluate_pr``).

    precision: share of samples within (≤) the radius of some reference point;
    recall: share of reference points within the radius of some sample.
    """
    ref = np.asarray(reference_features_MF, np.float32)
    sam = np.asarray(sample_features_NF, np.float32)
    radii_ref = manifold_radii(ref, k, row_batch_size, col_batch_size)
    radii_sam = manifold_radii(sam, k, row_batch_size, col_batch_size)
    ref_in = np.zeros([len(ref)], bool)
    sam_in = np.zeros([len(sam)], bool)
    for b1 in range(0, len(ref), row_batch_size):
        for b2 in range(0, len(sam), col_batch_size):
            d = pairwise_distances(ref[b1: b1 + row_batch_size], sam[b2: b2 + col_batch_size])
            ref_in[b1: b1 + len(d)] |= np.any(d <= radii_sam[None, b2: b2 + d.shape[1]], axis=1)
            sam_in[b2: b2 + d.shape[1]] |= np.any(d <= radii_ref[b1: b1 + len(d), None], axis=0)
    return float(np.mean(sam_in.astype(np.float64))), float(np.mean(ref_in.astype(np.float64)))


# --------------------------------------------------------------------------------------------
# All at once


def compute_all(sample: dict[str, np.ndarray], reference: dict[str, np.ndarray], *,
                labels: np.ndarray | None = None, split_size: int = IS_SPLIT_SIZE,
                pr_k: int = PR_K, pr_batch_size: int = PR_BATCH_SIZE,
                metrics: Sequence[str] | None = None, fid_method: str = "sqrtm") -> dict[str, float]:
    """Every metric the inputs allow.

    sample: ``pool`` [N, F] (required), optional ``spatial`` [N, S], ``logits`` [N, K].
    reference: ``mu``/``sigma`` (or ``pool`` to compute them), optional ``mu_s``/``sigma_s`` (or
      ``spatial``), ``pool`` for precision/recall.
    labels: [N] conditioning labels → ``accuracy`` (needs ``logits``).
    metrics: subset of (fid, sfid, inception_score, precision, recall, accuracy); None = all
      that the inputs allow.
    fid_method: ``"sqrtm"`` (ADM) or ``"eigh"`` (see :func:`frechet_distance`).
    """
    want = set(metrics) if metrics is not None else None
    use = lambda m: want is None or m in want  # noqa: E731
    out: dict[str, float] = {"num_samples": float(len(sample["pool"]))}

    def ref_stats(mu, sigma, feats):
        if mu in reference and sigma in reference:
            return FIDStatistics(np.asarray(reference[mu]), np.asarray(reference[sigma]))
        if feats in reference and reference[feats] is not None:
            return FIDStatistics.from_features(reference[feats])
        return None

    if use("fid"):
        stats = ref_stats("mu", "sigma", "pool")
        if stats is None:
            raise ValueError("The reference has neither mu/sigma nor pool features.")
        out["fid"] = fid_from_stats(FIDStatistics.from_features(sample["pool"]), stats, fid_method)
    if use("sfid") and sample.get("spatial") is not None:
        stats = ref_stats("mu_s", "sigma_s", "spatial")
        if stats is not None:
            out["sfid"] = fid_from_stats(FIDStatistics.from_features(sample["spatial"]), stats,
                                         fid_method)
    logits = sample.get("logits")
    if use("inception_score") and logits is not None:
        out["inception_score"] = inception_score(softmax(logits), split_size)
    if labels is not None and logits is not None and use("accuracy"):
        out["accuracy"] = accuracy(logits, labels)
    if (use("precision") or use("recall")) and reference.get("pool") is not None:
        p, r = precision_recall(reference["pool"], sample["pool"], pr_k, pr_batch_size, pr_batch_size)
        out["precision"], out["recall"] = p, r
    return out
