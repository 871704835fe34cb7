"""Bootstrap confidence intervals of one-vs-rest ROC AUC, vectorised over resamples.

**A resample as multiplicities.** A bootstrap resample drawn with replacement from the N
test cases is a multiset: case ``i`` appears ``c[i] >= 0`` times. Its one-vs-rest AUC for
class ``k`` is the Mann-Whitney statistic on those weighted cases::

    U   = sum over positive i, negative j of  c[i] * c[j] * H(s[i] - s[j]),
          H(x) = 1 if x > 0, 1/2 if x == 0, 0 if x < 0
    AUC = U / (P * Q),   P = sum of c over positives, Q = sum of c over negatives

which is the rank-sum formula ``(sum of positive ranks - P(P+1)/2) / (P Q)`` with average
ranks for ties, and the trapezoidal ROC area that ``sklearn.metrics.roc_auc_score``
computes. Here the N cases are sorted by the class's score once, tied scores merged into
groups g; for a resample, ``P_g`` and ``Q_g`` are the positive and negative counts in group
g and ``U = sum_g P_g * (Q_{<g} + Q_g / 2)``, with ``Q_{<g}`` the negatives in lower groups.
That is a few integer sums over an (R, N) count matrix per class, O(R N K) in all, with no
sort per resample. ``2U``, ``P`` and ``Q`` are exact integers, so each AUC is rounded once
(at the division); sklearn's value agrees to ~1e-16. A resample without a positive or
without a negative of class k has no AUC for k: NaN.

**Intervals.** :func:`percentile_bootstrap` is the standard percentile bootstrap (Efron and
Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13): full-size resamples, the
AUC on all test cases as the estimate, the (1 - confidence)/2 and (1 + confidence)/2
percentiles of the resampled AUCs as the interval. :func:`paper_bootstrap` is the protocol
of Watanabe, Ketabi, Namdar and Khalvati (30 resamples of 55 to 60 cases, 2.5th / 50th /
97.5th percentiles reported). Paired comparisons of two models on the same resamples, and
their p-values, are in :mod:`cxrgaze.evaluation.paired`.

**Macro AUC of a resample** is the mean over the classes that have an AUC in that resample
(NaN when none has), as :func:`cxrgaze.metrics.auc_summary` does on the full data. Keys of
the result dicts are ``"macro"`` and the class names (``cxrgaze.CLASSES`` by default).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from cxrgaze import CLASSES
from cxrgaze.metrics import auc_per_class

_CHUNK_ELEMENTS = 1 << 22
"""Resamples are processed in chunks of about this many count-matrix elements per class
(rows * max(M, N) * K <= ~4M), which bounds the temporaries to a few hundred MiB at most."""


# --- AUC of many resamples -----------------------------------------------------------
class _SortedClass(NamedTuple):
    """The N cases in ascending order of one class's score, tied scores grouped."""

    order: np.ndarray  # (N,) case indices sorted by score
    starts: np.ndarray  # (G,) position in ``order`` where each group of tied scores starts
    positive: np.ndarray  # (N,) bool, in sorted order: the case belongs to this class


def _sort_classes(y_true: np.ndarray, scores: np.ndarray) -> list[_SortedClass]:
    out = []
    for k in range(scores.shape[1]):
        order = np.argsort(scores[:, k], kind="stable")
        s = scores[order, k]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        out.append(_SortedClass(order, starts, y_true[order] == k))
    return out


def _auc_from_counts(classes: list[_SortedClass], counts: np.ndarray) -> np.ndarray:
    """(Rc, K) AUCs of the resamples given by ``counts`` (Rc, N) int64 multiplicities."""
    out = np.empty((counts.shape[0], len(classes)))
    for k, cls in enumerate(classes):
        c = counts[:, cls.order]  # (Rc, N) in ascending score order
        pos = np.add.reduceat(np.where(cls.positive, c, 0), cls.starts, axis=1)  # (Rc, G)
        neg = np.add.reduceat(np.where(cls.positive, 0, c), cls.starts, axis=1)  # (Rc, G)
        neg_below = np.cumsum(neg, axis=1) - neg  # (Rc, G) negatives with a lower score
        twice_u = (pos * (2 * neg_below + neg)).sum(axis=1)  # (Rc,) exact integers
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)  # (Rc,)
        defined = (n_pos > 0) & (n_neg > 0)
        out[:, k] = np.where(defined, twice_u / np.where(defined, 2 * n_pos * n_neg, 1), np.nan)
    return out


