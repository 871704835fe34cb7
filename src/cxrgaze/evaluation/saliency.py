"""Agreement of a heatmap with radiologist gaze: the MIT saliency benchmark metrics.

Definitions follow Bylinskii et al., "What do different evaluation metrics tell us about
saliency models?" (TPAMI 2019) and the benchmark's MATLAB code, for one saliency map ``s``
(H, W) at any non-negative scale (every metric is invariant to multiplying ``s`` by a
positive constant) against a gaze heatmap ``g`` (H, W) of the same shape, fixations
``fix_xy`` (F, 2) or boxes (B, 4):

- ``cc``: Pearson correlation of ``s`` and ``g`` (higher is better, 1 at best).
- ``kl``: KL divergence of ``g`` from ``s`` (lower is better, 0 at best).
- ``sim``: histogram intersection of ``s`` and ``g`` as distributions, each map divided
  by its sum (the paper's definition; 1 at best).
- ``sim_benchmark``: the same intersection after min-max rescaling each map to [0, 1]
  first (the benchmark's MATLAB ``similarity.m``; 1 at best). Not the same number as
  ``sim``: the rescaling removes any constant offset, so a map whose every pixel is
  lifted by ``c > 0`` keeps its ``sim_benchmark`` and loses ``sim``.
- ``nss``: mean standardised ``s`` at the fixated pixels (higher is better).
- ``auc_judd``: ROC area with the fixated pixels as positives (1 at best, 0.5 chance).
- ``box_mass``: share of the mass of ``s`` inside the union of boxes (1 at best).

Pixel coordinates (fixations, boxes) are pixel indices, x = column and y = row, with the
pixel-centre convention of :mod:`cxrgaze.data.gaze`: pixel ``(i, j)`` is centred on
``x = j, y = i``. A fixation goes to its nearest pixel (``floor(x + 0.5)``), clipped inside
the image; as in the benchmark's binary fixation map, a pixel fixated several times
counts once in ``nss`` and ``auc_judd``.

A constant map ``s = c`` (every pixel the same) says nothing about where to look; each
metric's value for it follows from its definition (tested in ``tests/test_saliency.py``):

- ``cc``: NaN (the map has no variance; the benchmark's ``CC.m`` divides by its std).
- ``kl``: finite, ``sum q log(EPS + q / (1/N + EPS))`` (about ``log N - H(q)``): ``p`` is
  the uniform distribution over the N pixels.
- ``sim``: finite, ``sum min(1/N, q)``: the uniform distribution's overlap with ``q``.
- ``sim_benchmark``: NaN for ``c != 0`` (min-max rescaling divides by ``max - min = 0``,
  NaN in MATLAB too); 0 for the all-zero map, which the benchmark leaves as it is.
- ``nss``: NaN (standardising divides by a zero std).
- ``auc_judd``: 0.5 (one threshold, TP rate = FP rate = 1: the diagonal).
- ``box_mass``: the share of the pixels inside the boxes.

Per-image scores of many maps (one row per case and map, see
``cxrgaze.evaluate.saliency_table``) are averaged with :func:`average_by_map`, which
reports how many values were averaged and how many were NaN next to every mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

EPS = float(np.finfo(np.float64).eps)
"""2.2204e-16, MATLAB's ``eps``, the regulariser of the benchmark's KL divergence."""


def cc(s: np.ndarray, g: np.ndarray) -> float:
    """Pearson correlation of the map ``s`` and the gaze heatmap ``g`` (both (H, W)).

    NaN when either map is constant.
    """
    s, g = _pair(s, g)
    if np.ptp(s) == 0 or np.ptp(g) == 0:
        return math.nan
    sc, gc = s - s.mean(), g - g.mean()
    return float((sc * gc).sum() / math.sqrt((sc * sc).sum() * (gc * gc).sum()))


def kl(s: np.ndarray, g: np.ndarray) -> float:
    """KL divergence of ``g`` from ``s``: ``sum q * log(EPS + q / (p + EPS))``.

    ``p`` and ``q`` are ``s`` and ``g`` divided by their sums; as in the benchmark, an
    all-zero map is left as it is (an all-zero ``g`` scores 0).
    """
    s, g = _pair(s, g, non_negative=True)
    p = s / s.sum() if s.any() else s
    q = g / g.sum() if g.any() else g
    return float((q * np.log(EPS + q / (p + EPS))).sum())


def sim(s: np.ndarray, g: np.ndarray) -> float:
    """Histogram intersection ``sum min(s / sum s, g / sum g)`` (the paper's SIM).

    NaN when either map sums to 0. The benchmark's MATLAB code min-max rescales both
    maps before dividing by the sums (that is :func:`sim_benchmark`); here, as in the
    paper, they are used as they are, so a constant offset in ``s`` lowers the score.
    A constant ``s > 0`` is the uniform distribution: ``sum min(1/N, g / sum g)``.
    """
    s, g = _pair(s, g, non_negative=True)
    s_sum, g_sum = s.sum(), g.sum()
    if s_sum == 0 or g_sum == 0:
        return math.nan
    return float(np.minimum(s / s_sum, g / g_sum).sum())


def sim_benchmark(s: np.ndarray, g: np.ndarray) -> float:
    """SIM as the MIT saliency benchmark's ``similarity.m`` computes it.

    Each map that is not all zero is min-max rescaled to [0, 1] and then divided by its
    sum; the score is ``sum min(s', g')``. Maps may have any real values (the rescaling
    removes the offset). As in the MATLAB code, an all-zero map stays zero (so the
    score is 0 against any ``g``), and a constant map ``c != 0`` rescales to NaN (0/0),
    so the score is NaN. Invariant to ``s -> a * s + b`` for ``a > 0``, unlike :func:`sim`.
    """
    s, g = _pair(s, g)
    s_norm, g_norm = _range_then_sum(s), _range_then_sum(g)
    if s_norm is None or g_norm is None:
        return math.nan
    return float(np.minimum(s_norm, g_norm).sum())


def _range_then_sum(m: np.ndarray) -> np.ndarray | None:
    """``(m - min) / (max - min)`` divided by its sum; the all-zero map as it is; None
    (NaN in MATLAB) for a constant non-zero map."""
    if not m.any():
        return m
    span = m.max() - m.min()
    if span == 0:
        return None
    m = (m - m.min()) / span
    return m / m.sum()


def nss(s: np.ndarray, fix_xy: np.ndarray) -> float:
    """Mean of ``(s - mean) / std`` at the fixated pixels (``std`` with N - 1, as MATLAB).

    ``fix_xy`` (F, 2) pixel coordinates x, y. NaN when ``s`` is constant or there are
    no fixations.
    """
    s = _map(s, "s")
    pixels = _fixated_pixels(fix_xy, s.shape)  # (F',) flat indices
    if pixels.size == 0 or s.size < 2 or np.ptp(s) == 0:
        return math.nan
    z = (s - s.mean()) / s.std(ddof=1)  # (H, W)
    return float(z.ravel()[pixels].mean())


def auc_judd(s: np.ndarray, fix_xy: np.ndarray) -> float:
    """Judd's ROC area: fixated pixels are positives, every other pixel a negative.

    The thresholds are the map's values at the fixated pixels; at threshold ``t`` the TP
    rate is the share of fixated pixels with ``s >= t`` and the FP rate the share of the
    other pixels with ``s >= t``; the curve gets (0, 0) and (1, 1) added and is
    integrated with the trapezoid rule. Without ties among the fixated values this is
    the benchmark's ``AUC_Judd`` with ``jitter = 0``. The benchmark jitters the map to
    break ties instead (its TP rate counts thresholds, not pixels, and goes wrong on
    ties); here ties are counted with the ``>=`` rule, with no randomness, so a constant
    map scores 0.5. NaN when there are no fixations or every pixel is fixated.
    """
    s = _map(s, "s")
    pixels = _fixated_pixels(fix_xy, s.shape)  # (F',)
    n_fix, n_pix = pixels.size, s.size
    if n_fix == 0 or n_fix == n_pix:
        return math.nan
    values = s.ravel()  # (N,)
    at_fix = np.sort(values[pixels])  # (F',)
    thresholds = np.unique(at_fix)[::-1]  # (T,) descending
    above_all = n_pix - np.searchsorted(np.sort(values), thresholds, side="left")  # (T,) s >= t
    above_fix = n_fix - np.searchsorted(at_fix, thresholds, side="left")  # (T,)
    tp = np.concatenate(([0.0], above_fix / n_fix, [1.0]))  # (T + 2,)
    fp = np.concatenate(([0.0], (above_all - above_fix) / (n_pix - n_fix), [1.0]))
    return float(np.trapezoid(tp, fp))


def box_mass(s: np.ndarray, boxes: np.ndarray) -> float:
    """Share of the total of ``s`` on pixels whose centre lies inside any box.

    ``boxes`` (B, 4) as ``x1, x2, y1, y2`` pixel coordinates, edges included (the
    ``boxes.csv`` order). NaN when ``s`` sums to 0 or there are no boxes.
    """
    s = _map(s, "s", non_negative=True)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # (B, 4)
    total = s.sum()
    if boxes.shape[0] == 0 or total == 0:
        return math.nan
    x_lo, x_hi = np.minimum(boxes[:, 0], boxes[:, 1]), np.maximum(boxes[:, 0], boxes[:, 1])  # (B,)
    y_lo, y_hi = np.minimum(boxes[:, 2], boxes[:, 3]), np.maximum(boxes[:, 2], boxes[:, 3])
    cols, rows = np.arange(s.shape[1]), np.arange(s.shape[0])
    in_x = (cols >= x_lo[:, None]) & (cols <= x_hi[:, None])  # (B, W)
    in_y = (rows >= y_lo[:, None]) & (rows <= y_hi[:, None])  # (B, H)
    inside = (in_y[:, :, None] & in_x[:, None, :]).any(axis=0)  # (H, W)
    return float(s[inside].sum() / total)


def saliency_scores(
    s: np.ndarray, g: np.ndarray, fix_xy: np.ndarray, boxes: np.ndarray | None = None
) -> dict[str, float]:
    """``cc``, ``kl``, ``sim``, ``sim_benchmark``, ``nss``, ``auc_judd`` (and ``box_mass``
    when ``boxes`` are given)."""
    scores = {
        "cc": cc(s, g),
        "kl": kl(s, g),
        "sim": sim(s, g),
        "sim_benchmark": sim_benchmark(s, g),
        "nss": nss(s, fix_xy),
        "auc_judd": auc_judd(s, fix_xy),
    }
    if boxes is not None:
        scores["box_mass"] = box_mass(s, boxes)
    return scores


def mean_scores(scores: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each key over the score dicts, NaN (and missing) values left out, plus ``n``
    (the number of dicts). A key with no finite value at all averages to NaN."""
    keys = list(dict.fromkeys(k for one in scores for k in one))
    out: dict[str, float] = {}
    for key in keys:
        values = np.array([one.get(key, math.nan) for one in scores], dtype=np.float64)
        values = values[~np.isnan(values)]
        out[key] = float(values.mean()) if values.size else math.nan
    out["n"] = len(scores)
    return out


def average_by_map(
    table: pd.DataFrame,
    prefix: str = "",
    map_column: str = "map",
    id_columns: Iterable[str] = ("dicom_id",),
) -> dict[str, float]:
    """Average a per-image metric table into flat metrics, with counts next to each mean.

    ``table`` has one row per (image, map): an id column (``dicom_id``), ``map`` (the
    map's name) and one numeric column per metric, as ``cxrgaze.evaluate.saliency_table``
    writes it. For every map and metric column it returns

    - ``{prefix}{map}_{metric}``: the mean of the finite values (NaN when there is none),
    - ``{prefix}{map}_{metric}_n``: how many finite values that mean averages,
    - ``{prefix}{map}_{metric}_nan``: how many values were left out because they are NaN
      (or infinite): an undefined metric (a constant map's CC, an image without
      fixations) is never dropped silently, ``_n + _nan`` is the map's number of rows.

    Maps keep their order of first appearance; counts are floats, like every metric.
    """
    skip = {map_column, *id_columns}
    columns = [c for c in table.columns if c not in skip]
    out: dict[str, float] = {}
    for name, group in table.groupby(map_column, sort=False):
        for column in columns:
            values = group[column].to_numpy(np.float64)  # (rows,)
            finite = np.isfinite(values)
            n = int(finite.sum())
            key = f"{prefix}{name}_{column}"
            out[key] = float(values[finite].mean()) if n else math.nan
            out[f"{key}_n"] = float(n)
            out[f"{key}_nan"] = float(values.size - n)
    return out


def _map(s: np.ndarray, name: str, non_negative: bool = False) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"{name} must be a non-empty (H, W) map, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} has non-finite values")
    if non_negative and (s < 0).any():
        raise ValueError(f"{name} has negative values")
    return s


def _pair(s: np.ndarray, g: np.ndarray, non_negative: bool = False) -> tuple[np.ndarray, np.ndarray]:
    s, g = _map(s, "s", non_negative), _map(g, "g", non_negative)
    if s.shape != g.shape:
        raise ValueError(f"map shapes differ: s {s.shape}, g {g.shape}")
    return s, g


def _fixated_pixels(fix_xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Distinct flat indices of the pixels nearest the fixations, clipped inside ``shape``."""
    fix = np.asarray(fix_xy, dtype=np.float64).reshape(-1, 2)  # (F, 2) x, y
    if not np.isfinite(fix).all():
        raise ValueError("fixation coordinates must be finite")
    h, w = shape
    cols = np.clip(np.floor(fix[:, 0] + 0.5), 0, w - 1).astype(np.int64)  # (F,)
    rows = np.clip(np.floor(fix[:, 1] + 0.5), 0, h - 1).astype(np.int64)
    return np.unique(rows * w + cols)
