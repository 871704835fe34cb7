"""DeLong's test: fast components against an O(n^2) reference, a hand-computed case, the
macro variance across classes (exact symmetric case, Monte Carlo, bootstrap)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrgaze.evaluation.delong import (DelongResult, delong_covariance, delong_test, placement_values,
                                       structural_components)
from cxrgaze.evaluation.paired import paired_auc_bootstrap

CLASSES = ("Normal", "CHF", "pneumonia")


def slow_delong(positive: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong 1988 written out: the kernel on every positive-negative pair, placement values,
    S10 and S01 with n - 1 divisors; returns (AUC(a) - AUC(b), variance of the difference)."""
    def kernel(x: float, y: float) -> float:
        return 1.0 if x > y else 0.5 if x == y else 0.0

    v10, v01, aucs = [], [], []
    for s in (a, b):
        pos, neg = s[positive], s[~positive]
        psi = np.array([[kernel(x, y) for y in neg] for x in pos])  # (m, n)
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
        aucs.append(psi.mean())
    s10, s01 = np.cov(np.stack(v10)), np.cov(np.stack(v01))  # (2, 2)
    m, n = positive.sum(), (~positive).sum()
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    return aucs[0] - aucs[1], var


def three_class(n: int, rng: np.random.Generator, ties: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = rng.integers(0, 3, n)
    a = np.eye(3)[y] + rng.normal(size=(n, 3))
    b = 0.5 * a + rng.normal(size=(n, 3))
    return (y, np.round(a, 1), np.round(b, 1)) if ties else (y, a, b)


def test_hand_computed_case():
    # Positives (class 1) score 0.8, 0.4 under a and 0.3, 0.9 under b; negatives 0.5, 0.1 and 0.2, 0.95.
    # a: V10 = [1, 1/2], V01 = [1/2, 1], AUC 3/4.  b: V10 = [1/2, 1/2], V01 = [1, 0], AUC 1/2.
    # S10: var(a) 1/8, var(b) 0, cov 0.  S01: var(a) 1/8, var(b) 1/2, cov -1/4.
    # var = (1/8 + 0 - 0) / 2 + (1/8 + 1/2 + 1/2) / 2 = 5/8; z = (1/4) / sqrt(5/8) = 1/sqrt(10).
    y = np.array([1, 1, 0, 0])
    a, b = np.array([0.8, 0.4, 0.5, 0.1]), np.array([0.3, 0.9, 0.2, 0.95])
    result = delong_test(y, np.stack([1 - a, a], 1), np.stack([1 - b, b], 1), class_names=("neg", "pos"))
    pos = result["pos"]
    assert isinstance(pos, DelongResult)
    assert pos.difference == pytest.approx(0.25, abs=1e-15)
    assert pos.se == pytest.approx(math.sqrt(5 / 8), abs=1e-15)
    assert pos.z == pytest.approx(1 / math.sqrt(10), abs=1e-15)
    assert pos.p_value == pytest.approx(math.erfc(1 / math.sqrt(20)), abs=1e-15)  # 0.7518...
    assert pos.p_value == pytest.approx(0.7518296, abs=1e-7)
    # 1 - s ranks the other class the same way: class "neg" and the macro are the same test.
    for key in ("neg", "macro"):
        assert result[key].to_dict() == pytest.approx(pos.to_dict(), abs=1e-15)


def test_placement_values_with_ties():
    positive = np.array([True, True, False, False, False])
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.9])
    auc, v = placement_values(positive, scores)
    # 0.5 vs negatives 0.5, 0.1, 0.9 -> (1/2 + 1 + 0) / 3; 0.9 -> (1 + 1 + 1/2) / 3
    np.testing.assert_allclose(v[:2], [1.5 / 3, 2.5 / 3], atol=1e-15)
    # negatives: 0.5 -> (1/2 + 1) / 2, 0.1 -> 1, 0.9 -> (0 + 1/2) / 2
    np.testing.assert_allclose(v[2:], [0.75, 1.0, 0.25], atol=1e-15)
    assert auc == pytest.approx(roc_auc_score(positive, scores), abs=1e-15)
    nan_auc, nan_v = placement_values(np.zeros(3, bool), np.arange(3.0))
    assert np.isnan(nan_auc) and np.isnan(nan_v).all()


