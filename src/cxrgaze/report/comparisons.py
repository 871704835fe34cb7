"""Paired comparisons of the variants on the same test cases.

Which pairs (:func:`comparison_pairs`: every variant against ``unet`` and against
``baseline``), the rows of one pair (:func:`compare`: paired bootstrap and DeLong, macro and
per class) and Holm's adjustment over the whole family of rows (:func:`holm_family`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cxrgaze.evaluation.delong import delong_test
from cxrgaze.evaluation.multiplicity import holm
from cxrgaze.evaluation.paired import paired_auc_bootstrap
from cxrgaze.evaluation.scores import SplitScores
from cxrgaze.report.results import REFERENCES


def comparison_pairs(variants: list[str]) -> list[tuple[str, str]]:
    """``(reference, variant)`` pairs: every variant against every evaluated reference of
    :data:`REFERENCES`, itself excluded. Two references are compared once: the one listed
    first against the other (``unet`` against ``baseline``, not the mirror)."""
    refs = [r for r in REFERENCES if r in variants]
    return [(ref, v) for ref in refs for v in variants
            if v != ref and not (v in refs and REFERENCES.index(v) > REFERENCES.index(ref))]


def _aligned_scores(case: SplitScores, ref: SplitScores, where: str) -> np.ndarray:
    """``ref``'s scores (N, K) in the case order of ``case``; an error unless both hold the
    same cases with the same labels."""
    if len(case.dicom_ids) != len(ref.dicom_ids) or set(case.dicom_ids) != set(ref.dicom_ids):
        raise ValueError(f"{where}: evaluated on different test cases; re-run their evaluate stages on the same split")
    order = pd.Index(ref.dicom_ids).get_indexer(case.dicom_ids)
    if (ref.labels[order] != case.labels).any():
        raise ValueError(f"{where}: the same test cases carry different labels")
    return ref.scores[order]


def compare(tests: dict[str, SplitScores], reference: str, variant: str, classes: tuple[str, ...],
            n_resamples: int, seed: int, confidence: float) -> list[dict[str, Any]]:
    """Rows (macro, then per class) of ``variant`` minus ``reference`` on the test cases:
    paired bootstrap (:func:`paired_auc_bootstrap`) and DeLong (:func:`delong_test`)."""
    case = tests[variant]
    ref_scores = _aligned_scores(case, tests[reference], f"{variant} and {reference}")
    boot = paired_auc_bootstrap(case.labels, case.scores, ref_scores, n_resamples, confidence, seed, classes)
    dl = delong_test(case.labels, case.scores, ref_scores, classes)
    return [{"reference": reference, "variant": variant, "target": target, "diff": b.difference, "ci_low": b.low,
             "ci_high": b.high, "p_bootstrap": b.p_value, "p_bootstrap_at_floor": b.p_at_floor,
             "p_delong": dl[target].p_value, "se_delong": dl[target].se, "n_valid": b.n_valid}
            for target, b in boot.items()]


def holm_family(rows: list[dict[str, Any]]) -> None:
    """Add ``p_holm`` (Holm over ALL rows' bootstrap p-values) and ``p_holm_is_bound`` to each
    row. A floored bootstrap p is only known to lie below its floor, so an adjusted value
    that changes when the floored p-values are set to 0 is an upper bound (printed ``< x``)."""
    p = np.array([r["p_bootstrap"] for r in rows], dtype=np.float64)
    floored = np.array([r["p_bootstrap_at_floor"] for r in rows], dtype=bool)
    upper, lower = holm(p), holm(np.where(floored, 0.0, p))
    for row, value, bound in zip(rows, upper, upper > lower):
        row.update(p_holm=float(value), p_holm_is_bound=bool(bound))
