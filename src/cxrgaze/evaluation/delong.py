"""DeLong's test for the difference of two correlated AUCs, per class and for the macro AUC.

**Structural components** (DeLong, DeLong and Clarke-Pearson, *Biometrics* 1988). For one
class (one-vs-rest) with m positives X and n negatives Y and the kernel
``H(x, y) = 1 if x > y, 1/2 if x == y, 0 otherwise``, the AUC is the mean of the placement
values::

    V10(X_i) = 1/n sum_j H(X_i, Y_j)       (positive i: share of negatives below it)
    V01(Y_j) = 1/m sum_i H(X_i, Y_j)       (negative j: share of positives above it)

computed here in O(N log N) from mid-ranks as in Sun and Xu, "Fast implementation of
DeLong's algorithm", *IEEE Signal Processing Letters* 2014: ``V10(X_i) = (r_i - rx_i) / n``
and ``V01(Y_j) = 1 - (r_j - ry_j) / m``, r the mid-rank among all cases, rx / ry among the
positives / negatives. For AUCs on the SAME partition (two models, one class), DeLong's
covariance estimate is ``S10 / m + S01 / n``, S10 and S01 the sample covariances (divisor
m - 1, n - 1) of the models' V10 over the positives and V01 over the negatives.

**One per-case component for any pair of AUCs.** Write each case's centred, scaled
placement value for AUC estimate a (a model and a class k with m_k positives, n_k negatives)::

    psi_a(c) = (V10_a(c) - AUC_a) / sqrt(m_k (m_k - 1))   if c is a positive of class k
    psi_a(c) = (V01_a(c) - AUC_a) / sqrt(n_k (n_k - 1))   otherwise

The first-order (Hoeffding) expansion of the two-sample U-statistic is
``AUC_a - E AUC_a ~ 1/m_k sum_{positives} (V10_a - AUC_a) + 1/n_k sum_{negatives} (V01_a - AUC_a)``,
a sum of one term per case; psi_a(c) is that term, rescaled by ``sqrt(m_k / (m_k - 1))`` or
``sqrt(n_k / (n_k - 1))`` so that the sums of squares below have DeLong's m - 1, n - 1 divisors.
With cases drawn independently (the same model as the bootstrap's, which resamples cases,
not classes), the covariance of two AUC estimates is estimated by
``Cov(a, b) = sum_c psi_a(c) psi_b(c)``. For two AUCs on the same
class this IS DeLong's ``S10 / m + S01 / n`` exactly; for different classes k != l the
partitions differ (a class-k case is a positive of k and a negative of l), and the same
sum pairs each case's components across the two partitions. The 2K AUC estimates of two
models form ``Psi`` (N, 2K), covariance ``Psi^T Psi`` (:func:`delong_covariance`).

**Tests.** A difference ``w . theta`` of AUCs has variance ``w^T Psi^T Psi w =
sum_c (Psi w)_c^2``. Per class: ``w`` picks class k of model a minus class k of model b
(DeLong's test). Macro: ``w = (1/K', ..., -1/K', ...)`` over the K' classes that have an
AUC, i.e. per case ``z_c = 1/K' sum_k (psi_{a,k}(c) - psi_{b,k}(c))``, variance
``sum_c z_c^2``. ``z = difference / se``, two-sided p from the standard normal. A class with
fewer than two positives or negatives has an AUC but no variance (NaN se, p).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import erfc
from scipy.stats import rankdata

from cxrgaze.evaluation.bootstrap import check_inputs, resolve_class_names


@dataclass(frozen=True)
class DelongResult:
    """AUC of model a minus that of model b with DeLong's standard error.

    ``z = difference / se``; ``p_value`` is two-sided from the standard normal, 1.0 when
    the difference and se are both 0 (identical models), NaN when se is undefined or 0
    with a non-zero difference."""

    difference: float
    se: float
    z: float
    p_value: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def placement_values(positive: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray]:
    """AUC and placement values of one binary problem.

    ``positive`` (N,) bool, ``scores`` (N,). Returns ``(auc, v)`` with ``v`` (N,):
    ``V10`` (share of negatives below, ties 1/2) for positives, ``V01`` (share of positives
    above, ties 1/2) for negatives; ``auc`` is the mean of ``v`` over the positives (and
    over the negatives). NaN (and NaN ``v``) without a positive or without a negative."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    m, n = int(positive.sum()), int((~positive).sum())
    if m == 0 or n == 0:
        return float("nan"), np.full(len(scores), np.nan)
    rank_all = rankdata(scores)  # (N,) mid-ranks
    v = np.empty(len(scores))
    v[positive] = (rank_all[positive] - rankdata(scores[positive])) / n
    v[~positive] = 1.0 - (rank_all[~positive] - rankdata(scores[~positive])) / m
    return float(v[positive].mean()), v