def _row_chunks(n_rows: int, row_elements: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, row_elements))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def check_inputs(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert: ``y_true`` (N,) integer class indices and ``scores`` (N, K)
    finite float64, N >= 1; a ``ValueError`` otherwise. Returns the two arrays."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or y_true.shape != scores.shape[:1] or not y_true.size:
        raise ValueError(f"need y_true (N,) and scores (N, K), N >= 1; got {y_true.shape} and {scores.shape}")
    if not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y_true.dtype}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return y_true, scores


def _check_table(name: str, table: np.ndarray) -> np.ndarray:
    """A 2-D integer array (``indices`` or ``counts``) whose entries are checked by the caller."""
    table = np.asarray(table)
    if table.ndim != 2 or (table.size and not np.issubdtype(table.dtype, np.integer)):
        raise ValueError(f"{name} must be a 2-D integer array, got shape {table.shape}, dtype {table.dtype}")
    return table.astype(np.int64, copy=False)


def auc_counts(y_true: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC of every class on each resample given as case multiplicities.

    ``y_true`` (N,) class indices, ``scores`` (N, K), ``counts`` (R, N) non-negative
    integers: resample ``r`` holds case ``i`` ``counts[r, i]`` times (rows may have different
    totals). Returns (R, K) float64, NaN where a resample has no positive or no negative
    case of that class. See the module docstring for the method.
    """
    y_true, scores = check_inputs(y_true, scores)
    counts = _check_table("counts", counts)
    if counts.shape[1] != len(y_true):
        raise ValueError(f"counts must have one column per case ({len(y_true)}), got {counts.shape[1]}")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    classes = _sort_classes(y_true, scores)
    out = np.empty((counts.shape[0], scores.shape[1]))  # (R, K)
    for rows in _row_chunks(counts.shape[0], counts.shape[1] * scores.shape[1]):
        out[rows] = _auc_from_counts(classes, counts[rows])
    return out


def auc_resampled(y_true: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC of every class on each resample, vectorised over resamples.

    ``y_true`` (N,) class indices, ``scores`` (N, K), ``indices`` (R, M) case indices in
    [0, N): resample ``r`` is the cases ``indices[r]`` (repeats allowed). Returns (R, K)
    float64, equal to ``roc_auc_score`` on each resample and class (:func:`auc_resampled_loop`)
    to ~1e-16, NaN where a resample has no positive or no negative case of that class.
    Each chunk of rows is turned into multiplicities (``bincount``) and scored as in
    :func:`auc_counts`.
    """
    y_true, scores = check_inputs(y_true, scores)
    indices = _check_table("indices", indices)
    n = len(y_true)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(f"indices must lie in [0, {n})")
    classes = _sort_classes(y_true, scores)
    n_rows, m = indices.shape
    out = np.empty((n_rows, scores.shape[1]))  # (R, K)
    for rows in _row_chunks(n_rows, max(m, n) * scores.shape[1]):
        block = indices[rows]  # (Rc, M)
        offsets = np.arange(block.shape[0])[:, None] * n  # (Rc, 1): row r's cases at r*N + i
        counts = np.bincount((block + offsets).ravel(), minlength=block.shape[0] * n)
        out[rows] = _auc_from_counts(classes, counts.reshape(block.shape[0], n))  # (Rc, N) counts
    return out


def auc_resampled_loop(y_true: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The slow reference for :func:`auc_resampled`: a Python loop over resamples, each
    scored with sklearn's ``roc_auc_score`` per class (:func:`cxrgaze.metrics.auc_per_class`).
    Same arguments and (R, K) result; for tests and the benchmark only."""
    y_true, scores = check_inputs(y_true, scores)
    indices = np.asarray(indices)
    out = np.empty((len(indices), scores.shape[1]))  # (R, K)
    for r, cases in enumerate(indices):
        out[r] = auc_per_class(y_true[cases], scores[cases])
    return out


def macro(auc: np.ndarray) -> np.ndarray:
    """Macro AUC of each resample: ``auc`` (R, K) -> (R,), the mean over the classes that
    are not NaN in that row, NaN for a row that is all NaN (without a warning)."""
    auc = np.asarray(auc, dtype=np.float64)
    defined = ~np.isnan(auc)  # (R, K)
    n = defined.sum(axis=1)  # (R,)
    total = np.where(defined, auc, 0.0).sum(axis=1)  # (R,)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


# --- resamples -----------------------------------------------------------------------
def bootstrap_indices(n_cases: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """(R, N) int64 indices of ``n_resamples`` full-size resamples drawn with replacement
    from ``n_cases`` cases by ``np.random.default_rng(seed)`` (all drawn at once: R*N int64)."""
    if n_cases < 1 or n_resamples < 1:
        raise ValueError("need at least one case and one resample")
    return np.random.default_rng(seed).integers(0, n_cases, size=(n_resamples, n_cases))


def paper_resample_counts(
    n_cases: int, n_resamples: int = 30, size: tuple[int, int] = (55, 60), seed: int = 0
) -> np.ndarray:
    """(R, N) int64 multiplicities of the paper's resamples: each resample has a size drawn
    uniformly from ``size[0]..size[1]`` inclusive, then that many cases drawn with
    replacement. Row sums are the sizes. ``np.random.default_rng(seed)`` draws the R sizes,
    then an (R, size[1]) index matrix of which row r keeps its first ``sizes[r]`` entries."""
    low, high = size
    if n_cases < 1 or n_resamples < 1 or not 1 <= low <= high:
        raise ValueError(f"need n_cases, n_resamples >= 1 and 1 <= size[0] <= size[1]; got {n_cases}, "
                         f"{n_resamples}, {size}")
    rng = np.random.default_rng(seed)
    sizes = rng.integers(low, high, endpoint=True, size=n_resamples)  # (R,)
    draws = rng.integers(0, n_cases, size=(n_resamples, high))  # (R, high)
    keep = np.arange(high) < sizes[:, None]  # (R, high)
    flat = (draws + np.arange(n_resamples)[:, None] * n_cases)[keep]  # row r's cases at r*N + i
    return np.bincount(flat, minlength=n_resamples * n_cases).reshape(n_resamples, n_cases)


# --- intervals -----------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap interval ``[low, high]``.

    ``median`` is the 50th percentile of the resampled values where the method reports it
    (None otherwise); ``n_valid`` counts the resamples whose value is defined (not NaN),
    the only ones the percentiles use. Bounds are NaN when no resample is valid."""

    estimate: float
    low: float
    high: float
    median: float | None
    n_resamples: int
    n_valid: int
    method: str

    def to_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)


def resolve_class_names(class_names: Sequence[str] | None, k: int) -> tuple[str, ...]:
    """The K class names: ``class_names`` checked to have K entries, or ``CLASSES[:k]``."""
    names = tuple(CLASSES[:k] if class_names is None else class_names)
    if len(names) != k:
        raise ValueError(f"{k} score columns but {len(names)} class names {names}")
    return names


def _percentiles(values: np.ndarray, qs: Sequence[float]) -> tuple[list[float], int]:
    """Percentiles ``qs`` (0-100, linear interpolation) of the non-NaN ``values`` (R,), and
    how many there were; NaNs when there are none."""
    valid = values[~np.isnan(values)]
    if valid.size == 0:
        return [float("nan")] * len(qs), 0
    return [float(v) for v in np.percentile(valid, qs)], int(valid.size)


def _tails(confidence: float) -> tuple[float, float]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return 50.0 * (1.0 - confidence), 50.0 * (1.0 + confidence)


def _columns(per_class: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """``{"macro": ..., name: ...}`` columns of a (..., K) array of AUCs."""
    per_class = np.atleast_2d(per_class)
    out = {"macro": macro(per_class)}
    out.update({name: per_class[:, k] for k, name in enumerate(names)})
    return out


def percentile_bootstrap(
    y_true: np.ndarray,
    scores: np.ndarray,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> dict[str, Interval]:
    """Percentile-bootstrap interval of the macro and per-class AUC.

    ``y_true`` (N,) class indices, ``scores`` (N, K). Draws ``n_resamples`` resamples of N
    cases with replacement (:func:`bootstrap_indices`); for each key the estimate is the AUC
    on all cases (as :func:`cxrgaze.metrics.auc_summary`), ``low``/``high`` the
    ``50 (1 -+ confidence)`` percentiles (2.5 and 97.5 for 0.95) of the resampled values
    that are defined. A resample's macro value is the mean over its defined classes."""
    y_true, scores = check_inputs(y_true, scores)
    names = resolve_class_names(class_names, scores.shape[1])
    _tails(confidence)  # a bad confidence fails before the resampling
    estimates = _columns(auc_per_class(y_true, scores), names)  # key -> (1,)
    resampled = _columns(auc_resampled(y_true, scores, bootstrap_indices(len(y_true), n_resamples, seed)), names)
    return {key: percentile_interval(estimates[key][0], values, confidence) for key, values in resampled.items()}


def percentile_interval(estimate: float, resampled: np.ndarray, confidence: float = 0.95) -> Interval:
    """The percentile-bootstrap interval of any statistic: ``estimate`` its value on all
    cases, ``resampled`` (R,) its values on R resamples (NaN where undefined). ``low`` and
    ``high`` are the ``50 (1 -+ confidence)`` percentiles of the defined values, ``method``
    is ``"percentile"``."""
    lo, hi = _tails(confidence)
    resampled = np.asarray(resampled, dtype=np.float64)
    (low, high), n_valid = _percentiles(resampled, (lo, hi))
    return Interval(float(estimate), low, high, None, len(resampled), n_valid, "percentile")


def paper_bootstrap(
    y_true: np.ndarray,
    scores: np.ndarray,
    n_resamples: int = 30,
    size: tuple[int, int] = (55, 60),
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> dict[str, Interval]:
    """The paper's bootstrap (Watanabe, Ketabi, Namdar and Khalvati): ``n_resamples`` (30)
    resamples, each of a size drawn uniformly from ``size`` (55 to 60 inclusive), drawn with
    replacement from the test cases (:func:`paper_resample_counts`).

    Reports, per key, the 2.5th, 50th and 97.5th percentiles of the defined resampled
    values as ``low``, ``median`` and ``high``. **The estimate is the 50th percentile, the
    median over resamples**, which is the number the paper reports, not the AUC on all
    test cases (that is :func:`percentile_bootstrap`'s estimate). With resamples smaller than
    the test set and only 30 of them, this interval is wider and noisier than the standard
    percentile bootstrap; use it to compare with the paper's tables. ``method`` is
    ``"paper-{n_resamples}x{size[0]}-{size[1]}"``."""
    y_true, scores = check_inputs(y_true, scores)
    names = resolve_class_names(class_names, scores.shape[1])
    counts = paper_resample_counts(len(y_true), n_resamples, size, seed)  # (R, N)
    method = f"paper-{n_resamples}x{size[0]}-{size[1]}"
    out = {}
    for key, values in _columns(auc_counts(y_true, scores, counts), names).items():
        (low, median, high), n_valid = _percentiles(values, (2.5, 50.0, 97.5))
        out[key] = Interval(median, low, high, median, n_resamples, n_valid, method)
    return out
