"""Tracked steps: training and evaluation as MLflow runs.

The library's :func:`cxrgaze.train.train` and :func:`cxrgaze.evaluate.evaluate` know
nothing of MLflow; the CLI and the DVC stages call these wrappers:

* :func:`train_tracked` opens run ``<variant>`` in experiment ``cxrgaze`` with the resolved
  config as params and the tags of :func:`cxrgaze.tracking.run_tags` (git revision, DVC
  experiment, data version), logs every epoch, tags the run with the SHA-256 of its
  ``best.pt`` (:data:`~cxrgaze.tracking.CHECKPOINT_TAG`) and ends it FINISHED, or FAILED
  when training raises. ``run.json`` beside ``last.pt`` keeps the id, so an interrupted run
  that resumes continues the same MLflow run.
* :func:`evaluate_tracked` finds the run that trained the checkpoint by that tag and logs
  the evaluation into it (params ``evaluate.*``, test/val metrics with CIs, heatmap-vs-gaze
  scores, figures, the servable model), then tags it ``cxrgaze.evaluated=true`` (the
  registry only considers runs so tagged) and with the SHA-256 of the evaluation's
  ``metrics.json`` (:data:`~cxrgaze.tracking.EVALUATION_TAG`). It appends only to a run
  that is not yet evaluated and belongs to the same git revision and DVC experiment; any
  other evaluation (``dvc exp run -S evaluate.n_resamples=500`` on restored checkpoints, a
  pulled checkpoint, a deleted ``mlflow.db``) gets a run of its own, with the training
  params and curves copied and ``cxrgaze.trained_in_run`` naming the training run.
* :func:`evaluation_run` finds an evaluation's run again from its output folder: the
  ``report`` and ``register`` stages use it, so no stage output holds a run id.
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
from cxrgaze.tracking import (CHECKPOINT_TAG, EVALUATION_TAG, RUN_FILE, EpochLogger, TrackingError, TrackingGuard,
                              file_digest, find_runs, finite_metrics, flatten, read_run_file, resumed_run, run_exists,
                              run_tags, same_context, set_experiment, write_run_file)
from cxrgaze.train import RunConfig, TrainResult, load_checkpoint, train

EVALUATED_TAG = "cxrgaze.evaluated"
TRAINED_IN_TAG = "cxrgaze.trained_in_run"
"""Tag of an evaluation run that is not its checkpoint's training run: that run's id."""
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
    guard.call("checkpoint tag", mlflow.set_tags, {CHECKPOINT_TAG: file_digest(out_dir / "best.pt"),
                                                   "cxrgaze.kind": "train"})
    _end_run(guard, "FINISHED")
    if guard.lost is not None:
        write_run_file(out_dir, tracking_lost=guard.lost)
        print(f"{variant}: training finished, but MLflow run {run.info.run_id} is incomplete (tracking lost at "
              f"{guard.lost}); everything is in {out_dir}", file=sys.stderr)
    return result, run.info.run_id


def finish_train_run(out_dir: str | Path) -> None:
    """Close the training run of a finished ``out_dir`` (``best.pt``, ``metrics.json``) that a
    kill left unclosed between the last file and the end of the run: tag its checkpoint and
    end it FINISHED, as :func:`train_tracked` would have."""
    out_dir = Path(out_dir)
    if not (out_dir / RUN_FILE).exists():
        return
    run_id = read_run_file(out_dir)["run_id"]

    def close() -> None:
        client = mlflow.tracking.MlflowClient()
        if run_exists(run_id) and client.get_run(run_id).info.status != "FINISHED":
            client.set_tag(run_id, CHECKPOINT_TAG, file_digest(out_dir / "best.pt"))
            client.set_tag(run_id, "cxrgaze.kind", "train")
            client.set_terminated(run_id, "FINISHED")

    TrackingGuard().call(f"closing run {run_id}", close)


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
    """Evaluate the best checkpoint of ``train_dir`` and log it, with the servable model,
    into the run that trained it (or a run of its own, see the module docstring). Returns
    the result, the run id and the logged model's URI. ``out_dir`` gets only the
    evaluation's files: the run is found again with :func:`evaluation_run`.
    """
    from dataclasses import asdict

    train_dir, out_dir, prepared_dir = Path(train_dir), Path(out_dir), Path(prepared_dir)
    config = config or EvalConfig()
    set_experiment()
    run_id = _run_for(train_dir, prepared_dir)
    result = evaluate(train_dir / "best.pt", prepared_dir, split_csv, out_dir, config,
                      history_csv=train_dir / "history.csv", figures_dir=figures_dir, progress=progress)
    model_uri = _log_evaluation(run_id, train_dir, out_dir, list(result.figures.values()), prepared_dir,
                                params=flatten({"evaluate": asdict(config)}))
    return result, run_id, model_uri


def _log_evaluation(run_id: str, train_dir: Path, out_dir: Path, figures: list[Path], prepared_dir: Path,
                    params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> str:
    """Log an evaluation's files (``out_dir``), figures and servable model into ``run_id``
    and tag it evaluated (and with ``tags``); returns the model's URI."""
    from cxrgaze.serving.log import log_model

    metrics = json.loads((out_dir / "metrics.json").read_text())
    with resumed_run(run_id):
        mlflow.log_metrics(finite_metrics(metrics))
        for figure in figures:
            mlflow.log_artifact(str(figure), "figures")
        for name in ("metrics.json", "scores.npz", "predictions.csv", "saliency.csv", "sanity.json"):
            mlflow.log_artifact(str(out_dir / name), "evaluation")
        info = log_model(train_dir / "best.pt", prepared_data_config(prepared_dir))
        # Params last, with the tags: an evaluation that failed before this point leaves the
        # run free for the next attempt, whatever its settings (MLflow params are immutable).
        if params:
            mlflow.log_params(params)
        mlflow.set_tags({**(tags or {}), EVALUATED_TAG: "true", "cxrgaze.model_uri": info.model_uri,
                         EVALUATION_TAG: file_digest(out_dir / "metrics.json")})
    return info.model_uri