def structural_components(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest AUCs and per-case DeLong components of one model.

    ``y_true`` (N,) class indices, ``scores`` (N, K). Returns ``auc`` (K,) and ``psi``
    (N, K), ``psi[c, k]`` the centred placement value of case c for class k scaled by
    ``1 / sqrt(m_k (m_k - 1))`` (positives) or ``1 / sqrt(n_k (n_k - 1))`` (negatives), as in
    the module docstring: ``psi_a . psi_b`` is the covariance of two AUC estimates. ``auc`` is
    NaN for a class without a positive or a negative; ``psi`` is NaN for a class with fewer
    than two of either."""
    y_true, scores = check_inputs(y_true, scores)
    auc = np.full(scores.shape[1], np.nan)
    psi = np.full(scores.shape, np.nan)
    for k in range(scores.shape[1]):
        positive = y_true == k
        auc[k], v = placement_values(positive, scores[:, k])
        m, n = int(positive.sum()), int((~positive).sum())
        if m >= 2 and n >= 2:
            psi[:, k] = (v - auc[k]) / np.where(positive, np.sqrt(m * (m - 1.0)), np.sqrt(n * (n - 1.0)))
    return auc, psi


def delong_covariance(y_true: np.ndarray, scores: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance matrix for several models on the same cases.

    ``y_true`` (N,), ``scores`` a sequence of M (N, K) arrays. Returns ``theta`` (M * K,)
    (model-major: model 0's K class AUCs, then model 1's) and ``cov`` (M K, M K) =
    ``Psi^T Psi`` of the stacked :func:`structural_components`; the same-class blocks are
    DeLong's ``S10 / m + S01 / n``, the cross-class entries the extension of the module
    docstring."""
    parts = [structural_components(y_true, s) for s in scores]
    theta = np.concatenate([auc for auc, _ in parts])
    psi = np.concatenate([p for _, p in parts], axis=1)  # (N, M K)
    return theta, psi.T @ psi


def delong_test(
    y_true: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    class_names: Sequence[str] | None = None,
) -> dict[str, DelongResult]:
    """DeLong's test of AUC(a) - AUC(b) on the same cases, for the macro AUC and per class.

    ``y_true`` (N,) class indices, ``scores_a`` and ``scores_b`` (N, K). Keys ``"macro"``
    and the class names. Per class: the one-vs-rest AUC difference and DeLong's variance.
    Macro: the difference of the mean over the classes that have an AUC, variance
    ``sum_c z_c^2`` with ``z_c`` the mean over those classes of the per-case component
    differences (module docstring), which carries the covariance across classes and
    models."""
    auc_a, psi_a = structural_components(y_true, scores_a)
    auc_b, psi_b = structural_components(y_true, scores_b)
    if psi_a.shape != psi_b.shape:
        raise ValueError(f"scores_a and scores_b differ in shape: {psi_a.shape} vs {psi_b.shape}")
    names = resolve_class_names(class_names, psi_a.shape[1])
    d_theta, d_psi = auc_a - auc_b, psi_a - psi_b  # (K,), (N, K)
    defined = ~np.isnan(d_theta)  # the classes in the macro mean
    if defined.any():
        out = {"macro": _normal_test(float(d_theta[defined].mean()), d_psi[:, defined].mean(axis=1))}
    else:
        out = {"macro": DelongResult(*[float("nan")] * 4)}
    out.update({name: _normal_test(float(d_theta[k]), d_psi[:, k]) for k, name in enumerate(names)})
    return out


def _normal_test(difference: float, components: np.ndarray) -> DelongResult:
    """Two-sided z-test of ``difference`` with variance ``sum(components ** 2)`` (N,)."""
    se = float(np.sqrt(np.sum(components ** 2)))
    if np.isnan(difference) or np.isnan(se) or (se == 0 and difference != 0):
        return DelongResult(difference, se, float("nan"), float("nan"))
    if se == 0:
        return DelongResult(difference, 0.0, 0.0, 1.0)
    z = difference / se
    return DelongResult(difference, se, z, float(erfc(abs(z) / np.sqrt(2.0))))
