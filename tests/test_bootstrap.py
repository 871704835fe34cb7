"""Vectorised resampled AUC against sklearn; percentile, paper and paired bootstraps;
bootstrap p-values and their text."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cxrgaze.evaluation import bootstrap
from cxrgaze.evaluation.bootstrap import (Interval, auc_counts, auc_resampled, auc_resampled_loop, bootstrap_indices,
                                          macro, paper_bootstrap, paper_resample_counts, percentile_bootstrap,
                                          percentile_interval)
from cxrgaze.evaluation.paired import (PairedDifference, PairedResult, bootstrap_p_value, format_p, p_floor,
                                       paired_auc_bootstrap, paired_bootstrap)
from cxrgaze.metrics import auc_summary

# Four cases, two classes. Class 1: positives score 0.35 and 0.8, negatives 0.1 and 0.4;
# of the 4 positive-negative pairs, 3 are ordered right: AUC 3/4. Class 0 (scores 1 - s):
# positives 0.9, 0.6 vs negatives 0.65, 0.2, again 3 of 4 pairs: AUC 3/4.
Y4 = np.array([0, 0, 1, 1])
S4 = np.stack([1 - np.array([0.1, 0.4, 0.35, 0.8]), np.array([0.1, 0.4, 0.35, 0.8])], axis=1)


def synthetic(n: int, seed: int = 0, signal: float = 1.0, decimals: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """3-class labels and scores (class signal + noise), rounded so that many scores tie."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    scores = np.round(signal * np.eye(3)[y] + rng.normal(size=(n, 3)), decimals)
    return y, scores


def assert_same_auc(fast: np.ndarray, slow: np.ndarray) -> None:
    assert fast.shape == slow.shape and fast.dtype == np.float64
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(slow))
    assert np.nanmax(np.abs(fast - slow), initial=0.0) <= 1e-12


# --- auc_resampled ---------------------------------------------------------------------
def test_hand_computed_cases():
    indices = np.array([
        [0, 1, 2, 3],  # the data itself: 3/4 for both classes
        [0, 2, 2, 3],  # class 1: positives 0.35, 0.35, 0.8 all above the negative 0.1
        [3, 2, 1, 0],  # order does not matter
    ])
    auc = auc_resampled(Y4, S4, indices)
    np.testing.assert_allclose(auc, [[0.75, 0.75], [1.0, 1.0], [0.75, 0.75]], rtol=0, atol=1e-15)
    # A tie between a positive and a negative counts one half: positives 0.4, 0.8 vs
    # negatives 0.1, 0.4 -> (1 + 0.5 + 1 + 1) / 4.
    tied = S4.copy()
    tied[2, 1] = 0.4
    assert auc_resampled(Y4, tied, indices[:1])[0, 1] == 0.875


def test_matches_sklearn_with_ties_and_duplicates():
    y, scores = synthetic(40, seed=1)  # one decimal: many ties within and across classes
    rng = np.random.default_rng(2)
    for m in (40, 17, 3):  # full size, smaller, tiny (some classes absent: NaN)
        indices = rng.integers(0, 40, size=(25, m))
        assert_same_auc(auc_resampled(y, scores, indices), auc_resampled_loop(y, scores, indices))
    coarse = np.round(scores)  # only a handful of distinct values: heavy ties
    assert_same_auc(auc_resampled(y, coarse, indices), auc_resampled_loop(y, coarse, indices))