def log_restored_evaluation(train_dir: str | Path, eval_dir: str | Path, figures_dir: str | Path,
                            prepared_dir: str | Path) -> tuple[str, str]:
    """Log an evaluation that DVC restored (``dvc pull``, the run cache) but no run of this
    tracking store holds: its files, figures and model go into a run found or opened as by
    :func:`evaluate_tracked`, without evaluating again. Returns ``(run_id, model_uri)``."""
    train_dir, eval_dir, prepared_dir = Path(train_dir), Path(eval_dir), Path(prepared_dir)
    set_experiment()
    run_id = _run_for(train_dir, prepared_dir)
    figures = sorted(Path(figures_dir).glob("*.png")) if Path(figures_dir).is_dir() else []
    print(f"{eval_dir}: restored by DVC, logged by no run in {mlflow.get_tracking_uri()}: logging it into run {run_id}")
    return run_id, _log_evaluation(run_id, train_dir, eval_dir, figures, prepared_dir,
                                   tags={"cxrgaze.restored_evaluation": "true"})


def _run_for(train_dir: Path, prepared_dir: Path) -> str:
    """The run to log an evaluation of ``train_dir/best.pt`` into: its training run when
    that run is not yet evaluated and belongs to this revision and DVC experiment, else a
    new run with the checkpoint's config and curves."""
    checkpoint = file_digest(train_dir / "best.pt")
    candidates = [read_run_file(train_dir)["run_id"]] if (train_dir / RUN_FILE).exists() else []
    candidates += [run.info.run_id for run in find_runs({CHECKPOINT_TAG: checkpoint})]
    client = mlflow.tracking.MlflowClient()
    trained_in = None
    for run_id in dict.fromkeys(candidates):
        if not run_exists(run_id):
            continue
        tags = client.get_run(run_id).data.tags
        if tags.get(CHECKPOINT_TAG) != checkpoint:
            continue  # run.json of a run that did not finish this checkpoint (killed, resumed since)
        if tags.get("cxrgaze.kind") == "train":
            trained_in = trained_in or run_id
        if tags.get(EVALUATED_TAG) != "true" and same_context(tags):
            return run_id
    ckpt = load_checkpoint(train_dir / "best.pt")
    variant = ckpt["config"]["train"]["variant"]
    why = (f"its training run {trained_in} is already evaluated or belongs to another revision or DVC experiment"
           if trained_in else f"no run in {mlflow.get_tracking_uri()} trained it")
    print(f"{train_dir / 'best.pt'}: {why}; the evaluation gets a run of its own (training params and curves copied)")
    with mlflow.start_run(run_name=variant) as run:
        mlflow.set_tags({**run_tags(variant, "unknown"), CHECKPOINT_TAG: checkpoint, "cxrgaze.kind": "evaluation",
                         **({TRAINED_IN_TAG: trained_in} if trained_in else {})})
        mlflow.log_params(flatten(ckpt["config"]))
        mlflow.log_params(flatten({"data": _data_params(prepared_dir)}))
        history = train_dir / "history.csv"
        if history.exists():
            logger = EpochLogger(prefix=EPOCH_PREFIX)
            for record in pd.read_csv(history).to_dict("records"):
                logger.on_epoch_end(record)
        return run.info.run_id


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


