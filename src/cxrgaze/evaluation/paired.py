"""Paired bootstrap comparisons of two models' AUCs, and bootstrap p-values.

:func:`paired_auc_bootstrap` compares two models' macro and per-class AUCs on the same
resamples (:func:`paired_bootstrap`: its macro entry), with a two-sided add-one p-value,
never below ``2 / (R + 1)`` (:func:`bootstrap_p_value`; print it with :func:`format_p`,
which writes ``≤ 0.0002`` rather than ``0.000``). The resamples, the AUC of each resample
and the percentile intervals are :mod:`cxrgaze.evaluation.bootstrap`'s; the keys of the
result dicts are ``"macro"`` and the class names, as there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from cxrgaze.evaluation.bootstrap import (_columns, _tails, auc_resampled, bootstrap_indices, check_inputs,
                                          percentile_interval, resolve_class_names)
from cxrgaze.metrics import auc_per_class


@dataclass(frozen=True)
class PairedDifference:
    """One AUC (a class's or the macro) of model a minus that of model b, paired bootstrap.

    ``difference`` is on all cases; ``low``, ``high`` the percentile interval of the
    resampled differences; ``p_value`` the two-sided bootstrap p-value of a zero
    difference, floored at ``1 / (n_valid + 1)`` with ``p_at_floor`` True when no resample
    reached zero (:func:`bootstrap_p_value`); print it with :func:`format_p`."""

    difference: float
    low: float
    high: float
    p_value: float
    p_at_floor: bool
    n_resamples: int
    n_valid: int

    def to_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


@dataclass(frozen=True)
class PairedResult:
    """Macro AUC of model a minus that of model b, with a paired bootstrap interval.

    ``difference`` and ``per_class`` are on all test cases; ``low``, ``high`` are the
    percentile interval of the resampled macro differences; ``p_value`` is the two-sided
    bootstrap p-value of a zero difference, floored as in :class:`PairedDifference`
    (see :func:`paired_bootstrap`)."""

    difference: float
    low: float
    high: float
    p_value: float
    n_resamples: int
    n_valid: int
    per_class: dict[str, float]
    p_at_floor: bool = False

    def to_dict(self) -> dict[str, float | int | bool | dict[str, float]]:
        return asdict(self)


def paired_auc_bootstrap(
    y_true: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> dict[str, PairedDifference]:
    """Paired bootstrap of the AUC difference a - b, for the macro AUC and every class.

    ``y_true`` (N,) class indices, ``scores_a`` and ``scores_b`` (N, K) on the same cases.
    Both models are scored on the SAME resamples (:func:`bootstrap_indices` with ``seed``),
    so the resampled differences keep the correlation between the two models. Keys
    ``"macro"`` and the class names; a resample's macro AUC is the mean over its defined
    classes (the same classes for both models: they depend on the labels only). Each value
    is a :class:`PairedDifference`: difference on all cases, percentile CI, p-value
    (:func:`bootstrap_p_value`)."""
    y_true, scores_a = check_inputs(y_true, scores_a)
    _, scores_b = check_inputs(y_true, scores_b)
    if scores_a.shape != scores_b.shape:
        raise ValueError(f"scores_a and scores_b differ in shape: {scores_a.shape} vs {scores_b.shape}")
    names = resolve_class_names(class_names, scores_a.shape[1])
    _tails(confidence)  # a bad confidence fails before the resampling
    indices = bootstrap_indices(len(y_true), n_resamples, seed)  # (R, N)
    full = [_columns(auc_per_class(y_true, s), names) for s in (scores_a, scores_b)]  # key -> (1,)
    resampled = [_columns(auc_resampled(y_true, s, indices), names) for s in (scores_a, scores_b)]  # key -> (R,)
    return {key: _paired_difference(full[0][key][0] - full[1][key][0], resampled[0][key] - resampled[1][key],
                                    confidence)
            for key in full[0]}


def _paired_difference(difference: float, resampled: np.ndarray, confidence: float) -> PairedDifference:
    interval = percentile_interval(difference, resampled, confidence)
    p_value, at_floor = bootstrap_p_value(resampled)
    return PairedDifference(interval.estimate, interval.low, interval.high, p_value, at_floor,
                            interval.n_resamples, interval.n_valid)


def paired_bootstrap(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, n_resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0, class_names: Sequence[str] | None = None) -> PairedResult:
    """Paired bootstrap of the macro-AUC difference between models a and b: the ``"macro"``
    entry of :func:`paired_auc_bootstrap` (same arguments, same resamples), with the
    per-class differences on all cases in ``per_class``. Identical models give a zero
    difference on every resample and p = 1."""
    table = paired_auc_bootstrap(y_true, scores_a, scores_b, n_resamples, confidence, seed, class_names)
    m = table.pop("macro")
    return PairedResult(difference=m.difference, low=m.low, high=m.high, p_value=m.p_value,
                        n_resamples=m.n_resamples, n_valid=m.n_valid,
                        per_class={name: d.difference for name, d in table.items()}, p_at_floor=m.p_at_floor)


# --- p-values ------------------------------------------------------------------------
def p_floor(n_resamples: int) -> float:
    """``2 / (n_resamples + 1)``: the smallest two-sided p-value a bootstrap of that many
    resamples reports (:func:`bootstrap_p_value`)."""
    return 2.0 / (n_resamples + 1)


def bootstrap_p_value(differences: np.ndarray) -> tuple[float, bool]:
    """Two-sided bootstrap p-value of a zero difference, and whether it is at the floor.

    ``differences`` (R,) resampled values of a - b, NaN where undefined; with ``R'`` the
    defined ones and ``t = min(#(d <= 0), #(d >= 0))`` the smaller tail,
    ``p = min(1, 2 (t + 1) / (R' + 1))``: twice the one-sided Monte Carlo p-value with the
    usual add-one correction (Davison and Hinkley, *Bootstrap Methods and their
    Application*, 1997, eq. 4.11), i.e. about the smallest ``1 - confidence`` at which the
    percentile interval of ``d`` excludes 0 (Efron and Tibshirani 1993, ch. 15-16), and
    never 0. Identical models give ``d = 0`` everywhere and p = 1. When no resample reached
    zero (t = 0) p is :func:`p_floor` ``(R')``, the smallest value R' resamples can show:
    the flag is True and :func:`format_p` prints ``"≤ ..."``. (NaN, False) when no
    difference is defined."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return float("nan"), False
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    return min(1.0, 2.0 * (tail + 1) / (d.size + 1)), tail == 0


ANALYTIC_P_FLOOR = 1e-4
""":func:`format_p` writes an analytic p-value (no ``n_resamples``) below this as ``< 0.0001``."""


def format_p(p: float, n_resamples: int | None = None, upper_bound: bool = False) -> str:
    """A p-value as text, never ``0.000``.

    With ``n_resamples`` R (a bootstrap p-value), a p at or below ``2 / (R + 1)`` (no
    resample reached zero) is written ``"≤ x"``, x being ``2 / (R + 1)`` rounded UP to one
    significant digit (R = 10000: ``"≤ 0.0002"``; R = 2000: ``"≤ 0.001"``), so the text stays
    a true bound. Without R (an analytic p-value, e.g. DeLong's), p below 1e-4 is
    ``"< 0.0001"``. Other values get two significant digits (``0.34``, ``0.046``,
    ``0.0012``; ``1.00``). ``upper_bound`` marks a value known only as a bound (a
    Holm-adjusted value computed from floored p-values): it is written ``"≤ x"`` too. NaN or
    None: ``"n/a"``."""
    if p is None or not math.isfinite(p):
        return "n/a"
    if n_resamples is not None and p <= p_floor(n_resamples) * (1 + 1e-9):
        return f"≤ {_round_up_1sig(p_floor(n_resamples))}"
    if n_resamples is None and p < ANALYTIC_P_FLOOR:
        return f"< {_round_up_1sig(ANALYTIC_P_FLOOR)}"
    digits = max(2, 1 - math.floor(math.log10(p)))
    text = f"{p:.{digits}f}"
    return f"≤ {text}" if upper_bound else text


def _round_up_1sig(x: float) -> str:
    """``x`` > 0 rounded up to one significant digit, as a decimal: 0.00049975 -> '0.0005'."""
    exponent = math.floor(math.log10(x))
    digit = math.ceil(x / 10.0 ** exponent - 1e-9)
    if digit == 10:
        digit, exponent = 1, exponent + 1
    return f"{digit * 10.0 ** exponent:.{max(0, -exponent)}f}"