def test_nan_for_degenerate_resamples():
    y, scores = synthetic(30, seed=3)
    only_first = np.flatnonzero(y == 0)[0]
    without_2 = np.flatnonzero(y != 2)[:10]
    indices = np.stack([np.full(10, only_first), without_2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division warnings either
        auc = auc_resampled(y, scores, indices)
        m = macro(auc)
    assert np.isnan(auc[0]).all()  # one case: no class has both a positive and a negative
    assert np.isfinite(auc[1, :2]).all() and np.isnan(auc[1, 2])
    assert np.isnan(m[0]) and m[1] == pytest.approx(auc[1, :2].mean(), abs=1e-15)


def test_chunking_does_not_change_results(monkeypatch):
    y, scores = synthetic(50, seed=4)
    indices = bootstrap_indices(50, 37, seed=5)
    whole = auc_resampled(y, scores, indices)
    monkeypatch.setattr(bootstrap, "_CHUNK_ELEMENTS", 50 * 3 * 4)  # 4 rows per chunk
    np.testing.assert_array_equal(auc_resampled(y, scores, indices), whole)


def test_counts_match_indices():
    y, scores = synthetic(30, seed=6)
    indices = bootstrap_indices(30, 20, seed=7)
    counts = np.stack([np.bincount(row, minlength=30) for row in indices])
    np.testing.assert_array_equal(auc_counts(y, scores, counts), auc_resampled(y, scores, indices))
    assert np.isnan(auc_counts(y, scores, np.zeros((1, 30), dtype=int))).all()


@pytest.mark.parametrize("indices, message", [
    (np.array([[0, 4]]), "indices must lie"),
    (np.array([[-1, 0]]), "indices must lie"),
    (np.array([0, 1]), "2-D integer"),
    (np.array([[0.0, 1.0]]), "2-D integer"),
])
def test_bad_indices(indices, message):
    with pytest.raises(ValueError, match=message):
        auc_resampled(Y4, S4, indices)


def test_bad_inputs():
    with pytest.raises(ValueError, match="finite"):
        auc_resampled(Y4, np.where(S4 > 0.5, np.nan, S4), np.zeros((1, 4), dtype=int))
    with pytest.raises(ValueError, match=r"y_true \(N,\)"):
        auc_resampled(Y4[:3], S4, np.zeros((1, 4), dtype=int))
    with pytest.raises(ValueError, match="non-negative"):
        auc_counts(Y4, S4, np.array([[1, -1, 1, 1]]))


def test_macro():
    m = macro(np.array([[0.5, np.nan, 0.7], [np.nan, np.nan, np.nan], [0.6, 0.8, 1.0]]))
    np.testing.assert_allclose(m[[0, 2]], [0.6, 0.8], rtol=0, atol=1e-15)
    assert np.isnan(m[1])


# --- percentile bootstrap --------------------------------------------------------------
def test_percentile_estimate_is_full_data_auc_and_inside_interval():
    y, scores = synthetic(120, seed=8)
    result = percentile_bootstrap(y, scores, n_resamples=400, seed=0)
    assert set(result) == {"macro", "Normal", "CHF", "pneumonia"}
    summary = auc_summary(y, scores)
    for key, interval in result.items():
        assert isinstance(interval, Interval)
        assert interval.estimate == pytest.approx(summary[f"auc_{key}"], rel=0, abs=1e-15)
        assert interval.low < interval.estimate < interval.high
        assert interval.median is None and interval.method == "percentile"
        assert interval.n_resamples == interval.n_valid == 400
    assert result["macro"].to_dict() == {
        "estimate": result["macro"].estimate, "low": result["macro"].low, "high": result["macro"].high,
        "median": None, "n_resamples": 400, "n_valid": 400, "method": "percentile",
    }


def test_percentile_interval_narrows_with_more_data():
    small = percentile_bootstrap(*synthetic(60, seed=9, decimals=3), n_resamples=300)
    large = percentile_bootstrap(*synthetic(600, seed=9, decimals=3), n_resamples=300)
    for key in small:
        assert large[key].high - large[key].low < 0.7 * (small[key].high - small[key].low)


def test_percentile_confidence_level_orders_intervals():
    y, scores = synthetic(100, seed=10)
    wide = percentile_bootstrap(y, scores, n_resamples=300, confidence=0.95)["macro"]
    narrow = percentile_bootstrap(y, scores, n_resamples=300, confidence=0.5)["macro"]
    assert wide.low < narrow.low < narrow.high < wide.high
    with pytest.raises(ValueError, match="confidence"):
        percentile_bootstrap(y, scores, confidence=95)


def test_seed_reproducibility():
    y, scores = synthetic(80, seed=11)
    first = percentile_bootstrap(y, scores, n_resamples=200, seed=3)
    assert first == percentile_bootstrap(y, scores, n_resamples=200, seed=3)
    other = percentile_bootstrap(y, scores, n_resamples=200, seed=4)
    assert other["macro"].low != first["macro"].low and other["macro"].high != first["macro"].high
    assert other["macro"].estimate == first["macro"].estimate  # the full-data AUC


def test_class_names_and_column_count():
    result = percentile_bootstrap(Y4, S4, n_resamples=20, class_names=("a", "b"))
    assert set(result) == {"macro", "a", "b"}
    assert set(percentile_bootstrap(Y4, S4, n_resamples=20)) == {"macro", "Normal", "CHF"}  # CLASSES[:2]
    with pytest.raises(ValueError, match="class names"):
        percentile_bootstrap(Y4, S4, class_names=("a", "b", "c"))


def test_invalid_resamples_are_counted_not_used():
    # Two cases, one per class: a resample is defined only when it holds both cases.
    result = percentile_bootstrap(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), n_resamples=200)
    interval = result["Normal"]
    assert 0 < interval.n_valid < 200  # about half of the resamples
    assert interval.estimate == interval.low == interval.high == 1.0


# --- paper protocol --------------------------------------------------------------------
def test_paper_resample_sizes():
    counts = paper_resample_counts(100, seed=0)
    sizes = counts.sum(axis=1)
    assert counts.shape == (30, 100) and counts.min() >= 0
    assert sizes.min() >= 55 and sizes.max() <= 60
    assert len(set(sizes.tolist())) > 1  # sizes vary
    np.testing.assert_array_equal(paper_resample_counts(100, seed=0), counts)
    assert set(paper_resample_counts(100, 200, size=(3, 4), seed=1).sum(axis=1).tolist()) == {3, 4}


def test_paper_bootstrap_reports_percentiles_of_varying_size_resamples():
    y, scores = synthetic(100, seed=12)
    result = paper_bootstrap(y, scores, seed=5)
    # The same resamples, scored one at a time by sklearn.
    counts = paper_resample_counts(100, seed=5)
    indices = [np.repeat(np.arange(100), row) for row in counts]
    slow = np.stack([auc_resampled_loop(y, scores, rows[None])[0] for rows in indices])
    assert_same_auc(auc_counts(y, scores, counts), slow)
    for key, column in {"macro": macro(slow), "Normal": slow[:, 0], "pneumonia": slow[:, 2]}.items():
        interval = result[key]
        low, median, high = np.percentile(column, [2.5, 50, 97.5])
        assert interval.estimate == interval.median == pytest.approx(median, abs=1e-12)
        assert interval.low == pytest.approx(low, abs=1e-12) and interval.high == pytest.approx(high, abs=1e-12)
        assert interval.n_resamples == interval.n_valid == 30
        assert interval.method == "paper-30x55-60"


# --- paired bootstrap ------------------------------------------------------------------
def test_paired_identical_models():
    y, scores = synthetic(80, seed=13)
    result = paired_bootstrap(y, scores, scores.copy(), n_resamples=300)
    assert isinstance(result, PairedResult)
    assert result.difference == 0.0 and result.low == 0.0 and result.high == 0.0
    assert result.p_value == 1.0 and result.n_valid == 300
    assert result.per_class == {"Normal": 0.0, "CHF": 0.0, "pneumonia": 0.0}


def test_paired_perfect_vs_random_and_swapped():
    rng = np.random.default_rng(14)
    y = rng.integers(0, 3, 200)
    perfect, random = np.eye(3)[y], rng.random((200, 3))
    ab = paired_bootstrap(y, perfect, random, n_resamples=500, seed=1)
    assert ab.difference > 0.3 and 0 < ab.low <= ab.high and ab.p_value < 0.01
    assert all(v > 0.2 for v in ab.per_class.values())
    ba = paired_bootstrap(y, random, perfect, n_resamples=500, seed=1)
    assert ba.difference == -ab.difference and ba.p_value == ab.p_value
    assert ba.low == pytest.approx(-ab.high, abs=1e-12) and ba.high == pytest.approx(-ab.low, abs=1e-12)
    assert ba.per_class == {k: -v for k, v in ab.per_class.items()}
    assert ab.to_dict()["per_class"] == ab.per_class


def test_paired_p_value_definition():
    y, a = synthetic(60, seed=15)
    b = a + np.random.default_rng(16).normal(scale=2.0, size=a.shape)  # a noisier model b
    result = paired_bootstrap(y, a, b, n_resamples=300, seed=2)
    indices = bootstrap_indices(60, 300, seed=2)
    d = macro(auc_resampled(y, a, indices)) - macro(auc_resampled(y, b, indices))
    tail = min(np.sum(d <= 0), np.sum(d >= 0))
    expected = min(1.0, 2 * (tail + 1) / (300 + 1))  # two-sided, add-one (Davison and Hinkley)
    assert result.p_value == expected and 0.0 <= result.p_value <= 1.0
    assert (result.low, result.high) == tuple(np.percentile(d, [2.5, 97.5]))


def test_paired_per_class_and_macro_use_the_same_resamples():
    y, a = synthetic(70, seed=17)
    b = a + np.random.default_rng(18).normal(scale=1.5, size=a.shape)
    table = paired_auc_bootstrap(y, a, b, n_resamples=250, seed=3)
    assert set(table) == {"macro", "Normal", "CHF", "pneumonia"}
    indices = bootstrap_indices(70, 250, seed=3)
    auc_a, auc_b = auc_resampled_loop(y, a, indices), auc_resampled_loop(y, b, indices)  # the slow reference
    full_a, full_b = auc_summary(y, a), auc_summary(y, b)
    columns = {"macro": macro(auc_a) - macro(auc_b), **{c: auc_a[:, k] - auc_b[:, k]
                                                           for k, c in enumerate(("Normal", "CHF", "pneumonia"))}}
    for key, d in columns.items():
        entry = table[key]
        assert isinstance(entry, PairedDifference) and entry.n_resamples == entry.n_valid == 250
        assert entry.difference == pytest.approx(full_a[f"auc_{key}"] - full_b[f"auc_{key}"], abs=1e-12)
        low, high = np.percentile(d, [2.5, 97.5])
        assert entry.low == pytest.approx(low, abs=1e-12) and entry.high == pytest.approx(high, abs=1e-12)
        tail = min((d <= 1e-12).sum(), (d >= -1e-12).sum())
        assert entry.p_value == min(1.0, 2 * (tail + 1) / 251)
        assert entry.p_at_floor == (tail == 0)
    macro_only = paired_bootstrap(y, a, b, n_resamples=250, seed=3)
    assert (macro_only.difference, macro_only.low, macro_only.high, macro_only.p_value) == (
        table["macro"].difference, table["macro"].low, table["macro"].high, table["macro"].p_value)
    assert macro_only.per_class == {k: table[k].difference for k in ("Normal", "CHF", "pneumonia")}


def test_paired_p_value_floor_when_no_resample_crosses_zero():
    rng = np.random.default_rng(19)
    y = rng.integers(0, 3, 200)
    perfect, random = np.eye(3)[y], rng.random((200, 3))
    table = paired_auc_bootstrap(y, perfect, random, n_resamples=400, seed=0)
    for entry in table.values():
        assert entry.p_at_floor and entry.p_value == 2 / 401 and entry.low > 0
    assert paired_bootstrap(y, perfect, random, n_resamples=400).p_at_floor
    same = paired_auc_bootstrap(y, random, random.copy(), n_resamples=50)
    assert all(e.p_value == 1.0 and not e.p_at_floor and e.difference == 0.0 for e in same.values())


def test_bootstrap_p_value_hand_computed():
    # 10 resamples, 2 at or below zero, 8 above: p = 2 * (2 + 1) / (10 + 1)
    d = np.array([-0.1, 0.0, 0.2, 0.3, 0.1, 0.4, 0.5, 0.2, 0.3, 0.1])
    assert bootstrap_p_value(d) == (6 / 11, False)
    assert bootstrap_p_value(np.r_[d, np.nan]) == (6 / 11, False)  # NaN resamples do not count
    assert bootstrap_p_value(np.abs(d) + 0.01) == (2 / 11, True)  # none crossed: floor 2/(R+1)
    assert bootstrap_p_value(np.zeros(5)) == (1.0, False)
    assert bootstrap_p_value(-np.abs(d) - 0.01) == (2 / 11, True)  # two-sided
    p, flag = bootstrap_p_value(np.array([np.nan]))
    assert np.isnan(p) and not flag
    assert p_floor(2000) == 2 / 2001


@pytest.mark.parametrize("p, n, bound, text", [
    (2 / 2001, 2000, False, "≤ 0.001"),
    (2 / 10001, 10000, False, "≤ 0.0002"),
    (2 / 301, 300, False, "≤ 0.007"),  # 0.00664 rounded UP: the text stays a true bound
    (0.0, 2000, False, "≤ 0.001"),
    (4 / 2001, 2000, False, "0.0020"),
    (0.046, 2000, False, "0.046"),
    (0.34, None, False, "0.34"),
    (1.0, 2000, False, "1.00"),
    (0.012345, None, False, "0.012"),
    (3e-9, None, False, "< 0.0001"),
    (120 / 2001, 2000, True, "≤ 0.060"),
    (float("nan"), 2000, False, "n/a"),
    (None, 2000, False, "n/a"),
])
def test_format_p(p, n, bound, text):
    assert format_p(p, n, upper_bound=bound) == text


def test_format_p_never_prints_zero():
    for n in (100, 999, 2000, 10_000):
        for p in (p_floor(n), 2 / n, 3 / n):
            assert not set(format_p(p, n).lstrip("≤ ")) <= set("0.")


def test_percentile_interval():
    values = np.r_[np.arange(101, dtype=float), np.nan]
    iv = percentile_interval(0.5, values, confidence=0.9)
    assert (iv.estimate, iv.n_resamples, iv.n_valid, iv.method) == (0.5, 102, 101, "percentile")
    assert (iv.low, iv.high) == pytest.approx((5.0, 95.0), abs=1e-12)
    with pytest.raises(ValueError, match="confidence"):
        percentile_interval(0.5, values, confidence=1.5)
