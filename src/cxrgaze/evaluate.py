"""Evaluation of one trained model: AUCs with confidence intervals, heatmap-vs-gaze
agreement, figures. ``evaluate(checkpoint, prepared_dir, split_csv, out_dir) -> EvalResult``.

What it computes (every number is written to ``out_dir/metrics.json``):

* ``{val,test}_auc_{macro,<class>}``: one-vs-rest AUC on all cases of the split.
* ``..._ci95_low`` / ``..._ci95_high``: the standard percentile bootstrap
  (``evaluate.n_resamples`` full-size resamples, seeded).
* ``..._paper_p2.5`` / ``_p50`` / ``_p97.5``: the paper's protocol (30 resamples of 55-60
  cases): what the paper's tables print. Different numbers from the same predictions:
  the names say which is which.
* ``test_sal_<map>_<metric>``: agreement of each heatmap with the radiologist's gaze on
  the test set, averaged over images: maps ``mask`` (decoder), ``generator`` (the
  variant's own rule; guided backprop for variants without one, so that every model gets
  the same diagnostic) and ``gradcam``; metrics CC, KL, SIM, NSS, AUC-Judd, ``finding_mass``
  (share of the map inside the finding boxes) and ``marker_mass`` (inside the burned-in
  ``marker`` box of synthetic data: how much the map looks at the shortcut).

Heatmaps explain the *predicted* class. Checkpoints are chosen on validation AUC during
training; test cases are only read here.

Outputs: ``metrics.json``, ``predictions.csv`` (one row per val/test case with class
probabilities), ``saliency.csv`` (per test case and map), ``figures/`` (heatmap panel,
ROC curves, confusion matrix, training curves).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cxrgaze import CLASSES
from cxrgaze.config import ConfigError, ModelConfig, from_mapping
from cxrgaze.data.dataset import SplitTensors, load_split
from cxrgaze.metrics import auc_summary
from cxrgaze.models import GazeNet, build_model
from cxrgaze.runtime import resolve_device
from cxrgaze.train import load_checkpoint, predict_logits

MAPS = ("mask", "generator", "gradcam")
"""The heatmaps compared with gaze."""


@dataclass(frozen=True)
class EvalConfig:
    """``params.yaml: evaluate``."""

    n_resamples: int = 2000
    """Percentile bootstrap: full-size resamples."""
    confidence: float = 0.95
    paper_resamples: int = 30
    """The paper's protocol: resamples ..."""
    paper_size: tuple[int, int] = (55, 60)
    """... of a size drawn uniformly from this inclusive range."""
    seed: int = 0
    panel_per_class: int = 2
    """Heatmap panel: up to this many right and this many wrong test cases per class."""
    batch_size: int = 32
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.n_resamples < 100:
            raise ConfigError(f"evaluate.n_resamples must be at least 100, got {self.n_resamples}")
        if not 0.5 < self.confidence < 1.0:
            raise ConfigError(f"evaluate.confidence must be in (0.5, 1), got {self.confidence}")
        low, high = tuple(self.paper_size)
        if not 1 <= low <= high:
            raise ConfigError(f"evaluate.paper_size must be [low, high] with 1 <= low <= high, got {self.paper_size}")
        object.__setattr__(self, "paper_size", (int(low), int(high)))


@dataclass
class EvalResult:
    variant: str
    metrics: dict[str, float]
    out_dir: Path
    figures: dict[str, Path] = field(default_factory=dict)


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[GazeNet, dict[str, Any]]:
    """The model of a cxrgaze checkpoint in eval mode, and the checkpoint's config."""
    ckpt = load_checkpoint(checkpoint)
    config = ckpt["config"]
    variant = config["train"]["variant"]
    model = build_model(from_mapping(ModelConfig, config["model"], where=f"{checkpoint}: model"), variant=variant)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), config


def generator_rule(variant: str) -> str:
    """The generator a variant trains with; ``gbp`` for baseline and unet (a common diagnostic)."""
    from cxrgaze.losses import parse_variant

    return parse_variant(variant).rule or "gbp"


