"""Evaluation figures: each renders to a PNG; panel case selection."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from cxrgaze import CLASSES
from cxrgaze.evaluation.figures import (
    PanelRow,
    confusion_matrix_figure,
    heatmap_panel,
    roc_curves,
    select_panel_cases,
    training_curves,
)

RNG = np.random.default_rng(0)


def _saves(fig: Figure, path) -> None:
    assert isinstance(fig, Figure)
    fig.savefig(path)
    assert path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _row(**changes) -> PanelRow:
    maps = {name: RNG.random((32, 32)) for name in ("image", "gradcam", "gaze", "mask", "generator")}
    fields = dict(maps, true_label="CHF", pred_label="CHF", prob=0.91,
                  dicom_id="02aa804e-bde0afdd-112c0b34-7bc16630-4e384014")
    fields.update(changes)
    return PanelRow(**fields)


def test_heatmap_panel_with_none_columns(tmp_path):
    rows = [_row(), _row(mask=None, generator=None, pred_label="Normal", prob=0.4), _row(gradcam=None, dicom_id="x")]
    fig = heatmap_panel(rows)
    assert len(fig.axes) == 3 * 5
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("n/a") == 3
    labels = [ax.get_ylabel() for ax in fig.axes[::5]]
    assert labels[0].startswith("02aa804e...") and labels[0].endswith("right")
    assert "pred Normal (0.40)" in labels[1] and labels[1].endswith("wrong")
    _saves(fig, tmp_path / "panel.png")


def test_heatmap_panel_needs_rows():
    with pytest.raises(ValueError):
        heatmap_panel([])


def test_roc_curves(tmp_path):
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    probs = RNG.dirichlet(np.ones(3), size=len(y))
    fig = roc_curves(y, probs, CLASSES)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(legend) == 3 and all("AUC" in t for t in legend)
    _saves(fig, tmp_path / "roc.png")
    one_class_missing = roc_curves(np.array([0, 1, 0, 1]), probs[:4], CLASSES)
    assert "pneumonia (no AUC)" in [t.get_text() for t in one_class_missing.axes[0].get_legend().get_texts()]


def test_confusion_matrix_figure(tmp_path):
    y_true = np.array([0, 0, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 2, 0, 2])
    fig = confusion_matrix_figure(y_true, y_pred, CLASSES)
    texts = [t.get_text() for t in fig.axes[0].texts]
    # rows = true: Normal (1, 1, 0), CHF (0, 1, 0), pneumonia (1, 0, 2)
    assert texts == ["1", "1", "0", "0", "1", "0", "1", "0", "2"]
    _saves(fig, tmp_path / "cm.png")


def test_training_curves(tmp_path):
    history = [{"epoch": e, "lr": 1e-3, "train_loss": 1.0 / (e + 1), "train_cls": 0.5 / (e + 1),
                "val_auc_macro": 0.5 + 0.1 * e, "seconds": 1.0} for e in range(4)]
    fig = training_curves(history)
    loss_ax, auc_ax = fig.axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["loss", "cls"]
    np.testing.assert_allclose(auc_ax.get_lines()[0].get_ydata(), [0.5, 0.6, 0.7, 0.8])
    assert list(auc_ax.get_lines()[0].get_xdata()) == [1, 2, 3, 4], "1-based epochs, as on the console"
    _saves(fig, tmp_path / "curves.png")


def test_select_panel_cases_covers_classes_and_is_deterministic():
    y_true = np.repeat([0, 1, 2], 10)
    y_pred = y_true.copy()
    y_pred[[0, 1, 2, 10, 11, 20, 21]] = [1, 2, 1, 0, 2, 0, 1]  # wrong cases in every class
    picked = select_panel_cases(y_true, y_pred, per_class=2, seed=3)
    assert picked == sorted(picked) and len(set(picked)) == len(picked) == 12
    for k in range(3):
        mine = [i for i in picked if y_true[i] == k]
        assert sum(y_pred[i] == k for i in mine) == 2
        assert sum(y_pred[i] != k for i in mine) == 2
    assert select_panel_cases(y_true, y_pred, per_class=2, seed=3) == picked
    assert select_panel_cases(y_true, y_pred, per_class=2, seed=4) != picked


def test_select_panel_cases_takes_what_there_is():
    y_true = np.array([0, 0, 0, 1])
    y_pred = np.array([0, 0, 0, 1])  # no wrong cases at all
    assert select_panel_cases(y_true, y_pred, per_class=5) == [0, 1, 2, 3]
    assert select_panel_cases(np.array([], dtype=int), np.array([], dtype=int)) == []