@pytest.mark.parametrize("ties", [False, True])
def test_per_class_matches_slow_reference(ties):
    y, a, b = three_class(60, np.random.default_rng(1), ties=ties)
    result = delong_test(y, a, b)
    for k, name in enumerate(CLASSES):
        diff, var = slow_delong(y == k, a[:, k], b[:, k])
        assert result[name].difference == pytest.approx(diff, abs=1e-12)
        assert result[name].se ** 2 == pytest.approx(var, rel=1e-10)
        assert result[name].p_value == pytest.approx(math.erfc(abs(diff) / math.sqrt(2 * var)), rel=1e-9)
    auc, _ = structural_components(y, a)
    np.testing.assert_allclose(auc, [roc_auc_score(y == k, a[:, k]) for k in range(3)], atol=1e-14)


def test_identical_models():
    y, a, _ = three_class(50, np.random.default_rng(2))
    for result in delong_test(y, a, a.copy()).values():
        assert (result.difference, result.se, result.z, result.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_macro_variance_is_the_contrast_of_the_covariance_matrix():
    y, a, b = three_class(80, np.random.default_rng(3))
    theta, cov = delong_covariance(y, [a, b])
    assert theta.shape == (6,) and cov.shape == (6, 6)
    np.testing.assert_allclose(cov, cov.T, atol=1e-15)
    assert np.linalg.eigvalsh(cov).min() > -1e-12  # positive semi-definite: Psi^T Psi
    w = np.r_[np.full(3, 1 / 3), np.full(3, -1 / 3)]
    result = delong_test(y, a, b)
    assert result["macro"].difference == pytest.approx(w @ theta, abs=1e-14)
    assert result["macro"].se ** 2 == pytest.approx(w @ cov @ w, rel=1e-10)
    for k, name in enumerate(CLASSES):  # the same-class blocks are DeLong's S10/m + S01/n
        e = np.zeros(6)
        e[k], e[3 + k] = 1, -1
        assert result[name].se ** 2 == pytest.approx(e @ cov @ e, rel=1e-10)


def test_macro_variance_matches_monte_carlo():
    """Ordinal scores make the class AUCs strongly correlated: the cross-class covariance
    matters (ignoring it is ~35 % low), and the DeLong macro variance must carry it."""
    rng = np.random.default_rng(4)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = rng.choice(3, n, p=[0.4, 0.3, 0.3])
        latent = y + 0.9 * rng.normal(size=n)
        scores = [np.stack([-t, -np.abs(t - 1), t], 1) for t in (latent + 0.5 * rng.normal(size=n),
                                                                  latent + rng.normal(size=n))]
        return y, *scores

    diffs, delong_var, independent_var = [], [], []
    for _ in range(800):
        result = delong_test(*sample(100))
        diffs.append(result["macro"].difference)
        delong_var.append(result["macro"].se ** 2)
        independent_var.append(sum(result[c].se ** 2 for c in CLASSES) / 9)
    empirical = np.var(diffs, ddof=1)
    assert np.mean(delong_var) / empirical == pytest.approx(1.0, abs=0.15)  # 0.93 here; 800 runs: +-5 % noise
    assert np.mean(independent_var) / empirical < 0.8


def test_macro_variance_close_to_paired_bootstrap():
    y, a, b = three_class(300, np.random.default_rng(5))
    delong = delong_test(y, a, b)
    boot = paired_auc_bootstrap(y, a, b, n_resamples=1000, seed=0)
    for key in ("macro", *CLASSES):
        assert delong[key].difference == pytest.approx(boot[key].difference, abs=1e-12)
        bootstrap_se = (boot[key].high - boot[key].low) / (2 * 1.959964)
        assert delong[key].se == pytest.approx(bootstrap_se, rel=0.15)


def test_undefined_variance():
    y = np.array([0, 1, 1, 1, 2, 2])  # one case of class 0: an AUC but no variance
    rng = np.random.default_rng(6)
    a, b = rng.random((6, 3)), rng.random((6, 3))
    result = delong_test(y, a, b)
    assert np.isfinite(result["Normal"].difference) and np.isnan(result["Normal"].p_value)
    assert np.isfinite(result["CHF"].p_value)
    assert np.isnan(result["macro"].se) and np.isnan(result["macro"].p_value)
    with pytest.raises(ValueError, match="differ in shape"):
        delong_test(y, a, b[:, :2])
