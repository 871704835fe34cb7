"""Calibration (Brier, ECE, reliability bins and figure) and sensitivity at 90 % specificity."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import brier_score_loss, roc_curve

from cxrgaze.evaluation.bootstrap import Interval, bootstrap_indices
from cxrgaze.evaluation.calibration import (DEFAULT_BINS, brier_per_class, brier_score, ece_per_class, ece_top_label,
                                            reliability_bins, reliability_per_class, reliability_top_label, top_label)
from cxrgaze.evaluation.figures import reliability_diagram
from cxrgaze.evaluation.operating_point import sensitivity_at_specificity, sensitivity_ci, sensitivity_resampled

CLASSES = ("Normal", "CHF", "pneumonia")


def sigmoid_scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """3-class labels and per-class sigmoid scores (rows do not sum to 1)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return y, 1 / (1 + np.exp(-(2 * np.eye(3)[y] - 1 + rng.normal(size=(n, 3)))))


def slow_ece(confidence: np.ndarray, outcome: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """ECE with an explicit loop over bins (b/B, (b+1)/B], 0 in the first."""
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (confidence > lo) & (confidence <= hi) if b else (confidence <= hi)
        if inside.any():
            total += inside.sum() * abs(outcome[inside].mean() - confidence[inside].mean())
    return total / len(confidence)


# --- Brier -----------------------------------------------------------------------------
def test_brier_hand_computed():
    y = np.array([0, 1])
    scores = np.array([[0.8, 0.3, 0.1], [0.4, 0.4, 0.0]])
    # class 0: (0.2^2 + 0.4^2) / 2 = 0.1; class 1: (0.3^2 + 0.6^2) / 2 = 0.225; class 2: (0.01 + 0) / 2
    np.testing.assert_allclose(brier_per_class(y, scores), [0.1, 0.225, 0.005], atol=1e-15)
    assert brier_score(y, scores) == pytest.approx((0.1 + 0.225 + 0.005) / 3, abs=1e-15)


def test_brier_matches_sklearn_per_class():
    y, scores = sigmoid_scores(100)
    expected = [brier_score_loss(y == k, scores[:, k]) for k in range(3)]
    np.testing.assert_allclose(brier_per_class(y, scores), expected, atol=1e-14)
    assert brier_score(np.array([0, 1]), np.eye(3)[[0, 1]]) == 0.0  # perfect


# --- ECE and bins ----------------------------------------------------------------------
def test_reliability_bins_hand_computed():
    conf = np.array([0.0, 0.1, 0.2, 0.25, 0.9, 1.0])
    outcome = np.array([0, 0, 1, 0, 1, 1], dtype=bool)
    bins = reliability_bins(conf, outcome, n_bins=4)  # (0, .25], (.25, .5], (.5, .75], (.75, 1]
    np.testing.assert_allclose(bins.edges, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(bins.counts, [4, 0, 0, 2])  # 0.25 belongs to the first bin
    np.testing.assert_allclose(bins.confidence[[0, 3]], [0.1375, 0.95], atol=1e-15)
    np.testing.assert_allclose(bins.accuracy[[0, 3]], [0.25, 1.0], atol=1e-15)
    assert np.isnan(bins.confidence[1]) and np.isnan(bins.accuracy[2])
    # ECE = 4/6 |0.25 - 0.1375| + 2/6 |1 - 0.95| = 0.075 + 0.01667
    assert bins.ece == pytest.approx(4 / 6 * 0.1125 + 2 / 6 * 0.05, abs=1e-15)


def test_bin_edges_are_right_closed_at_fifteen_bins():
    conf = np.arange(DEFAULT_BINS + 1) / DEFAULT_BINS  # every edge, 2/15 etc. in floating point
    counts = reliability_bins(conf, np.ones_like(conf, dtype=bool)).counts
    np.testing.assert_array_equal(counts, [2] + [1] * (DEFAULT_BINS - 1))


def test_ece_top_label_and_per_class_match_slow_reference():
    y, scores = sigmoid_scores(300, seed=1)
    confidence, correct = top_label(y, scores)
    np.testing.assert_array_equal(confidence, scores.max(axis=1))
    np.testing.assert_array_equal(correct, scores.argmax(axis=1) == y)
    assert ece_top_label(y, scores) == pytest.approx(slow_ece(confidence, correct), abs=1e-14)
    expected = [slow_ece(scores[:, k], y == k) for k in range(3)]
    np.testing.assert_allclose(ece_per_class(y, scores), expected, atol=1e-14)
    assert reliability_top_label(y, scores).counts.sum() == 300
    assert [b.counts.sum() for b in reliability_per_class(y, scores)] == [300] * 3


def test_ece_of_calibrated_and_softmax_scores():
    rng = np.random.default_rng(2)
    p = rng.random(20_000)
    assert reliability_bins(p, rng.random(20_000) < p).ece < 0.02  # outcomes drawn with probability p
    y = rng.integers(0, 3, 50)
    logits = rng.normal(size=(50, 3))
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert 0 <= ece_top_label(y, softmax) <= 1
    assert ece_top_label(y, np.eye(3)[y]) == 0.0  # confident and right


def test_calibration_rejects_logits_and_bad_bins():
    y, scores = sigmoid_scores(10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ece_top_label(y, scores * 3 - 1)
    with pytest.raises(ValueError, match="n_bins"):
        reliability_bins(scores[:, 0], y == 0, n_bins=0)


def test_reliability_diagram_figure(tmp_path):
    y, scores = sigmoid_scores(120, seed=3)
    fig = reliability_diagram(y, scores, CLASSES)
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    assert f"ECE {ece_top_label(y, scores):.3f}" in fig.axes[0].get_title()
    fig.savefig(tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 0


# --- sensitivity at 90 % specificity ---------------------------------------------------
def test_sensitivity_hand_computed():
    # 10 negatives 0.0 .. 0.9, so 90 % specificity needs 9 negatives below t: t > 0.8.
    # Positives 0.85, 0.9, 0.5, 0.95: the threshold is 0.85 (smallest observed score above 0.8),
    # and 3 of 4 positives score >= 0.85.
    neg = np.arange(10) / 10
    pos = np.array([0.85, 0.9, 0.5, 0.95])
    y = np.r_[np.zeros(10, int), np.ones(4, int)]
    s = np.r_[neg, pos]
    sens, thr = sensitivity_at_specificity(y, np.stack([1 - s, s], 1))
    assert sens[1] == 0.75 and thr[1] == 0.85
    # a threshold above every score: no positive is called
    sens, thr = sensitivity_at_specificity(np.array([0] * 10 + [1]), np.stack([np.zeros(11), np.r_[neg, 0.3]], 1),
                                           specificity=1.0)
    assert sens[1] == 0.0 and thr[1] == np.inf


def test_sensitivity_matches_sklearn_roc_curve():
    rng = np.random.default_rng(4)
    for _ in range(60):
        n = int(rng.integers(6, 90))
        y = rng.integers(0, 3, n)
        scores = np.round(rng.random((n, 3)) + 0.5 * np.eye(3)[y], int(rng.integers(1, 3)))  # ties
        sens, thr = sensitivity_at_specificity(y, scores)
        for k in range(3):
            if (y == k).all() or not (y == k).any():
                assert np.isnan(sens[k]) and np.isnan(thr[k])
                continue
            fpr, tpr, thresholds = roc_curve(y == k, scores[:, k], drop_intermediate=False)
            allowed = fpr <= 0.1 + 1e-12
            assert sens[k] == pytest.approx(tpr[allowed].max(), abs=1e-12)
            assert thr[k] == thresholds[allowed][tpr[allowed] == tpr[allowed].max()].min()


def test_sensitivity_resampled_matches_a_loop():
    y, scores = sigmoid_scores(40, seed=5)
    indices = bootstrap_indices(40, 30, seed=6)
    fast = sensitivity_resampled(y, scores, indices)
    slow = np.stack([sensitivity_at_specificity(y[rows], scores[rows])[0] for rows in indices])
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(slow))
    np.testing.assert_allclose(fast, slow, atol=1e-15)


def test_sensitivity_ci_is_seeded_and_brackets_the_estimate():
    y, scores = sigmoid_scores(200, seed=7)
    result = sensitivity_ci(y, scores, n_resamples=300, seed=1)
    assert set(result) == set(CLASSES)
    estimate, _ = sensitivity_at_specificity(y, scores)
    for k, name in enumerate(CLASSES):
        iv = result[name]
        assert isinstance(iv, Interval) and iv.n_valid == 300 and iv.method == "percentile"
        assert iv.estimate == estimate[k] and iv.low <= iv.estimate <= iv.high
    assert sensitivity_ci(y, scores, n_resamples=300, seed=1) == result
    with pytest.raises(ValueError, match="specificity"):
        sensitivity_ci(y, scores, specificity=0.0)


def test_the_evaluate_default_bins_are_the_calibration_modules():
    """``evaluate.calibration_bins`` defaults to the bins the calibration functions use."""
    from cxrgaze.config import EvalConfig
    from cxrgaze.evaluation.calibration import DEFAULT_BINS

    assert EvalConfig().calibration_bins == DEFAULT_BINS
