"""Calibration of class scores: Brier score, expected calibration error, reliability bins.

Scores are (N, K) in [0, 1]: per-class sigmoids (``loss.cls_loss: bce``; the K scores do
not sum to 1) or a softmax (``ce``). Every definition here reads each class's score as that
class's probability and works for both:

* **Brier score** (:func:`brier_score`): the mean over classes of the one-vs-rest Brier
  score ``mean_i (s_ik - [y_i = k])^2`` (:func:`brier_per_class`). This is Brier's (1950)
  multi-class score, which sums over classes, divided by K; it stays in [0, 1] whether or
  not the scores sum to 1.
* **Top-label ECE** (:func:`ece_top_label`): confidence = the maximum score of a case
  (whatever the scores sum to), correct = the arg-max (first on ties) is the true class;
  ``ECE = sum_b (n_b / N) |accuracy_b - confidence_b|`` over equal-width confidence bins
  (Guo, Pleiss, Sun and Weinberger, ICML 2017). With sigmoid scores the maximum is not a
  probability that the arg-max is right in the softmax sense; it is still what the model
  states for its top class, and that is what is checked.
* **Per-class ECE** (:func:`ece_per_class`): class k's score against ``[y = k]``, the same
  binning, one value per class (one-vs-rest).

Bins: ``DEFAULT_BINS`` = 15 equal-width bins on [0, 1], bin b = (b/B, (b+1)/B], the first
also holding 0. :class:`ReliabilityBins` holds what a reliability diagram draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxrgaze.evaluation.bootstrap import check_inputs

DEFAULT_BINS = 15


@dataclass(frozen=True)
class ReliabilityBins:
    """Reliability-diagram data of B equal-width bins.

    ``edges`` (B + 1,) from 0 to 1; ``confidence`` (B,) the mean score of the cases in each
    bin, ``accuracy`` (B,) the share of them that are positive / correct (both NaN for an
    empty bin); ``counts`` (B,) int64 cases per bin."""

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    counts: np.ndarray

    @property
    def ece(self) -> float:
        """``sum_b (n_b / N) |accuracy_b - confidence_b|`` over the non-empty bins; NaN if N = 0."""
        total = int(self.counts.sum())
        if total == 0:
            return float("nan")
        filled = self.counts > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float((self.counts[filled] * gaps).sum() / total)


def reliability_bins(confidence: np.ndarray, outcome: np.ndarray, n_bins: int = DEFAULT_BINS) -> ReliabilityBins:
    """Bin ``confidence`` (N,) in [0, 1] into ``n_bins`` equal-width bins (b/B, (b+1)/B] (the
    first holds 0) and average it and the 0/1 ``outcome`` (N,) (bool) per bin."""
    confidence = np.asarray(confidence, dtype=np.float64)
    outcome = np.asarray(outcome, dtype=np.float64)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if confidence.shape != outcome.shape or confidence.ndim != 1:
        raise ValueError(f"need confidence and outcome of the same shape (N,), got {confidence.shape}, {outcome.shape}")
    if ((confidence < 0) | (confidence > 1)).any():
        raise ValueError("scores must lie in [0, 1] (probabilities, not logits)")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)  # (N,)
    counts = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, confidence, minlength=n_bins) / counts
        accuracy = np.bincount(which, outcome, minlength=n_bins) / counts
    return ReliabilityBins(edges, mean_conf, accuracy, counts.astype(np.int64))


def top_label(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence and correctness: ``scores.max(1)`` (N,) and
    ``scores.argmax(1) == y_true`` (N,) bool (the first class on ties)."""
    y_true, scores = check_inputs(y_true, scores)
    return scores.max(axis=1), scores.argmax(axis=1) == y_true


def reliability_top_label(y_true: np.ndarray, scores: np.ndarray, n_bins: int = DEFAULT_BINS) -> ReliabilityBins:
    """:class:`ReliabilityBins` of the top-label confidence against arg-max correctness."""
    return reliability_bins(*top_label(y_true, scores), n_bins)


def reliability_per_class(y_true: np.ndarray, scores: np.ndarray,
                          n_bins: int = DEFAULT_BINS) -> list[ReliabilityBins]:
    """One-vs-rest :class:`ReliabilityBins` of every class k: score k against ``y == k``."""
    y_true, scores = check_inputs(y_true, scores)
    return [reliability_bins(scores[:, k], y_true == k, n_bins) for k in range(scores.shape[1])]


def ece_top_label(y_true: np.ndarray, scores: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label expected calibration error (module docstring), ``n_bins`` equal-width bins."""
    return reliability_top_label(y_true, scores, n_bins).ece


def ece_per_class(y_true: np.ndarray, scores: np.ndarray, n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """(K,) one-vs-rest expected calibration error of each class's score."""
    return np.array([bins.ece for bins in reliability_per_class(y_true, scores, n_bins)])


def brier_per_class(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(K,) one-vs-rest Brier score ``mean_i (s_ik - [y_i = k])^2`` of each class."""
    y_true, scores = check_inputs(y_true, scores)
    onehot = y_true[:, None] == np.arange(scores.shape[1])  # (N, K)
    return ((scores - onehot) ** 2).mean(axis=0)


def brier_score(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Multi-class Brier score as the MEAN over classes of the one-vs-rest Brier scores
    (Brier's sum over classes divided by K; module docstring). Lower is better."""
    return float(brier_per_class(y_true, scores).mean())
