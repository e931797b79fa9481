"""FID / IS / precision / recall numerics on inputs with known answers (cca_jax/metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from cca_jax import metrics


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


# ----------------------------------------------------------------------------------------- FID


def test_fid_of_identical_statistics_is_zero():
    feats = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    stats = metrics.FIDStatistics.from_features(feats)
    assert stats.mu.dtype == np.float32 and stats.sigma.dtype == np.float64  # ADM's dtypes
    assert abs(metrics.fid_from_stats(stats, stats)) < 1e-8
    assert abs(metrics.fid_from_features(feats, feats)) < 1e-8


def test_fid_of_gaussians_matches_closed_form():
    d = 8
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # commuting covariances Q diag(a) Qᵀ, Q diag(b) Qᵀ: tr √(Σ₁Σ₂) = Σ √(a b)
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.1, 3.0, d)
    q = _rotation(d, 2)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    want = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10, abs=1e-10)
    # non-commuting: tr √(Σ₁Σ₂) = Σ √λ(Σ₁Σ₂) (real positive eigenvalues)
    s3 = _rotation(d, 3) @ np.diag(b) @ _rotation(d, 3).T
    lam = np.linalg.eigvals(s1 @ s3).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s3) - 2 * np.sum(np.sqrt(lam))
    assert metrics.frechet_distance(mu1, s1, mu2, s3) == pytest.approx(want, rel=1e-9)
    # 1-D: (m1 − m2)² + (σ1 − σ2)²
    assert metrics.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]),
                                    np.array([[9.0]])) == pytest.approx(4.0 + 1.0)


def test_fid_eigh_method_agrees_with_sqrtm():
    rng = np.random.default_rng(6)
    for n, d in [(200, 16), (10, 16)]:  # full rank; rank-deficient (N < F)
        x = rng.normal(size=(n, d)).astype(np.float32)
        y = (rng.normal(size=(n + 3, d)) * 1.5 + 0.2).astype(np.float32)
        a = metrics.fid_from_features(x, y)
        b = metrics.fid_from_features(x, y, method="eigh")  # low-rank factor path when n < d
        assert b == pytest.approx(a, rel=1e-6, abs=1e-6), (n, d)
        sx, sy = metrics.FIDStatistics.from_features(x), metrics.FIDStatistics.from_features(y)
        assert (sx.factor is not None) == (n < d)
        full = metrics.frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma, method="eigh")
        ref_factor = metrics.frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma, method="eigh",
                                              factor2=sy.factor)
        assert full == pytest.approx(a, rel=1e-6, abs=1e-6)
        assert ref_factor == pytest.approx(a, rel=1e-6, abs=1e-6)
    with pytest.raises(ValueError, match="fid_method"):
        metrics.fid_from_features(x, y, method="svd")


def test_fid_from_sampled_gaussians_approaches_the_truth():
    rng = np.random.default_rng(4)
    x = rng.normal(0.0, 1.0, (20000, 4)).astype(np.float32)
    y = rng.normal(0.5, 2.0, (20000, 4)).astype(np.float32)
    want = 4 * 0.25 + 4 * (2.0 - 1.0) ** 2
    assert metrics.fid_from_features(x, y) == pytest.approx(want, abs=0.1)


def test_fid_singular_product_falls_back_to_eps(monkeypatch):
    calls = []
    real = linalg.sqrtm

    def fake(a, *args, **kw):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

    monkeypatch.setattr(metrics.linalg, "sqrtm", fake)
    s = np.diag([1.0, 2.0])
    with pytest.warns(UserWarning, match="singular"):
        d = metrics.frechet_distance(np.zeros(2), s, np.zeros(2), s, eps=0.5)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s + 0.5 * np.eye(2)) @ (s + 0.5 * np.eye(2)))
    # tr Σ₁ + tr Σ₂ − 2 tr(Σ + εI) = −2·2·ε
    assert d == pytest.approx(-2.0, abs=1e-12)


def test_fid_complex_sqrtm(monkeypatch):
    s = np.diag([1.0, 4.0])
    small = np.diag([1.0, 4.0]).astype(complex) + 1e-5j
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda a, *k, **kw: small)
    assert metrics.frechet_distance(np.zeros(2), s, np.zeros(2), s) == pytest.approx(
        5.0 + 5.0 - 2 * 5.0, abs=1e-12)
    big = small + np.diag([0.0, 1e-2j])
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda a, *k, **kw: big)
    with pytest.raises(metrics.InvalidFIDError, match="imaginary"):
        metrics.frechet_distance(np.zeros(2), s, np.zeros(2), s)


def test_fid_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="another feature network"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_class_conditional_fid():
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(300, 3))
    labels = np.repeat([0, 1, 2], 100)
    mean, per = metrics.class_conditional_fid(feats, labels, feats, labels)
    assert sorted(per) == [0, 1, 2] and abs(mean) < 1e-8
    shifted = feats + (labels == 1)[:, None] * 3.0  # only class 1 moves, by 3 in each of 3 dims
    mean, per = metrics.class_conditional_fid(shifted, labels, feats, labels)
    assert per[1] == pytest.approx(27.0, rel=1e-6) and abs(per[0]) < 1e-8
    assert mean == pytest.approx(9.0, rel=1e-6)


# ------------------------------------------------------------------------------------------ IS


def test_inception_score_uniform_is_one():
    probs = np.full((100, 1008), 1.0 / 1008, np.float32)
    assert metrics.inception_score(probs) == pytest.approx(1.0, abs=1e-5)


def test_inception_score_one_hot_counts_classes_per_split():
    k = 10
    first = np.eye(k, dtype=np.float32)[np.arange(5000) % 2]  # split 1: 2 balanced classes
    second = np.eye(k, dtype=np.float32)[np.arange(5000) % 5]  # split 2: 5 balanced classes
    probs = np.concatenate([first, second])
    assert metrics.inception_score(probs) == pytest.approx((2 + 5) / 2, rel=1e-5)
    # one split: exp(entropy of the class marginal) = exp(H(.35, .35, .1, .1, .1))
    marginal = np.array([0.35, 0.35, 0.1, 0.1, 0.1])
    assert metrics.inception_score(probs, split_size=10000) == pytest.approx(
        np.exp(-np.sum(marginal * np.log(marginal))), rel=1e-5)


def test_inception_score_of_logits_and_accuracy():
    logits = np.full((8, 4), -30.0, np.float32)
    logits[np.arange(8), np.arange(8) % 4] = 30.0  # softmax ≈ one-hot, 4 balanced classes
    assert metrics.inception_score(metrics.softmax(logits)) == pytest.approx(4.0, rel=1e-4)
    labels = np.arange(8) % 4
    labels[:2] = 3
    assert metrics.accuracy(logits, labels) == pytest.approx(6 / 8)


# -------------------------------------------------------------------------- precision / recall


def _line(n, x0=0.0, y=0.0):
    return np.stack([x0 + np.arange(n, dtype=np.float32), np.full(n, y, np.float32)], 1)


def test_manifold_radii_on_a_line():
    # 3rd nearest point (index 3 of the sorted row, index 0 is the point itself), squared
    r = metrics.manifold_radii(_line(10), k=3)
    np.testing.assert_array_equal(r, [9, 4, 4, 4, 4, 4, 4, 4, 4, 9])
    np.testing.assert_array_equal(metrics.manifold_radii(_line(10), k=3, row_batch_size=3,
                                                         col_batch_size=4), r)


def test_precision_recall_on_constructed_clouds():
    ref = _line(10)  # x = 0..9 on y = 0: radii [9, 4, ..., 4, 9]
    near = _line(5, y=0.5)  # x = 0..4 on y = 0.5: radii [9, 4, 4, 4, 9] among the samples
    far = _line(5, y=20.0)  # far from the reference
    samples = np.concatenate([near, far])
    precision, recall = metrics.precision_recall(ref, samples, k=3)
    # precision: the near samples lie 0.25 from a reference point, the far ones nowhere near
    assert precision == 5 / 10
    # recall: reference x = 0..4 are 0.25 from a near sample; x = 5, 6 are within the radius 9
    # of the end sample (4, .5): 1.25, 4.25 <= 9; x = 7 is at 9.25 > 9; x = 8, 9 further
    assert recall == 7 / 10
    # batching does not change the answer
    assert metrics.precision_recall(ref, samples, k=3, row_batch_size=3, col_batch_size=4) == (
        precision, recall)
    # the sets swap roles
    assert metrics.precision_recall(samples, ref, k=3) == (recall, precision)
    # k = 1: radii are the nearest other point (1 on every line)
    assert metrics.precision_recall(ref, samples, k=1) == (5 / 10, 5 / 10)


def test_identical_sets_have_full_precision_and_recall():
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    assert metrics.precision_recall(x, x) == (1.0, 1.0)


def test_distances_fp16_then_fp32_fallback():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(5, 64)).astype(np.float32)
    v = rng.normal(size=(7, 64)).astype(np.float32)
    d = metrics.pairwise_distances(u, v)
    exact = ((u[:, None].astype(np.float64) - v[None]) ** 2).sum(-1)
    # float16 path: every entry is representable in fp16 and close to the exact value
    np.testing.assert_array_equal(d, d.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(d, exact, rtol=4e-3, atol=0.5)
    assert np.abs(d - exact).max() > 1e-4  # fp16 rounding is visible
    # ‖u‖² overflows fp16 (> 65504): the whole block is recomputed in fp32
    big = u * 100.0
    d32 = metrics.pairwise_distances(big, v * 100.0)
    assert d32.max() > np.finfo(np.float16).max
    np.testing.assert_allclose(d32, exact * 1e4, rtol=1e-4)


def test_fp16_decision_is_per_block():
    u = _line(4)
    u[3] = [300.0, 0.0]  # 300² = 90000 overflows fp16
    v = _line(2, x0=0.25)
    full = metrics.pairwise_distances(u, v)  # one block: fp32
    np.testing.assert_allclose(full[3], [(300 - 0.25) ** 2, (300 - 1.25) ** 2], rtol=1e-6)
    np.testing.assert_array_equal(metrics.pairwise_distances(u[:3], v), full[:3])


def test_compute_all_reports_every_metric():
    rng = np.random.default_rng(0)
    sample = {"pool": rng.normal(size=(40, 6)).astype(np.float32),
              "spatial": rng.normal(size=(40, 5)).astype(np.float32),
              "logits": rng.normal(size=(40, 3)).astype(np.float32)}
    ref_feats = rng.normal(size=(30, 6)).astype(np.float32)
    stats = metrics.FIDStatistics.from_features(ref_feats)
    spatial_stats = metrics.FIDStatistics.from_features(sample["spatial"])
    reference = {"mu": stats.mu, "sigma": stats.sigma, "mu_s": spatial_stats.mu,
                 "sigma_s": spatial_stats.sigma, "pool": ref_feats}
    labels = rng.integers(0, 3, 40)
    out = metrics.compute_all(sample, reference, labels=labels)
    assert set(out) == {"num_samples", "fid", "sfid", "inception_score", "precision", "recall",
                        "accuracy"}
    assert out["fid"] == pytest.approx(metrics.fid_from_features(sample["pool"], ref_feats))
    assert abs(out["sfid"]) < 1e-8
    assert out["accuracy"] == metrics.accuracy(sample["logits"], labels)
    only = metrics.compute_all(sample, {"pool": ref_feats}, metrics=["fid"])
    assert set(only) == {"num_samples", "fid"} and only["fid"] == pytest.approx(out["fid"])
