"""Evaluation as MLflow runs: an evaluation in a run of its own (:func:`evaluate_tracked`),
finding it again (:func:`evaluation_run`), and registering the evaluated models
(:func:`register_evaluated`).

Each evaluation of a checkpoint gets a run named ``<variant> evaluation``, nested under the
run that trained the checkpoint (found by its ``run.json`` or the checkpoint tag), so that
each run's duration is its own work. It holds the params ``evaluate.*`` and the training's,
the test/val metrics with CIs, the heatmap-vs-gaze scores, the figures, the servable model,
the tag ``cxrgaze.evaluated=true`` (:data:`~cxrgaze.tracking.EVALUATED_TAG`; the registry
only considers runs so tagged) and the SHA-256 of the evaluation's ``metrics.json``
(:data:`~cxrgaze.tracking.EVALUATION_TAG`). Its headline also becomes the training run's
description (a tag: the training run's times do not change). An evaluation whose training
run is not in this store (a pulled checkpoint, a deleted ``mlflow.db``) is a top-level run
with the training curves copied. Re-evaluations (``dvc exp run -S evaluate.n_resamples=500``)
are further runs nested under the same training run, tagged with their DVC experiment.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from cxrgaze.checkpoint import checkpoint_variant, load_checkpoint
from cxrgaze.config import EvalConfig, RegisterConfig, from_mapping
from cxrgaze.data.prepared import PreparedDir
from cxrgaze.data.split import read_split
from cxrgaze.evaluate import EvalResult, evaluate
from cxrgaze.experiment.training import EPOCH_PREFIX, data_params, prepared_data_config, run_params
from cxrgaze.registry import Candidate, register_and_promote, val_auc_of_model, validation_set_id
from cxrgaze.runtime import resolve_device
from cxrgaze.serving.log import log_model
from cxrgaze.tracking import (CHECKPOINT_TAG, EVALUATED_TAG, EVALUATION_TAG, NOTE_TAG, RUN_FILE, EpochLogger,
                              TrackingError, data_version, file_digest, find_runs, finite_metrics, flatten,
                              read_run_file, run_exists, run_tags, same_context, set_experiment)


def evaluate_tracked(
    train_dir: str | Path,
    prepared_dir: str | Path,
    split_csv: str | Path,
    out_dir: str | Path,
    config: EvalConfig | None = None,
    figures_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[EvalResult, str, str]:
    """Evaluate the best checkpoint of ``train_dir`` in a run of its own, nested under the run
    that trained it (see the module docstring), and log the servable model into it. Returns
    the result, the evaluation run's id and the logged model's URI. ``out_dir`` gets only
    the evaluation's files: the run is found again with :func:`evaluation_run`.
    """
    train_dir, out_dir, prepared_dir = Path(train_dir), Path(out_dir), Path(prepared_dir)
    config = config or EvalConfig()
    set_experiment()
    with _evaluation_run(train_dir, prepared_dir, str(resolve_device(config.device))) as (run_id, parent):
        result = evaluate(train_dir / "best.pt", prepared_dir, split_csv, out_dir, config,
                          history_csv=train_dir / "history.csv", figures_dir=figures_dir, progress=progress)
        model_uri = _log_evaluation(parent, train_dir, out_dir, list(result.figures.values()), prepared_dir,
                                    params=flatten({"evaluate": asdict(config)}))
    return result, run_id, model_uri


def _log_evaluation(parent: str | None, train_dir: Path, out_dir: Path, figures: list[Path], prepared_dir: Path,
                    params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> str:
    """Log an evaluation's files (``out_dir``), figures and servable model into the active
    run, tag it evaluated (and with ``tags``), and write its headline into its description
    and, when that run is of this revision and DVC experiment, the training run's
    (``parent``); returns the model's URI."""
    metrics = json.loads((out_dir / "metrics.json").read_text())
    mlflow.log_metrics(finite_metrics(metrics))
    for figure in figures:
        mlflow.log_artifact(str(figure), "figures")
    for name in ("metrics.json", "scores.npz", "predictions.csv", "saliency.csv", "sanity.json"):
        mlflow.log_artifact(str(out_dir / name), "evaluation")
    info = log_model(train_dir / "best.pt", prepared_data_config(prepared_dir))
    if params:
        mlflow.log_params(params)
    description = run_description(train_dir / "best.pt", metrics, info.model_uri)
    mlflow.set_tags({**(tags or {}), EVALUATED_TAG: "true", "cxrgaze.model_uri": info.model_uri,
                     EVALUATION_TAG: file_digest(out_dir / "metrics.json"), NOTE_TAG: description})
    if parent is not None and same_context(MlflowClient().get_run(parent).data.tags):
        # The training's own revision and DVC experiment only (not a `dvc exp run` re-evaluating
        # the baseline's checkpoints); a tag, not a metric: the training run's times stay its own.
        MlflowClient().set_tag(parent, NOTE_TAG, f"{description}\n\nEvaluated in run "
                                                 f"`{mlflow.active_run().info.run_id}` (nested below).")
    return info.model_uri