def ci_metrics(prefix: str, y: np.ndarray, probs: np.ndarray, cfg: EvalConfig) -> dict[str, float]:
    """Percentile-bootstrap CI and paper-protocol percentiles of every AUC, as flat metrics."""
    from cxrgaze.evaluation.bootstrap import paper_bootstrap, percentile_bootstrap

    out: dict[str, float] = {}
    level = int(round(cfg.confidence * 100))
    for key, iv in percentile_bootstrap(y, probs, n_resamples=cfg.n_resamples, confidence=cfg.confidence,
                                        seed=cfg.seed).items():
        out[f"{prefix}auc_{key}_ci{level}_low"] = iv.low
        out[f"{prefix}auc_{key}_ci{level}_high"] = iv.high
    for key, iv in paper_bootstrap(y, probs, n_resamples=cfg.paper_resamples, size=cfg.paper_size,
                                   seed=cfg.seed).items():
        out[f"{prefix}auc_{key}_paper_p2.5"] = iv.low
        out[f"{prefix}auc_{key}_paper_p50"] = iv.median if iv.median is not None else iv.estimate
        out[f"{prefix}auc_{key}_paper_p97.5"] = iv.high
    return out


def compute_heatmaps(model: GazeNet, images: torch.Tensor, target: torch.Tensor, rule: str,
                     device: torch.device, batch_size: int = 32) -> dict[str, np.ndarray | None]:
    """The three maps of ``images`` (N, 1, S, S) for classes ``target`` (N,): each (N, S, S)
    in [0, 1], ``mask`` None for a model without decoder."""
    from cxrgaze.explain import attribute, heatmap
    from cxrgaze.explain.gradcam import gradcam

    masks, generators, cams = [], [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device, torch.float32)
        t = target[i:i + batch_size].to(device)
        if model.has_decoder:
            with torch.no_grad():
                mask_logits, _ = model(x)
            masks.append(torch.sigmoid(mask_logits)[:, 0].float().cpu().numpy())
        generators.append(heatmap(attribute(model, x, t, rule))[:, 0].detach().float().cpu().numpy())
        cams.append(gradcam(model, x, t))
    return {"mask": np.concatenate(masks) if masks else None,
            "generator": np.concatenate(generators),
            "gradcam": np.concatenate(cams)}


