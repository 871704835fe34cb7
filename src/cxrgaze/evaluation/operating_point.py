"""Sensitivity at a fixed specificity (one-vs-rest), with a percentile-bootstrap interval.

For class k the positives are the cases of class k, the negatives all others; a case is
called positive when its class-k score is ``>= t``. Specificity at t is the share of
negatives scoring ``< t``, sensitivity the share of positives scoring ``>= t``.

**The threshold** is the smallest observed score t (over all cases, or +inf) whose
specificity is at least the target (0.90): with n negatives, at least
``q = ceil(target * n)`` of them must score below t, i.e. ``t > y_(q)``, the q-th smallest
negative score; t is the smallest observed score above ``y_(q)`` (+inf when there is none).
Sensitivity is then the share of positives scoring above ``y_(q)``. This is the highest
sensitivity on the empirical ROC curve (``sklearn.metrics.roc_curve``) whose false positive
rate is at most 1 - target. ``ceil`` is taken with a 1e-9 tolerance so that, e.g.,
0.9 * 30 counts as 27.

The bootstrap resamples cases (:func:`cxrgaze.evaluation.bootstrap.bootstrap_indices`),
re-derives the threshold on each resample and reports percentile intervals. NaN where a
resample has no positive or no negative of the class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cxrgaze.evaluation.bootstrap import (Interval, bootstrap_indices, check_inputs, percentile_interval,
                                          resolve_class_names)

DEFAULT_SPECIFICITY = 0.90
_ROWS_PER_CHUNK = 256


def _check_specificity(specificity: float) -> None:
    if not 0.0 < specificity <= 1.0:
        raise ValueError(f"specificity must lie in (0, 1], got {specificity}")


def _qth_negative(scores: np.ndarray, positive: np.ndarray, specificity: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``scores`` (R, M) / ``positive`` (R, M): the ``ceil(specificity * n)``-th
    smallest negative score (R,) and whether the row has a positive and a negative (R,)."""
    n_neg = (~positive).sum(axis=1)  # (R,)
    q = np.maximum(np.ceil(specificity * n_neg - 1e-9).astype(np.int64), 1)  # (R,)
    negatives = np.sort(np.where(positive, np.inf, scores), axis=1)  # (R, M), negatives first
    cut = np.take_along_axis(negatives, q[:, None] - 1, axis=1)[:, 0]  # q <= n_neg, or 1 when n_neg = 0
    return cut, (n_neg > 0) & (positive.sum(axis=1) > 0)


def sensitivity_resampled(y_true: np.ndarray, scores: np.ndarray, indices: np.ndarray,
                          specificity: float = DEFAULT_SPECIFICITY) -> np.ndarray:
    """(R, K) sensitivity at ``specificity`` of every class on each resample.

    ``y_true`` (N,), ``scores`` (N, K), ``indices`` (R, M) case indices (repeats allowed);
    each resample re-derives its threshold (module docstring). NaN where a resample lacks
    a positive or a negative of the class."""
    y_true, scores = check_inputs(y_true, scores)
    _check_specificity(specificity)
    indices = np.asarray(indices, dtype=np.int64)
    out = np.empty((len(indices), scores.shape[1]))
    for start in range(0, len(indices), _ROWS_PER_CHUNK):
        rows = indices[start:start + _ROWS_PER_CHUNK]  # (Rc, M)
        for k in range(scores.shape[1]):
            s, positive = scores[rows, k], y_true[rows] == k  # (Rc, M)
            cut, defined = _qth_negative(s, positive, specificity)
            hits = (positive & (s > cut[:, None])).sum(axis=1)
            out[start:start + len(rows), k] = np.where(defined, hits / np.maximum(positive.sum(axis=1), 1), np.nan)
    return out


def sensitivity_at_specificity(y_true: np.ndarray, scores: np.ndarray,
                               specificity: float = DEFAULT_SPECIFICITY) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity (K,) and threshold (K,) of every class at ``specificity`` on all cases.

    ``y_true`` (N,), ``scores`` (N, K). The threshold is the smallest observed score giving
    specificity >= ``specificity`` (+inf when only a threshold above every score does);
    sensitivity the share of positives scoring >= it (module docstring). NaN for a class
    without a positive or a negative."""
    y_true, scores = check_inputs(y_true, scores)
    sensitivity = sensitivity_resampled(y_true, scores, np.arange(len(y_true))[None], specificity)[0]
    thresholds = np.full(scores.shape[1], np.nan)
    for k in np.flatnonzero(~np.isnan(sensitivity)):
        cut, _ = _qth_negative(scores[None, :, k], (y_true == k)[None], specificity)
        above = scores[:, k][scores[:, k] > cut[0]]
        thresholds[k] = above.min() if above.size else np.inf
    return sensitivity, thresholds


def sensitivity_ci(
    y_true: np.ndarray,
    scores: np.ndarray,
    specificity: float = DEFAULT_SPECIFICITY,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> dict[str, Interval]:
    """Sensitivity at ``specificity`` per class with a percentile-bootstrap interval.

    ``y_true`` (N,), ``scores`` (N, K). Keys: the class names. The estimate is the value on
    all cases (:func:`sensitivity_at_specificity`); ``low``/``high`` the percentiles of the
    values on ``n_resamples`` full-size resamples (:func:`bootstrap_indices` with ``seed``),
    each with its own threshold (:func:`sensitivity_resampled`)."""
    y_true, scores = check_inputs(y_true, scores)
    names = resolve_class_names(class_names, scores.shape[1])
    estimate, _ = sensitivity_at_specificity(y_true, scores, specificity)
    resampled = sensitivity_resampled(y_true, scores, bootstrap_indices(len(y_true), n_resamples, seed), specificity)
    return {name: percentile_interval(estimate[k], resampled[:, k], confidence) for k, name in enumerate(names)}
