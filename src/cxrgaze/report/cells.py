"""The text of ``results.md``'s cells: numbers, intervals, p-values and seed spreads, and a
Markdown table from its header and rows ("n/a" for what is undefined).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cxrgaze.evaluation.paired import format_p
from cxrgaze.report.results import Report


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(x)


def _num(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "n/a"


def _ci(m: dict[str, Any], key: str) -> str:
    value, low, high = m.get(key, math.nan), m.get(f"{key}_ci95_low", math.nan), m.get(f"{key}_ci95_high", math.nan)
    if not _finite(value):
        return "n/a"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if _finite(low) and _finite(high) else f"{value:.3f}"


def _interval(value: float, low: float, high: float, sign: str = "") -> str:
    if not _finite(value):
        return "n/a"
    text = f"{value:{sign}.3f}"
    return f"{text} [{low:{sign}.3f}, {high:{sign}.3f}]" if _finite(low) and _finite(high) else text


def _level(report: Report) -> str:
    return f"{100 * report.confidence:g}% CI"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            + ["| " + " | ".join(row) + " |" for row in rows])


def _p_texts(row: dict[str, Any]) -> list[str]:
    """Bootstrap, Holm and DeLong p-values of a comparison row as text (:func:`format_p`)."""
    return [format_p(row["p_bootstrap"], row["n_valid"]),
            format_p(row["p_holm"], row["n_valid"], upper_bound=row["p_holm_is_bound"]), format_p(row["p_delong"])]


def _seed_text(spread: dict[str, float]) -> str:
    if not spread:
        return "n/a"
    if spread["n_seeds"] == 1:
        return "1 seed"
    return f"{spread['seed_mean']:.3f} ± {spread['seed_sd']:.3f} ({spread['n_seeds']} seeds)"