def log_report(report: Report, eval_root: str | Path, paths: dict[str, Path], params: dict | None = None) -> str:
    """Log the paired differences into every variant's evaluation run of this revision and
    DVC experiment, and the report files and ``params`` (the report's settings) into a run
    named ``report``; returns that run's id."""
    set_experiment()
    for variant, refs in report.paired.items():
        runs = seed_runs(Path(eval_root) / variant)
        if len(runs) > 1:  # the differences are the seed ensemble's: no single seed's run has them
            print(f"report: {variant} has {len(runs)} seeds; its paired differences are in the report run only")
            continue
        for _, folder in runs:
            found = evaluation_run(folder)
            if found is None or not found[2]:
                print(f"report: no run of this revision and DVC experiment in {mlflow.get_tracking_uri()} holds the "
                      f"evaluation of {variant}; its paired differences are in the report run only")
                continue
            with resumed_run(found[0]):
                for ref, p in refs.items():
                    mlflow.log_metrics(finite_metrics({f"test_auc_macro_diff_vs_{ref}": p["difference"],
                                                       f"test_auc_macro_diff_vs_{ref}_ci95_low": p["low"],
                                                       f"test_auc_macro_diff_vs_{ref}_ci95_high": p["high"],
                                                       f"test_auc_macro_diff_vs_{ref}_p_value": p["p_value"]}))
    with mlflow.start_run(run_name="report") as run:
        mlflow.set_tags({**run_tags(None, None), "cxrgaze.kind": "report"})
        if params:
            mlflow.log_params(flatten(params))
        mlflow.log_metrics(finite_metrics({f"{variant}.test_auc_macro_diff_vs_{ref}": p["difference"]
                                           for variant, refs in report.paired.items() for ref, p in refs.items()}))
        for path in paths.values():
            mlflow.log_artifact(str(path))
        return run.info.run_id


def register_evaluated(eval_root: str | Path, variants: list[str], prepared_dir: str | Path, split_csv: str | Path,
                       dicom_dir: str | Path, mapping: dict | None = None, where: str = "register",
                       train_root: str | Path | None = None, figures_root: str | Path | None = None):
    """Register the evaluated model of every variant and decide the champion
    (:func:`cxrgaze.registry.register_and_promote`), re-evaluating an old champion on the
    current validation cases through its served preprocessing when the data changed.

    An evaluation that no run of the tracking store holds (restored by ``dvc pull`` or the
    run cache) is logged first from its files (:func:`log_restored_evaluation`) when
    ``train_root`` (the checkpoints) is given; without it, that is an error."""
    import hashlib

    from cxrgaze.registry import Candidate, RegisterConfig, register_and_promote, val_auc_of_model, validation_set_id
    from cxrgaze.tracking import data_version

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
    split = pd.read_csv(split_csv, dtype=str)
    val_set = validation_set_id(split.loc[split["split"] == "val", "dicom_id"].tolist())
    version = data_version() or hashlib.sha1((Path(prepared_dir) / "manifest.csv").read_bytes()).hexdigest()

    def reevaluate(model_version) -> float:
        uri = f"models:/{cfg.model_name}/{model_version.version}"
        print(f"register: re-evaluating champion v{model_version.version} on the current validation set")
        return val_auc_of_model(uri, prepared_dir, split_csv, dicom_dir)

    return register_and_promote(candidates, version, val_set, reevaluate, cfg)
