"""Tracked steps: training and evaluation as MLflow runs.

The library's :func:`cxrgaze.train.train` and :func:`cxrgaze.evaluate.evaluate` know
nothing of MLflow; the CLI and the DVC stages call these wrappers, which open (or
re-open) the variant's run, log into it and leave its id in the output folder's
``run.json``:

* :func:`train_tracked` opens run ``<variant>`` in experiment ``cxrgaze`` with the resolved
  config as params and the tags of :func:`cxrgaze.tracking.run_tags`, logs every epoch,
  and ends the run FINISHED, or FAILED when training raises. An interrupted run that
  resumes from ``last.pt`` continues the same MLflow run.
* :func:`evaluate_tracked` re-opens that run by id, logs the test/val metrics with CIs,
  the heatmap-vs-gaze scores, the figures and the servable model (an MLflow pyfunc with
  its own preprocessing), then tags the run ``cxrgaze.evaluated=true``: the registry only
  considers runs so tagged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable

import mlflow
import pandas as pd

from cxrgaze.config import DataConfig, from_mapping
from cxrgaze.evaluate import EvalConfig, EvalResult, evaluate
from cxrgaze.report import Report
from cxrgaze.runtime import resolve_device
from cxrgaze.tracking import (EpochLogger, RUN_FILE, TrackingGuard, finite_metrics, flatten, read_run_file, resumed_run,
                              run_exists, run_tags, set_experiment, write_run_file)
from cxrgaze.train import RunConfig, TrainResult, load_checkpoint, train

EVALUATED_TAG = "cxrgaze.evaluated"
EPOCH_PREFIX = "epoch_"
"""Per-epoch metrics are ``epoch_val_auc_macro``, ``epoch_train_loss``...: the evaluation's
``val_auc_macro`` (of the kept checkpoint) must not be mistaken for the last epoch's."""


