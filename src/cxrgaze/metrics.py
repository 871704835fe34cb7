"""Classification metrics: one-vs-rest AUC per class and their macro mean.

Scores may be logits or probabilities (AUC depends only on the ranking within a class).
A class with only one kind of label in ``y_true`` has no AUC: it is NaN, and the macro
mean is taken over the classes that have one.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from cxrgaze import CLASSES


def auc_per_class(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC of each class. ``y_true`` (N,) class indices, ``scores`` (N, K)."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    out = np.full(scores.shape[1], np.nan)
    for k in range(scores.shape[1]):
        positive = y_true == k
        if positive.any() and (~positive).any():
            out[k] = roc_auc_score(positive, scores[:, k])
    return out


def auc_summary(y_true: np.ndarray, scores: np.ndarray, prefix: str = "") -> dict[str, float]:
    """``{prefix}auc_macro`` and ``{prefix}auc_<class>`` as plain floats (NaN where undefined)."""
    per_class = auc_per_class(y_true, scores)
    out = {f"{prefix}auc_{name}": float(v) for name, v in zip(CLASSES, per_class)}
    out[f"{prefix}auc_macro"] = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    return out