def _points_and_boxes(prepared_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per dicom id: fixation points (F, 2) x,y; finding boxes (B, 4); marker boxes (B, 4)."""
    fixations = pd.read_csv(prepared_dir / "fixations.csv", dtype={"dicom_id": str})
    points = {k: g[["x", "y"]].to_numpy(np.float64) for k, g in fixations.groupby("dicom_id", sort=False)}
    findings: dict[str, np.ndarray] = {}
    markers: dict[str, np.ndarray] = {}
    boxes_csv = prepared_dir / "boxes.csv"
    if boxes_csv.exists() and boxes_csv.stat().st_size > 0:
        boxes = pd.read_csv(boxes_csv, dtype={"dicom_id": str, "bbox_name": str})
        if len(boxes):
            name = boxes["bbox_name"].str.strip().str.lower()
            cols = ["x1", "x2", "y1", "y2"]
            for k, g in boxes[name.str.startswith("finding")].groupby("dicom_id", sort=False):
                findings[k] = g[cols].to_numpy(np.float64)
            for k, g in boxes[name == "marker"].groupby("dicom_id", sort=False):
                markers[k] = g[cols].to_numpy(np.float64)
    return points, findings, markers


def saliency_table(maps: dict[str, np.ndarray | None], data: SplitTensors, prepared_dir: Path) -> pd.DataFrame:
    """One row per (case, map) with every agreement metric against that case's gaze."""
    from cxrgaze.evaluation.saliency import box_mass, saliency_scores

    points, findings, markers = _points_and_boxes(prepared_dir)
    gaze = data.gaze[:, 0].float().numpy()  # (N, S, S)
    rows = []
    for name, stack in maps.items():
        if stack is None:
            continue
        for i, dicom_id in enumerate(data.dicom_ids):
            s = stack[i]
            row = {"dicom_id": dicom_id, "map": name}
            row.update(saliency_scores(s, gaze[i], points.get(dicom_id, np.zeros((0, 2)))))
            row["finding_mass"] = box_mass(s, findings[dicom_id]) if dicom_id in findings else math.nan
            row["marker_mass"] = box_mass(s, markers[dicom_id]) if dicom_id in markers else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def evaluate(
    checkpoint: str | Path,
    prepared_dir: str | Path,
    split_csv: str | Path,
    out_dir: str | Path,
    config: EvalConfig | None = None,
    history_csv: str | Path | None = None,
    figures_dir: str | Path | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate the model in ``checkpoint`` on the val and test splits; write ``out_dir``
    (figures into ``figures_dir``, default ``out_dir/figures``)."""
    cfg = config or EvalConfig()
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    figures_dir = Path(figures_dir) if figures_dir is not None else out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    model, run_config = load_model(checkpoint, device)
    variant = run_config["train"]["variant"]
    steps = tqdm(total=4, desc=f"evaluate {variant}", disable=not progress, leave=False)

    metrics: dict[str, float] = {}
    predictions = []
    split_data: dict[str, tuple[SplitTensors, np.ndarray]] = {}
    for split in ("val", "test"):
        data = load_split(prepared_dir, split_csv, split)
        if len(data) == 0:
            raise ValueError(f"{split_csv}: the {split} split is empty")
        probs = torch.softmax(predict_logits(model, data.images, device, cfg.batch_size), dim=1).numpy()  # (N, K)
        y = data.labels.numpy()
        split_data[split] = (data, probs)
        metrics.update(auc_summary(y, probs, prefix=f"{split}_"))
        metrics.update(ci_metrics(f"{split}_", y, probs, cfg))
        metrics[f"{split}_accuracy"] = float((probs.argmax(1) == y).mean())
        metrics[f"{split}_n"] = float(len(y))
        frame = pd.DataFrame(probs, columns=[f"prob_{c}" for c in CLASSES[:probs.shape[1]]])
        frame.insert(0, "dicom_id", data.dicom_ids)
        frame.insert(1, "split", split)
        frame.insert(2, "label", [CLASSES[i] for i in y])
        frame.insert(3, "pred", [CLASSES[i] for i in probs.argmax(1)])
        predictions.append(frame)
        steps.update()
    pd.concat(predictions, ignore_index=True).to_csv(out_dir / "predictions.csv", index=False,
                                                     float_format="%.6f", lineterminator="\n")

    test, test_probs = split_data["test"]
    pred = torch.from_numpy(test_probs.argmax(1))
    maps = compute_heatmaps(model, test.images, pred, generator_rule(variant), device, cfg.batch_size)
    steps.update()
    table = saliency_table(maps, test, prepared_dir)
    table.to_csv(out_dir / "saliency.csv", index=False, float_format="%.6f", lineterminator="\n")
    for name, group in table.groupby("map", sort=False):
        for column in group.columns.drop(["dicom_id", "map"]):
            values = group[column].to_numpy(np.float64)
            metrics[f"test_sal_{name}_{column}"] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
    steps.update()

    figures = _write_figures(figures_dir, test, test_probs, maps, cfg, history_csv)
    steps.update()
    steps.close()
    metrics = {k: (float(v) if v is not None else math.nan) for k, v in metrics.items()}
    (out_dir / "metrics.json").write_text(json.dumps({"variant": variant, **_json_safe(metrics)}, indent=2,
                                                     sort_keys=True) + "\n")
    return EvalResult(variant=variant, metrics=metrics, out_dir=out_dir, figures=figures)


def _json_safe(metrics: dict[str, float]) -> dict[str, float | None]:
    """NaN as null: valid JSON for `dvc metrics show` and every other reader."""
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


def _write_figures(figures_dir: Path, test: SplitTensors, probs: np.ndarray, maps: dict[str, np.ndarray | None],
                   cfg: EvalConfig, history_csv: str | Path | None) -> dict[str, Path]:
    from cxrgaze.evaluation.figures import (PanelRow, confusion_matrix_figure, heatmap_panel, roc_curves,
                                            select_panel_cases, training_curves)

    y = test.labels.numpy()
    pred = probs.argmax(1)
    names = list(CLASSES[:probs.shape[1]])
    figures = {}
    cases = select_panel_cases(y, pred, per_class=cfg.panel_per_class, seed=cfg.seed)
    rows = [PanelRow(image=test.images[i, 0].float().numpy(), gradcam=maps["gradcam"][i],
                     gaze=test.gaze[i, 0].float().numpy(),
                     mask=maps["mask"][i] if maps["mask"] is not None else None,
                     generator=maps["generator"][i], true_label=names[y[i]], pred_label=names[pred[i]],
                     prob=float(probs[i, pred[i]]), dicom_id=test.dicom_ids[i]) for i in cases]
    made = {"heatmaps": heatmap_panel(rows) if rows else None,
            "roc": roc_curves(y, probs, names),
            "confusion": confusion_matrix_figure(y, pred, names)}
    if history_csv is not None and Path(history_csv).exists():
        made["training"] = training_curves(pd.read_csv(history_csv).to_dict("records"))
    for name, fig in made.items():
        if fig is None:
            continue
        path = figures_dir / f"{name}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        figures[name] = path
    return figures
