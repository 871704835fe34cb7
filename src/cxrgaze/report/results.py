"""The :class:`Report`: every number of the report's tables, per variant, and its JSON views.

:func:`cxrgaze.report.build_report` fills it; :meth:`Report.to_json` is ``results.json`` and
:meth:`Report.headline` the short headline file for ``dvc metrics show``. Also the constants
the other report modules share: the references every variant is compared with, the key of
the macro rows, and the columns of ``paired.csv``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrgaze import CLASSES
from cxrgaze.evaluation.bootstrap import Interval
from cxrgaze.evaluation.operating_point import DEFAULT_SPECIFICITY

REFERENCES = ("unet", "baseline")
"""Every variant is compared with these (when they were evaluated)."""

MACRO = "macro"
PAIRED_COLUMNS = ("reference", "variant", "target", "diff", "ci_low", "ci_high", "p_bootstrap", "p_bootstrap_at_floor",
                  "p_holm", "p_holm_is_bound", "p_delong", "se_delong", "n_valid")
"""The columns of ``paired.csv``, one row per (reference, variant, target)."""


@dataclass
class Report:
    variants: list[str]
    metrics: dict[str, dict[str, Any]]
    """Variant -> evaluation metrics (``<eval_root>/<v>/metrics.json``)."""
    paired: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """Variant -> reference -> the macro row: ``difference``, ``low``, ``high``, ``p_value``
    (bootstrap), ``p_holm``, ``p_delong``, ``n_valid`` (read by ``experiment.log_report``)."""
    n_resamples: int = 2000
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    """One row per (reference, variant, target) with the :data:`PAIRED_COLUMNS`."""
    calibration: dict[str, dict[str, float]] = field(default_factory=dict)
    """Variant -> ``brier``, ``ece_top_label``, ``ece_<class>`` (test split)."""
    sensitivity: dict[str, dict[str, Interval]] = field(default_factory=dict)
    """Variant -> class -> sensitivity at ``specificity`` with its bootstrap interval (test)."""
    seed_spread: dict[str, dict[str, float]] = field(default_factory=dict)
    """Variant -> ``n_seeds``, ``seed_mean``, ``seed_sd`` (test macro AUC over seeds, SD with
    n - 1; NaN for one seed) and ``ensemble`` (macro AUC of the seed-averaged scores)."""
    scoring: dict[str, str] = field(default_factory=dict)
    """Variant -> ``"sigmoid"`` or ``"softmax"``."""
    classes: tuple[str, ...] = CLASSES
    specificity: float = DEFAULT_SPECIFICITY
    confidence: float = 0.95
    tuning: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Variant -> its Optuna study's result (best values, trials by state), for the tuned
    variants (``metrics/tune.json``); see :func:`cxrgaze.report.load.read_tuning`."""

    def headline(self) -> dict[str, dict[str, Any]]:
        """Per variant the numbers an experiment is compared by (``dvc exp show``): test macro
        AUC with its CI, validation macro AUC, the difference to ``baseline`` with its Holm
        p-value, and the trained generator map's CC with the gaze; undefined ones left out."""
        out = {}
        for v in self.variants:
            m, vs_baseline = self.metrics[v], self.paired.get(v, {}).get("baseline", {})
            entry = {k: m.get(k) for k in ("test_auc_macro", "test_auc_macro_ci95_low", "test_auc_macro_ci95_high",
                                           "val_auc_macro")}
            entry.update(diff_vs_baseline=vs_baseline.get("difference"), p_holm_vs_baseline=vs_baseline.get("p_holm"),
                         test_generator_gaze_cc=m.get("test_sal_generator_cc"))
            out[v] = {k: x for k, x in ((k, _clean(x)) for k, x in entry.items()) if x is not None}
        return out

    def to_json(self) -> dict[str, Any]:
        """Flat per-variant numbers of every table."""
        return {v: {k: _clean(x) for k, x in self._json_entry(v).items()} for v in self.variants}

    def _json_entry(self, v: str) -> dict[str, Any]:
        m = self.metrics[v]
        entry = {k: m.get(k) for k in ("test_auc_macro", "test_auc_macro_ci95_low", "test_auc_macro_ci95_high",
                                       "val_auc_macro", "test_accuracy")}
        entry.update({f"test_auc_{c}": m.get(f"test_auc_{c}") for c in self.classes})
        for ref, p in self.paired.get(v, {}).items():
            entry.update({f"diff_vs_{ref}": p["difference"], f"diff_vs_{ref}_low": p["low"],
                          f"diff_vs_{ref}_high": p["high"], f"p_vs_{ref}": p["p_value"],
                          f"p_holm_vs_{ref}": p["p_holm"], f"p_delong_vs_{ref}": p["p_delong"]})
        entry.update(self.calibration.get(v, {}))
        for c, iv in self.sensitivity.get(v, {}).items():
            key = f"sens_at_spec{round(100 * self.specificity)}_{c}"
            entry.update({key: iv.estimate, f"{key}_low": iv.low, f"{key}_high": iv.high})
        spread = self.seed_spread.get(v, {})
        entry.update({f"test_auc_macro_{k}": x for k, x in spread.items() if k != "n_seeds"})
        entry["n_seeds"] = spread.get("n_seeds")
        for name in ("mask", "generator", "gradcam"):
            for metric in ("cc", "nss", "marker_mass"):
                entry[f"sal_{name}_{metric}"] = m.get(f"test_sal_{name}_{metric}")
        return entry


def _clean(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return int(value) if isinstance(value, np.integer) else value