def prepared_data_config(prepared_dir: str | Path) -> DataConfig:
    """The DataConfig that produced a prepared folder (from its ``meta.json``)."""
    path = Path(prepared_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (run `cxrgaze prepare` first)") from None
    return from_mapping(DataConfig, meta.get("config") or {}, where=str(path))


def train_tracked(
    config: RunConfig,
    prepared_dir: str | Path,
    split_csv: str | Path,
    out_dir: str | Path,
    callbacks: Iterable[Any] = (),
    progress: bool = True,
    resume: bool = True,
) -> tuple[TrainResult, str]:
    """Train as an MLflow run; returns the result and the run id (also in ``out_dir/run.json``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) rank 0 alone opens the MLflow run, logs and
    writes ``run.json``; the other ranks train without MLflow and return ``""`` as run id.
    """
    from cxrgaze.distributed import context_from_env

    out_dir = Path(out_dir)
    variant = config.train.variant
    if not context_from_env().is_main:
        return train(config, prepared_dir, split_csv, out_dir, callbacks=callbacks, progress=progress,
                     resume=resume), ""
    set_experiment()
    run_id = None
    if resume and (out_dir / "last.pt").exists() and (out_dir / RUN_FILE).exists():
        previous = read_run_file(out_dir)["run_id"]
        run_id = previous if run_exists(previous) else None
    device = resolve_device(config.train.device)
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else variant)
    guard = TrackingGuard()
    if run_id is None:
        guard.call("run tags", mlflow.set_tags, run_tags(variant, str(device)))
        guard.call("run params", mlflow.log_params,
                   {**flatten(config.as_dict()), **flatten({"data": _data_params(prepared_dir)})})
    write_run_file(out_dir, run_id=run.info.run_id, variant=variant)
    logger = EpochLogger(prefix=EPOCH_PREFIX, guard=guard)
    if run_id is not None:
        guard.call("replay of checkpointed epochs", _replay_unlogged_epochs, run_id, out_dir / "last.pt", logger)
    try:
        result = train(config, prepared_dir, split_csv, out_dir, callbacks=[logger, *callbacks],
                       progress=progress, resume=resume)
    except BaseException as exc:
        _end_run(guard, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    guard.call("final metrics", mlflow.log_metrics,
               {**{f"best_{k}": v for k, v in finite_metrics(result.best).items()}, "best_epoch": result.best_epoch})
    guard.call("history.csv", mlflow.log_artifact, str(out_dir / "history.csv"))
    _end_run(guard, "FINISHED")
    if guard.lost is not None:
        write_run_file(out_dir, tracking_lost=guard.lost)
        print(f"{variant}: training finished, but MLflow run {run.info.run_id} is incomplete (tracking lost at "
              f"{guard.lost}); everything is in {out_dir}", file=sys.stderr)
    return result, run.info.run_id


def _replay_unlogged_epochs(run_id: str, last_pt: Path, logger: EpochLogger) -> None:
    """Log the checkpointed epochs the run lacks: a process killed between writing
    ``last.pt`` and logging that epoch resumes after it."""
    from mlflow.tracking import MlflowClient

    logged = {m.step for m in MlflowClient().get_metric_history(run_id, f"{EPOCH_PREFIX}val_auc_macro")}
    for record in load_checkpoint(last_pt)["history"]:
        if int(record["epoch"]) not in logged:
            logger.on_epoch_end(record)


def _end_run(guard: TrackingGuard, status: str) -> None:
    """End the active run; when the store is gone, at least forget the run in this process
    (so a next run can start)."""
    guard.call("end of run", mlflow.end_run, status=status)
    if mlflow.active_run() is not None:
        try:
            mlflow.end_run(status=status)  # pops the run first, then fails to reach the store
        except Exception:  # noqa: BLE001 - already reported by the guard
            pass


def _data_params(prepared_dir: str | Path) -> dict[str, Any]:
    try:
        return {k: v for k, v in vars(prepared_data_config(prepared_dir)).items() if k != "workers"}
    except (FileNotFoundError, ValueError):
        return {}


def evaluate_tracked(
    train_dir: str | Path,
    prepared_dir: str | Path,
    split_csv: str | Path,
    out_dir: str | Path,
    config: EvalConfig | None = None,
    figures_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[EvalResult, str, str]:
    """Evaluate the best checkpoint of ``train_dir`` into its MLflow run and log the servable
    model. Returns the result, the run id and the logged model's URI (all also in
    ``out_dir/run.json``).

    When the run named by ``train_dir/run.json`` is not in the tracking store (mlflow.db
    deleted, another tracking URI), a replacement run with the checkpoint's config and the
    training history is opened instead, and said so.
    """
    train_dir, out_dir, prepared_dir = Path(train_dir), Path(out_dir), Path(prepared_dir)
    set_experiment()
    run_id = _run_for(train_dir, prepared_dir)
    result = evaluate(train_dir / "best.pt", prepared_dir, split_csv, out_dir, config,
                      history_csv=train_dir / "history.csv", figures_dir=figures_dir, progress=progress)
    from cxrgaze.serving.log import log_model

    with resumed_run(run_id):
        mlflow.log_metrics(finite_metrics(result.metrics))
        for figure in result.figures.values():
            mlflow.log_artifact(str(figure), "figures")
        for name in ("metrics.json", "scores.npz", "predictions.csv", "saliency.csv", "sanity.json"):
            mlflow.log_artifact(str(out_dir / name), "evaluation")
        info = log_model(train_dir / "best.pt", prepared_data_config(prepared_dir))
        mlflow.set_tags({EVALUATED_TAG: "true", "cxrgaze.model_uri": info.model_uri})
    write_run_file(out_dir, run_id=run_id, model_uri=info.model_uri, variant=result.variant)
    return result, run_id, info.model_uri


def _run_for(train_dir: Path, prepared_dir: Path) -> str:
    """The run id of ``train_dir``, or a new replacement run when the store lacks it."""
    run_id = read_run_file(train_dir)["run_id"]
    if run_exists(run_id):
        return run_id
    ckpt = load_checkpoint(train_dir / "best.pt")
    variant = ckpt["config"]["train"]["variant"]
    print(f"MLflow run {run_id} of {train_dir} is not in {mlflow.get_tracking_uri()}: "
          f"logging into a new run for {variant} (training metrics replayed from history.csv)")
    with mlflow.start_run(run_name=variant) as run:
        mlflow.set_tags({**run_tags(variant, "unknown"), "cxrgaze.replaces_run": run_id})
        mlflow.log_params(flatten(ckpt["config"]))
        mlflow.log_params(flatten({"data": _data_params(prepared_dir)}))
        history = train_dir / "history.csv"
        if history.exists():
            logger = EpochLogger(prefix=EPOCH_PREFIX)
            for record in pd.read_csv(history).to_dict("records"):
                logger.on_epoch_end(record)
        return run.info.run_id


def seed_runs(folder: str | Path) -> list[tuple[int | None, Path]]:
    """The per-seed output folders of a variant (``folder/seed<S>/``, by seed), or
    ``[(None, folder)]`` for a folder that holds one run itself (``cxrgaze train --out``)."""
    folder = Path(folder)
    if (folder / RUN_FILE).exists():
        return [(None, folder)]
    found = [(int(p.name[4:]), p) for p in folder.glob("seed*") if p.is_dir() and p.name[4:].isdigit()]
    if not found:
        raise FileNotFoundError(f"{folder}: no {RUN_FILE} and no seed<S>/ folders (did the stage run?)")
    return sorted(found)


def log_report(report: Report, eval_root: str | Path, paths: dict[str, Path]) -> str:
    """Log the paired differences into every variant's run, and the report files into a
    run named ``report``; returns that run's id."""
    set_experiment()
    for variant, refs in report.paired.items():
        runs = seed_runs(Path(eval_root) / variant)
        if len(runs) > 1:  # the differences are the seed ensemble's: no single seed's run has them
            print(f"report: {variant} has {len(runs)} seeds; its paired differences are in the report run only")
            continue
        for _, folder in runs:
            run_id = read_run_file(folder)["run_id"]
            if not run_exists(run_id):
                print(f"report: MLflow run {run_id} of {variant} is not in {mlflow.get_tracking_uri()}; not logged there")
                continue
            with resumed_run(run_id):
                for ref, p in refs.items():
                    mlflow.log_metrics(finite_metrics({f"test_auc_macro_diff_vs_{ref}": p["difference"],
                                                       f"test_auc_macro_diff_vs_{ref}_ci95_low": p["low"],
                                                       f"test_auc_macro_diff_vs_{ref}_ci95_high": p["high"],
                                                       f"test_auc_macro_diff_vs_{ref}_p_value": p["p_value"]}))
    with mlflow.start_run(run_name="report") as run:
        mlflow.set_tags({**run_tags(None, None), "cxrgaze.kind": "report"})
        mlflow.log_metrics(finite_metrics({f"{variant}.test_auc_macro_diff_vs_{ref}": p["difference"]
                                           for variant, refs in report.paired.items() for ref, p in refs.items()}))
        for path in paths.values():
            mlflow.log_artifact(str(path))
        return run.info.run_id


def register_evaluated(eval_root: str | Path, variants: list[str], prepared_dir: str | Path, split_csv: str | Path,
                       dicom_dir: str | Path, mapping: dict | None = None, where: str = "register"):
    """Register the evaluated model of every variant and decide the champion
    (:func:`cxrgaze.registry.register_and_promote`), re-evaluating an old champion on the
    current validation cases through its served preprocessing when the data changed."""
    import hashlib

    from cxrgaze.registry import Candidate, RegisterConfig, register_and_promote, val_auc_of_model, validation_set_id
    from cxrgaze.tracking import data_version

    cfg = from_mapping(RegisterConfig, mapping, where=where)
    candidates = []
    for variant in variants:
        runs = seed_runs(Path(eval_root) / variant)
        for seed, folder in runs:
            info = read_run_file(folder)
            if not info.get("model_uri"):
                raise ValueError(f"{folder / RUN_FILE}: no model_uri (evaluate did not finish)")
            candidates.append(Candidate(variant, info["run_id"], info["model_uri"], seed if len(runs) > 1 else None))
    split = pd.read_csv(split_csv, dtype=str)
    val_set = validation_set_id(split.loc[split["split"] == "val", "dicom_id"].tolist())
    version = data_version() or hashlib.sha1((Path(prepared_dir) / "manifest.csv").read_bytes()).hexdigest()

    def reevaluate(model_version) -> float:
        uri = f"models:/{cfg.model_name}/{model_version.version}"
        print(f"register: re-evaluating champion v{model_version.version} on the current validation set")
        return val_auc_of_model(uri, prepared_dir, split_csv, dicom_dir)

    return register_and_promote(candidates, version, val_set, reevaluate, cfg)
