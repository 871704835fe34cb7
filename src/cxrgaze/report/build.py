"""Building the :class:`~cxrgaze.report.results.Report`: :func:`build_report` loads every
variant's evaluation, runs the paired comparisons and adds the per-variant summaries of the
test split: calibration (:func:`calibration_summary`), sensitivity at a fixed specificity
and the spread over training seeds (:func:`seed_spread`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from cxrgaze.evaluation.bootstrap import macro
from cxrgaze.evaluation.calibration import brier_score, ece_per_class, ece_top_label
from cxrgaze.evaluation.operating_point import DEFAULT_SPECIFICITY, sensitivity_ci
from cxrgaze.evaluation.scores import SplitScores
from cxrgaze.metrics import auc_per_class
from cxrgaze.report.comparisons import compare, comparison_pairs, holm_family
from cxrgaze.report.load import _common_classes, load_eval
from cxrgaze.report.results import MACRO, Report


def calibration_summary(test: SplitScores, classes: tuple[str, ...]) -> dict[str, float]:
    """``brier`` (mean one-vs-rest Brier), ``ece_top_label`` and ``ece_<class>`` of a split
    (:mod:`cxrgaze.evaluation.calibration`, 15 bins)."""
    out = {"brier": brier_score(test.labels, test.scores), "ece_top_label": ece_top_label(test.labels, test.scores)}
    out.update({f"ece_{c}": float(e) for c, e in zip(classes, ece_per_class(test.labels, test.scores))})
    return out


def seed_spread(test: SplitScores) -> dict[str, float]:
    """Test macro AUC per seed (``scores_per_seed``): ``n_seeds``, ``seed_mean``, ``seed_sd``
    (n - 1 divisor, NaN for one seed), and ``ensemble``: the macro AUC of the seed-averaged
    ``scores``."""
    per_seed = macro(np.stack([auc_per_class(test.labels, s) for s in test.scores_per_seed]))  # (S,)
    n = len(per_seed)
    return {"n_seeds": n, "seed_mean": float(per_seed.mean()),
            "seed_sd": float(per_seed.std(ddof=1)) if n > 1 else math.nan,
            "ensemble": float(macro(auc_per_class(test.labels, test.scores)[None])[0])}


def build_report(eval_root: str | Path, variants: list[str], n_resamples: int = 2000, seed: int = 0,
                 confidence: float = 0.95, specificity: float = DEFAULT_SPECIFICITY,
                 tuning: dict[str, dict[str, Any]] | None = None) -> Report:
    """Collect every variant's evaluation, run the paired comparisons (with the Holm
    adjustment over all of them), calibration, sensitivity at ``specificity`` and seed
    spread on the test split; ``tuning`` (:func:`cxrgaze.report.load.read_tuning`) says which variants were
    tuned, with what budget."""
    loaded = {v: load_eval(eval_root, v) for v in variants}
    classes = _common_classes(eval_root, {v: s for v, (_, s) in loaded.items()})
    tests = {v: s["test"] for v, (_, s) in loaded.items()}
    report = Report(variants=list(variants), metrics={v: m for v, (m, _) in loaded.items()}, n_resamples=n_resamples,
                    scoring={v: s.scoring for v, (_, s) in loaded.items()}, classes=classes, specificity=specificity,
                    confidence=confidence, tuning=dict(tuning or {}))
    for ref, v in comparison_pairs(report.variants):
        report.comparisons += compare(tests, ref, v, classes, n_resamples, seed, confidence)
    holm_family(report.comparisons)
    for row in (r for r in report.comparisons if r["target"] == MACRO):
        report.paired.setdefault(row["variant"], {})[row["reference"]] = {
            "difference": row["diff"], "low": row["ci_low"], "high": row["ci_high"], "p_value": row["p_bootstrap"],
            "p_holm": row["p_holm"], "p_delong": row["p_delong"], "n_valid": row["n_valid"]}
    for v, test in tests.items():
        report.calibration[v] = calibration_summary(test, classes)
        report.sensitivity[v] = sensitivity_ci(test.labels, test.scores, specificity, n_resamples, confidence, seed,
                                               classes)
        report.seed_spread[v] = seed_spread(test)
    return report
