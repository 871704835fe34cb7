"""Evaluation figures as ``matplotlib.figure.Figure`` objects on an Agg canvas.

No pyplot (no global figure state): every function returns a new Figure, which the
caller saves (``fig.savefig(path)``) or logs (``mlflow.log_figure``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import confusion_matrix, roc_curve

from cxrgaze.evaluation.calibration import DEFAULT_BINS, reliability_per_class, reliability_top_label
from cxrgaze.metrics import auc_per_class

PANEL_COLUMNS: tuple[str, ...] = ("input", "Grad-CAM", "gaze", "decoder mask", "generator map")
HEATMAP_ALPHA = 0.5
HEATMAP_CMAP = "jet"


@dataclass
class PanelRow:
    """One case of :func:`heatmap_panel`: the grey image and its heatmaps, all (H, W).

    Heatmaps are drawn on a fixed [0, 1] colour scale; ``None`` shows as "n/a".
    ``prob`` is the predicted class's score (the training objective's: a sigmoid per class or a softmax).
    """

    image: np.ndarray
    gradcam: np.ndarray | None
    gaze: np.ndarray | None
    mask: np.ndarray | None
    generator: np.ndarray | None
    true_label: str
    pred_label: str
    prob: float
    dicom_id: str


def heatmap_panel(rows: Sequence[PanelRow]) -> Figure:
    """One row per case: input | Grad-CAM | gaze | decoder mask | generator map.

    Each heatmap is overlaid on the grey image; the row's label gives the shortened
    DICOM id, the true label, the prediction with its probability, and right/wrong.
    """
    if not rows:
        raise ValueError("heatmap_panel needs at least one row")
    n_cols = len(PANEL_COLUMNS)
    fig = _figure((2.2 * n_cols, 2.3 * len(rows)))
    axes = fig.subplots(len(rows), n_cols, squeeze=False)  # (R, C)
    for r, row in enumerate(rows):
        maps = (row.gradcam, row.gaze, row.mask, row.generator)
        axes[r, 0].imshow(row.image, cmap="gray", vmin=0.0, vmax=1.0)
        for ax, heat in zip(axes[r, 1:], maps):
            if heat is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, color="grey")
                ax.set_box_aspect(row.image.shape[0] / row.image.shape[1])  # as the image's panels
            else:
                ax.imshow(row.image, cmap="gray", vmin=0.0, vmax=1.0)
                ax.imshow(heat, cmap=HEATMAP_CMAP, alpha=HEATMAP_ALPHA, vmin=0.0, vmax=1.0)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        right = row.true_label == row.pred_label
        axes[r, 0].set_ylabel(
            f"{_short_id(row.dicom_id)}\ntrue {row.true_label}\n"
            f"pred {row.pred_label} ({row.prob:.2f})\n{'right' if right else 'wrong'}",
            fontsize=8,
            color="tab:green" if right else "tab:red",
        )
    for ax, title in zip(axes[0], PANEL_COLUMNS):
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def roc_curves(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> Figure:
    """One-vs-rest ROC curve of each class, its AUC in the legend.

    ``y_true`` (N,) class indices, ``probs`` (N, K). A class with only one kind of label
    has no curve and is listed as "no AUC".
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)  # (N, K)
    aucs = auc_per_class(y_true, probs)  # (K,)
    fig = _figure((4.5, 4.5))
    ax = fig.add_subplot()
    for k, name in enumerate(class_names):
        if np.isnan(aucs[k]):
            ax.plot([], [], label=f"{name} (no AUC)")
            continue
        fpr, tpr, _ = roc_curve(y_true == k, probs[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC {aucs[k]:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title="ROC, one vs rest")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def confusion_matrix_figure(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Confusion matrix of counts, rows = true class, columns = predicted class."""
    k = len(class_names)
    counts = confusion_matrix(y_true, y_pred, labels=np.arange(k))  # (K, K)
    fig = _figure((1.2 * k + 2.0, 1.2 * k + 1.5))
    ax = fig.add_subplot()
    ax.imshow(counts, cmap="Blues", vmin=0)
    dark = counts.max() / 2 if counts.max() else 1
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if counts[i, j] > dark else "black")
    ax.set_xticks(range(k), class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    fig.tight_layout()
    return fig


def reliability_diagram(y_true: np.ndarray, scores: np.ndarray, class_names: Sequence[str],
                        n_bins: int = DEFAULT_BINS) -> Figure:
    """Reliability diagram: top-label (left) and one-vs-rest per class (right), counts below.

    ``y_true`` (N,) class indices, ``scores`` (N, K) in [0, 1] (sigmoid or softmax). Left:
    accuracy of the arg-max in each of ``n_bins`` equal-width bins of the top-label
    confidence (the maximum score) as bars, the bins' mean confidence as dots, the
    diagonal for perfect calibration, the top-label ECE in the title. Right: each class's
    observed frequency against its mean score per non-empty bin, its ECE in the legend
    (definitions: :mod:`cxrgaze.evaluation.calibration`). Bottom: cases per bin.
    """
    top = reliability_top_label(y_true, scores, n_bins)
    per_class = reliability_per_class(y_true, scores, n_bins)
    fig = _figure((9.0, 5.5))
    axes = fig.subplots(2, 2, sharex="col", gridspec_kw={"height_ratios": [3, 1]})  # (2, 2)
    width, centres = np.diff(top.edges), top.edges[:-1] + np.diff(top.edges) / 2
    axes[0, 0].bar(top.edges[:-1], np.nan_to_num(top.accuracy), width=width, align="edge", edgecolor="white",
                   color="tab:blue", label="accuracy")
    axes[0, 0].plot(centres, top.confidence, "o", color="tab:orange", markersize=4, label="mean confidence")
    axes[0, 0].set(title=f"top label (ECE {top.ece:.3f})", ylabel="accuracy of the arg-max")
    axes[1, 0].bar(top.edges[:-1], top.counts, width=width, align="edge", edgecolor="white", color="grey")
    axes[1, 0].set(xlabel="confidence (max score)", ylabel="cases")
    for name, bins in zip(class_names, per_class):
        filled = bins.counts > 0
        axes[0, 1].plot(bins.confidence[filled], bins.accuracy[filled], marker=".",
                        label=f"{name} (ECE {bins.ece:.3f})")
        axes[1, 1].stairs(bins.counts, bins.edges, label=name)
    axes[0, 1].set(title="one vs rest", ylabel="observed frequency")
    axes[1, 1].set(xlabel="class score", ylabel="cases")
    for ax in axes[0]:
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def training_curves(history: Sequence[Mapping[str, Any]]) -> Figure:
    """Training loss terms (``train_*`` keys) and ``val_auc_macro`` per ``epoch``.

    ``history`` is the training loop's list of per-epoch records (``epoch`` counts from 0);
    the axis shows 1-based epoch numbers, as the console and MLflow do. A key missing from
    an epoch leaves a gap.
    """
    epochs = [int(rec.get("epoch", i)) + 1 for i, rec in enumerate(history)]
    train_keys = list(dict.fromkeys(k for rec in history for k in rec if k.startswith("train_")))
    fig = _figure((10, 3.8))
    loss_ax, auc_ax = fig.subplots(1, 2)
    for key in train_keys:
        loss_ax.plot(epochs, _series(history, key), marker=".", label=key.removeprefix("train_"))
    loss_ax.set(xlabel="epoch", ylabel="loss", title="training loss terms")
    if train_keys:
        loss_ax.legend(fontsize=8)
    auc_ax.plot(epochs, _series(history, "val_auc_macro"), marker=".", color="tab:green")
    auc_ax.set(xlabel="epoch", ylabel="AUC", title="validation macro AUC")
    for ax in (loss_ax, auc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def select_panel_cases(y_true: np.ndarray, y_pred: np.ndarray, per_class: int = 2, seed: int = 0) -> list[int]:
    """Indices of up to ``per_class`` right and ``per_class`` wrong cases of every true
    class, drawn at random (fixed by ``seed``), sorted."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for k in np.unique(y_true):
        of_class = y_true == k
        for pool in (np.flatnonzero(of_class & (y_pred == k)), np.flatnonzero(of_class & (y_pred != k))):
            chosen.extend(rng.choice(pool, size=min(per_class, pool.size), replace=False).tolist())
    return sorted(chosen)


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _series(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([rec.get(key, np.nan) for rec in history], dtype=np.float64)


def _short_id(dicom_id: str, keep: int = 8) -> str:
    return dicom_id if len(dicom_id) <= keep + 3 else f"{dicom_id[:keep]}..."