def run_description(checkpoint: Path, metrics: dict[str, float | None], model_uri: str) -> str:
    """An evaluated run's description (what the MLflow UI shows on the run's page): the
    variant, its headline numbers and where the rest is."""
    ckpt = load_checkpoint(checkpoint)
    variant = checkpoint_variant(ckpt)

    def num(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"

    return (f"**{variant.name}**: {variant.description} (training seed {ckpt['config']['train']['seed']}).\n\n"
            f"- Test macro AUC **{num('test_auc_macro')}** [{num('test_auc_macro_ci95_low')}, "
            f"{num('test_auc_macro_ci95_high')}] (95 % percentile bootstrap); validation macro AUC "
            f"{num('val_auc_macro')} at the kept epoch {int(ckpt['epoch']) + 1}.\n"
            f"- Generator map vs gaze on test: CC {num('test_sal_generator_cc')}; share of its mass on the "
            f"finding boxes {num('test_sal_generator_finding_mass')}, on the shortcut marker "
            f"{num('test_sal_generator_marker_mass')}.\n"
            f"- Figures (heatmap panel, ROC, reliability, training curves) under `figures/`, the evaluation's "
            f"files under `evaluation/`, the servable model `{model_uri}`; the comparison with the other "
            f"variants is in the `report` run.")


def log_restored_evaluation(train_dir: str | Path, eval_dir: str | Path, figures_dir: str | Path,
                            prepared_dir: str | Path) -> tuple[str, str]:
    """Log an evaluation that DVC restored (``dvc pull``, the run cache) but no run of this
    tracking store holds: its files, figures and model go into an evaluation run opened as
    by :func:`evaluate_tracked`, without evaluating again. Returns ``(run_id, model_uri)``."""
    train_dir, eval_dir, prepared_dir = Path(train_dir), Path(eval_dir), Path(prepared_dir)
    set_experiment()
    figures = sorted(Path(figures_dir).glob("*.png")) if Path(figures_dir).is_dir() else []
    with _evaluation_run(train_dir, prepared_dir, "unknown") as (run_id, parent):  # evaluated elsewhere
        print(f"{eval_dir}: restored by DVC, logged by no run in {mlflow.get_tracking_uri()}: "
              f"logging it into run {run_id}")
        return run_id, _log_evaluation(parent, train_dir, eval_dir, figures, prepared_dir,
                                       tags={"cxrgaze.restored_evaluation": "true"})


def training_run(train_dir: Path) -> str | None:
    """The id of the run that trained ``train_dir/best.pt`` (its ``run.json``, else the
    newest run tagged with the checkpoint's hash), or None when this store holds none."""
    checkpoint = file_digest(train_dir / "best.pt")
    candidates = [read_run_file(train_dir)["run_id"]] if (train_dir / RUN_FILE).exists() else []
    candidates += [run.info.run_id for run in find_runs({CHECKPOINT_TAG: checkpoint, "cxrgaze.kind": "train"})]
    client = MlflowClient()
    for run_id in dict.fromkeys(candidates):
        if run_exists(run_id) and client.get_run(run_id).data.tags.get(CHECKPOINT_TAG) == checkpoint:
            return run_id  # (a run.json whose run did not finish this checkpoint fails the hash check)
    return None


@contextmanager
def _evaluation_run(train_dir: Path, prepared_dir: Path, device: str) -> Iterator[tuple[str, str | None]]:
    """An evaluation run of ``train_dir/best.pt`` on ``device`` (its ``cxrgaze.device`` tag),
    active in the block: ``(run_id, parent)``.

    It is named ``<variant> evaluation``, nested under the checkpoint's training run
    (``parent``) when this store holds it, and carries the training's params (so that
    evaluations compare by their settings); without a training run, it also gets the
    training curves. It ends FAILED when the block raises, leaving the training run as it was.
    """
    ckpt = load_checkpoint(train_dir / "best.pt")
    variant = checkpoint_variant(ckpt).name
    parent = training_run(train_dir)
    if parent is None:
        print(f"{train_dir / 'best.pt'}: no run in {mlflow.get_tracking_uri()} trained it; the evaluation run "
              "gets the training params and curves")
    with mlflow.start_run(run_name=f"{variant} evaluation", parent_run_id=parent) as run:
        mlflow.set_tags({**run_tags(variant, device), CHECKPOINT_TAG: file_digest(train_dir / "best.pt"),
                         "cxrgaze.kind": "evaluation"})
        mlflow.log_params(run_params(ckpt["config"]))
        mlflow.log_params(flatten({"data": data_params(prepared_dir)}))
        history = train_dir / "history.csv"
        if parent is None and history.exists():
            logger = EpochLogger(prefix=EPOCH_PREFIX)
            for record in pd.read_csv(history).to_dict("records"):
                logger.on_epoch_end(record)
        yield run.info.run_id, parent


def evaluation_run(eval_dir: str | Path) -> tuple[str, str, bool] | None:
    """``(run_id, model_uri, same_context)`` of the newest run that logged the evaluation in
    ``eval_dir`` (preferring this revision's and DVC experiment's), or None when the
    tracking store holds none (outputs restored by DVC into another store)."""
    metrics = Path(eval_dir) / "metrics.json"
    if not metrics.exists():
        raise FileNotFoundError(f"{metrics}: missing (did the evaluate stage run?)")
    runs = find_runs({EVALUATION_TAG: file_digest(metrics), EVALUATED_TAG: "true"})
    if not runs:
        return None
    ours = [r for r in runs if same_context(r.data.tags)]  # each check asks git: once per run
    run = (ours or runs)[0]
    return run.info.run_id, run.data.tags["cxrgaze.model_uri"], bool(ours)


def seed_runs(folder: str | Path) -> list[tuple[int | None, Path]]:
    """The per-seed output folders of a variant (``folder/seed<S>/``, by seed), or
    ``[(None, folder)]`` for a folder that holds one run itself (``cxrgaze train --out``:
    ``best.pt``; ``cxrgaze evaluate --out``: ``metrics.json``)."""
    folder = Path(folder)
    found = [(int(p.name[4:]), p) for p in folder.glob("seed*") if p.is_dir() and p.name[4:].isdigit()]
    if found:
        return sorted(found)
    if (folder / "best.pt").exists() or (folder / "metrics.json").exists():
        return [(None, folder)]
    raise FileNotFoundError(f"{folder}: no best.pt, metrics.json or seed<S>/ folders (did the stage run?)")


def register_evaluated(eval_root: str | Path, variants: list[str], prepared_dir: str | Path, split_csv: str | Path,
                       dicom_dir: str | Path, mapping: dict | None = None, where: str = "register",
                       train_root: str | Path | None = None, figures_root: str | Path | None = None):
    """Register the evaluated model of every variant and decide the champion
    (:func:`cxrgaze.registry.register_and_promote`), re-evaluating an old champion on the
    current validation cases through its served preprocessing when the data changed.

    An evaluation that no run of the tracking store holds (restored by ``dvc pull`` or the
    run cache) is logged first from its files (:func:`log_restored_evaluation`) when
    ``train_root`` (the checkpoints) is given; without it, that is an error."""
    cfg = from_mapping(RegisterConfig, mapping, where=where)
    evaluated = {variant: seed_runs(Path(eval_root) / variant) for variant in variants}  # before any store is opened
    set_experiment()
    candidates = []
    for variant, runs in evaluated.items():
        for seed, folder in runs:
            found = evaluation_run(folder)
            if found is None and train_root is None:
                raise TrackingError(f"{folder}: no run in {mlflow.get_tracking_uri()} logged this evaluation "
                                    f"(outputs restored by DVC for another tracking store?); run "
                                    f"`dvc repro --force --single-item evaluate@{variant}` to evaluate and log it here")
            if found is None:
                sub = [folder.name] if seed is not None else []
                found = log_restored_evaluation(Path(train_root, variant, *sub), folder,
                                                Path(figures_root or Path(eval_root).parent / "figures", variant, *sub),
                                                prepared_dir)
            candidates.append(Candidate(variant, found[0], found[1], seed if len(runs) > 1 else None))
    split = read_split(split_csv)
    val_set = validation_set_id(split.loc[split["split"] == "val", "dicom_id"].tolist())
    version = data_version() or hashlib.sha1(PreparedDir(prepared_dir).manifest_path.read_bytes()).hexdigest()

    def reevaluate(model_version) -> float:
        uri = f"models:/{cfg.model_name}/{model_version.version}"
        print(f"register: re-evaluating champion v{model_version.version} on the current validation set")
        return val_auc_of_model(uri, prepared_dir, split_csv, dicom_dir)

    return register_and_promote(candidates, version, val_set, reevaluate, cfg)
