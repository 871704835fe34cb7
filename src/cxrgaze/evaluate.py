"""Evaluation of one trained model: AUCs with confidence intervals, calibration, heatmap-vs-gaze
agreement, sanity checks, figures. ``evaluate(checkpoint, prepared_dir, split_csv, out_dir) -> EvalResult``;
:func:`combine_seeds` summarises the evaluations of one variant's training seeds.

Scores are the training objective's (:mod:`cxrgaze.predict`: a sigmoid per class for
``loss.cls_loss: bce``, softmax for ``ce``), computed in float64 from the logits. What it
computes (every number is written to ``out_dir/metrics.json``):

* ``{val,test}_auc_{macro,<class>}``: one-vs-rest AUC on all cases of the split.
* ``..._ci95_low`` / ``..._ci95_high``: the standard percentile bootstrap
  (``evaluate.n_resamples`` full-size resamples, seeded).
* ``..._paper_p2.5`` / ``_p50`` / ``_p97.5``: the paper's protocol (30 resamples of 55-60
  cases): what the paper's tables print. Different numbers from the same predictions:
  the names say which is which.
* ``{val,test}_brier``, ``_ece``, ``_ece_<class>``, ``_sens_at_spec90_<class>`` (with its
  CI): calibration and the operating point (:func:`calibration_metrics`).
* ``{val,test}_sal_<map>_<metric>``: agreement of each heatmap with the radiologist's gaze,
  averaged over images, with ``_n`` (images averaged) and ``_nan`` (images without a
  value) beside each mean: maps ``mask`` (decoder; left out where no loss trains it, set
  1, or there is none, baseline and rrr), ``generator`` (the variant's own rule; guided backprop
  for variants without one, so that every model gets the same diagnostic) and ``gradcam``;
  metrics CC, KL, SIM (the paper's), SIM (the benchmark's), NSS, AUC-Judd,
  ``finding_mass`` (share of the map inside the finding boxes) and ``marker_mass`` (inside
  the burned-in ``marker`` box of synthetic data: how much the map looks at the shortcut).
  Validation's are the registry's explanation evidence; test's are the report's.
* ``sanity_generator_*`` (test) and ``val_sanity_generator_*`` (validation: the registry's
  evidence): the generator's sanity checks (:mod:`cxrgaze.evaluation.sanity`).

Heatmaps explain the *predicted* class. Checkpoints are chosen on validation during
training (macro AUC, less ``train.selection_gaze_weight`` times the generator's mass
outside the gaze when set); test cases are only read here.

Outputs: ``metrics.json``, ``scores.npz`` (full-precision logits and scores,
:mod:`cxrgaze.evaluation.scores`: what the report's paired tests read),
``predictions.csv`` (one row per val/test case, rounded, for reading), ``saliency.csv``
(per case, split and map), ``sanity.json``, ``figures/`` (heatmap panel, ROC curves,
reliability diagram, confusion matrix, training curves).
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
from cxrgaze.checkpoint import LoadedModel, load_model
from cxrgaze.config import EvalConfig
from cxrgaze.data.dataset import SplitTensors, load_split
from cxrgaze.data.prepared import PreparedDir
from cxrgaze.evaluation.bootstrap import paper_bootstrap, percentile_bootstrap
from cxrgaze.evaluation.calibration import brier_score, ece_per_class, ece_top_label
from cxrgaze.evaluation.operating_point import sensitivity_ci
from cxrgaze.evaluation.saliency import average_by_map, box_mass, saliency_scores
from cxrgaze.evaluation.sanity import generator_map_fn, sanity_check
from cxrgaze.evaluation.scores import FILENAME as SCORES_FILE
from cxrgaze.evaluation.scores import SplitScores, load_scores, save_scores, split_from_logits
from cxrgaze.explain import generator_maps
from cxrgaze.metrics import auc_summary
from cxrgaze.models import GazeNet
from cxrgaze.predict import predict_logits, scoring_rule, selection_metrics
from cxrgaze.runtime import resolve_device

MAPS = ("mask", "generator", "gradcam")
"""The heatmaps compared with gaze."""


@dataclass
class EvalResult:
    variant: str
    metrics: dict[str, float]
    out_dir: Path
    figures: dict[str, Path] = field(default_factory=dict)


SANITY_PREFIX = {"val": "val_sanity_generator_", "test": "sanity_generator_"}
"""Metric prefixes of the generator sanity checks per split (the registry gates on validation's)."""


def calibration_metrics(prefix: str, y: np.ndarray, scores: np.ndarray, cfg: EvalConfig) -> dict[str, float]:
    """Brier score, top-label and per-class ECE (:mod:`cxrgaze.evaluation.calibration`), and
    per class the sensitivity at ``cfg.specificity`` with its percentile-bootstrap CI."""
    names = CLASSES[:scores.shape[1]]
    spec = int(round(cfg.specificity * 100))
    level = int(round(cfg.confidence * 100))
    out = {f"{prefix}brier": brier_score(y, scores), f"{prefix}ece": ece_top_label(y, scores, cfg.calibration_bins)}
    out.update({f"{prefix}ece_{c}": float(v) for c, v in zip(names, ece_per_class(y, scores, cfg.calibration_bins))})
    for c, iv in sensitivity_ci(y, scores, cfg.specificity, cfg.n_resamples, cfg.confidence, cfg.seed, names).items():
        out[f"{prefix}sens_at_spec{spec}_{c}"] = iv.estimate
        out[f"{prefix}sens_at_spec{spec}_{c}_ci{level}_low"] = iv.low
        out[f"{prefix}sens_at_spec{spec}_{c}_ci{level}_high"] = iv.high
    return out


def _prediction_frame(split: str, data: SplitTensors, scores: np.ndarray) -> pd.DataFrame:
    """One row per case: ``dicom_id, split, label, pred, prob_<class>...`` (rounded for
    reading; the paired tests read ``scores.npz``)."""
    y = data.labels.numpy()
    frame = pd.DataFrame(scores, columns=[f"prob_{c}" for c in CLASSES[:scores.shape[1]]])
    frame.insert(0, "dicom_id", data.dicom_ids)
    frame.insert(1, "split", split)
    frame.insert(2, "label", [CLASSES[i] for i in y])
    frame.insert(3, "pred", [CLASSES[i] for i in scores.argmax(1)])
    return frame


def ci_metrics(prefix: str, y: np.ndarray, probs: np.ndarray, cfg: EvalConfig) -> dict[str, float]:
    """Percentile-bootstrap CI and paper-protocol percentiles of every AUC, as flat metrics."""
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
    from cxrgaze.explain.gradcam import gradcam  # here: pytorch_grad_cam loads cv2 and matplotlib (slow imports)

    masks, generators, cams = [], [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device, torch.float32)
        t = target[i:i + batch_size].to(device)
        if model.has_decoder:
            with torch.no_grad():
                mask_logits, _ = model(x)
            masks.append(torch.sigmoid(mask_logits)[:, 0].float().cpu().numpy())
        generators.append(generator_maps(model, x, t, rule)[:, 0].detach().float().cpu().numpy())
        cams.append(gradcam(model, x, t))
    return {"mask": np.concatenate(masks) if masks else None,
            "generator": np.concatenate(generators),
            "gradcam": np.concatenate(cams)}


def _points_and_boxes(prepared_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per dicom id: fixation points (F, 2) x,y; finding boxes (B, 4); marker boxes (B, 4)."""
    folder = PreparedDir(prepared_dir)
    points = {k: g[["x", "y"]].to_numpy(np.float64) for k, g in folder.fixations().groupby("dicom_id", sort=False)}
    findings: dict[str, np.ndarray] = {}
    markers: dict[str, np.ndarray] = {}
    boxes = folder.boxes()
    if boxes is not None and len(boxes):
        name = boxes["bbox_name"].str.strip().str.lower()
        cols = ["x1", "x2", "y1", "y2"]
        for k, g in boxes[name.str.startswith("finding")].groupby("dicom_id", sort=False):
            findings[k] = g[cols].to_numpy(np.float64)
        for k, g in boxes[name == "marker"].groupby("dicom_id", sort=False):
            markers[k] = g[cols].to_numpy(np.float64)
    return points, findings, markers


def saliency_table(maps: dict[str, np.ndarray | None], data: SplitTensors, prepared_dir: Path) -> pd.DataFrame:
    """One row per (case, map) with every agreement metric against that case's gaze."""
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
    loaded = load_model(checkpoint, device)
    steps = tqdm(total=5, desc=f"evaluate {loaded.variant.name}", disable=not progress, leave=False)
    metrics, split_data = _score_splits(loaded, prepared_dir, split_csv, out_dir, cfg, device, steps)
    maps = _heatmap_metrics(loaded, split_data, prepared_dir, out_dir, cfg, device, metrics, steps)
    _sanity_metrics(loaded, split_data, out_dir, cfg, metrics)
    test, test_probs = split_data["test"]
    figures = _write_figures(figures_dir, test, test_probs, maps, cfg, history_csv)
    steps.update()
    steps.close()
    metrics = {k: (float(v) if v is not None else math.nan) for k, v in metrics.items()}
    variant = loaded.variant.name
    (out_dir / "metrics.json").write_text(json.dumps({"variant": variant, **_json_safe(metrics)}, indent=2,
                                                     sort_keys=True) + "\n")
    return EvalResult(variant=variant, metrics=metrics, out_dir=out_dir, figures=figures)


SplitData = dict[str, tuple[SplitTensors, np.ndarray]]
"""Per split (``val``, ``test``): the split's tensors and the model's scores (N, K) float64."""


def _score_splits(loaded: LoadedModel, prepared_dir: Path, split_csv: str | Path, out_dir: Path, cfg: EvalConfig,
                  device: torch.device, steps: tqdm) -> tuple[dict[str, float], SplitData]:
    """AUCs with CIs, calibration, accuracy and (validation) the selection score per split;
    writes ``scores.npz`` and ``predictions.csv``."""
    model, run_config = loaded.model, loaded.config
    scoring = scoring_rule(run_config["loss"]["cls_loss"])
    metrics: dict[str, float] = {"n_seeds": 1.0}
    predictions = []
    split_data: SplitData = {}
    scores: dict[str, SplitScores] = {}
    for split in ("val", "test"):
        data = load_split(prepared_dir, split_csv, split)
        if len(data) == 0:
            raise ValueError(f"{split_csv}: the {split} split is empty")
        logits = predict_logits(model, data.images, device, cfg.batch_size)  # (N, K)
        y = data.labels.numpy()
        scores[split] = split_from_logits(y, data.dicom_ids, logits.double().numpy(), scoring)
        probs = scores[split].scores  # (N, K) float64, exactly what the report's paired tests read
        split_data[split] = (data, probs)
        metrics.update(auc_summary(y, probs, prefix=f"{split}_"))
        metrics.update(ci_metrics(f"{split}_", y, probs, cfg))
        metrics.update(calibration_metrics(f"{split}_", y, probs, cfg))
        metrics[f"{split}_accuracy"] = float((probs.argmax(1) == y).mean())
        metrics[f"{split}_n"] = float(len(y))
        if split == "val":  # the checkpoint-selection score, as training computed it (`register.metric: val_selection`)
            metrics.update(selection_metrics(model, data.images, data.gaze, data.labels, metrics["val_auc_macro"],
                                             loaded.variant.generator,
                                             float(run_config["train"].get("selection_gaze_weight", 0.0)),
                                             device, cfg.batch_size))
        predictions.append(_prediction_frame(split, data, probs))
        steps.update()
    save_scores(out_dir / SCORES_FILE, scores, [run_config["train"]["seed"]], scoring, CLASSES[:probs.shape[1]])
    pd.concat(predictions, ignore_index=True).to_csv(out_dir / "predictions.csv", index=False,
                                                     float_format="%.6f", lineterminator="\n")
    return metrics, split_data


def _heatmap_metrics(loaded: LoadedModel, split_data: SplitData, prepared_dir: Path, out_dir: Path, cfg: EvalConfig,
                     device: torch.device, metrics: dict[str, float], steps: tqdm) -> dict[str, np.ndarray | None]:
    """Heatmaps of the predicted class vs gaze per split into ``metrics`` and ``saliency.csv``
    (val: the registry's evidence; test: the report's); returns the test split's maps."""
    spec = loaded.variant
    tables = []
    for split, (data, probs) in split_data.items():
        pred = torch.from_numpy(probs.argmax(1))
        maps = compute_heatmaps(loaded.model, data.images, pred, spec.generator, device, cfg.batch_size)
        if not spec.trains_mask:
            maps["mask"] = None  # baseline and rrr have no decoder; set 1's is never trained, so its mask means nothing
        table = saliency_table(maps, data, prepared_dir)
        metrics.update(average_by_map(table, prefix=f"{split}_sal_"))
        tables.append(table.assign(split=split))
        steps.update()
    pd.concat(tables, ignore_index=True).to_csv(out_dir / "saliency.csv", index=False, float_format="%.6f",
                                                lineterminator="\n")
    return maps  # the last split's: test


def _sanity_metrics(loaded: LoadedModel, split_data: SplitData, out_dir: Path, cfg: EvalConfig,
                    metrics: dict[str, float]) -> None:
    """The generator's sanity checks per split into ``metrics`` and ``sanity.json``."""
    sanity = {}
    for split, (data, probs) in split_data.items():  # val: the registry's evidence; test: the report's
        result = sanity_check(loaded.model, generator_map_fn(loaded.variant.generator), data.images,
                              torch.from_numpy(probs.argmax(1)), classes=data.labels, n_images=cfg.sanity_images,
                              seed=cfg.seed, batch_size=cfg.batch_size)
        metrics.update(result.to_metrics(SANITY_PREFIX[split]))
        sanity[split] = _json_safe(result.to_metrics("")) | {"reasons": result.reasons}
    (out_dir / "sanity.json").write_text(json.dumps(sanity, indent=2, sort_keys=True) + "\n")


def _json_safe(metrics: dict[str, float]) -> dict[str, float | None]:
    """NaN as null: valid JSON for `dvc metrics show` and every other reader."""
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


def _write_figures(figures_dir: Path, test: SplitTensors, probs: np.ndarray, maps: dict[str, np.ndarray | None],
                   cfg: EvalConfig, history_csv: str | Path | None) -> dict[str, Path]:
    # matplotlib only when figures are drawn: the report and register stages import this module
    from cxrgaze.evaluation.figures import (PanelRow, confusion_matrix_figure, heatmap_panel, reliability_diagram,
                                            roc_curves, select_panel_cases, training_curves)

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
            "reliability": reliability_diagram(y, probs, names, n_bins=cfg.calibration_bins),
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


SEED_SPREAD = ("val_auc_macro", "test_auc_macro", *(f"test_auc_{c}" for c in CLASSES))
"""Metrics whose standard deviation over seeds the variant summary reports."""


def combine_seeds(variant: str, seed_dirs: list[Path], out_dir: str | Path,
                  config: EvalConfig | None = None) -> dict[str, Any]:
    """The variant's summary over its seeds' evaluations (each folder written by
    :func:`evaluate`): ``out_dir/scores.npz`` with every seed's logits and the seed-averaged
    scores, and ``out_dir/metrics.json``.

    The classification numbers of the summary (AUCs with their CIs and paper-protocol
    percentiles, calibration, sensitivity, accuracy) are those of the seed-averaged scores
    (the seed ensemble): the same scores the report's paired tests compare, so a table's
    AUC and its paired difference describe one model. Beside them, for
    :data:`SEED_SPREAD`, ``<metric>_seed_mean`` and ``<metric>_seed_sd`` over the seeds.
    Everything else (heatmap agreement, sanity checks: properties of each seed's model) is
    the mean over seeds; ``sanity_generator_passed`` is then the share of seeds that
    passed. Returns the summary."""
    cfg = config or EvalConfig()
    out_dir = Path(out_dir)
    per_seed = [load_scores(d / SCORES_FILE) for d in seed_dirs]
    first = per_seed[0]
    splits = {}
    for split in first.splits:
        if any(not np.array_equal(s[split].dicom_ids, first[split].dicom_ids) for s in per_seed):
            raise ValueError(f"{variant}: the seeds were evaluated on different {split} cases")
        logits = np.concatenate([s[split].logits_per_seed for s in per_seed])  # (S, N, K)
        splits[split] = split_from_logits(first[split].labels, first[split].dicom_ids, logits, first.scoring)
    seeds = np.concatenate([s.seeds for s in per_seed])
    save_scores(out_dir / SCORES_FILE, splits, seeds, first.scoring, first.classes)
    frames = pd.DataFrame([json.loads((d / "metrics.json").read_text()) for d in seed_dirs]).drop(columns="variant")
    frames = frames.apply(pd.to_numeric, errors="coerce")
    summary: dict[str, Any] = {k: float(v) for k, v in frames.mean().items()}
    for split, data in splits.items():  # the ensemble's classification numbers replace the means
        y, scores = data.labels, data.scores
        summary.update(auc_summary(y, scores, prefix=f"{split}_"))
        summary.update(ci_metrics(f"{split}_", y, scores, cfg))
        summary.update(calibration_metrics(f"{split}_", y, scores, cfg))
        summary[f"{split}_accuracy"] = float((scores.argmax(1) == y).mean())
    for key in SEED_SPREAD:
        summary[f"{key}_seed_mean"] = float(frames[key].mean())
        summary[f"{key}_seed_sd"] = float(frames[key].std(ddof=1)) if len(frames) > 1 else math.nan
    summary["n_seeds"] = float(len(seed_dirs))
    (out_dir / "metrics.json").write_text(json.dumps({"variant": variant, "scoring": first.scoring,
                                                      "seeds": seeds.tolist(), **_json_safe(summary)},
                                                     indent=2, sort_keys=True) + "\n")
    return summary
