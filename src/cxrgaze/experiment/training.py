"""Training as an MLflow run (:func:`train_tracked`), and the prepared data's settings as params.

The run is named after the variant, carries the resolved config and the data settings as
params, :func:`cxrgaze.tracking.run_tags` as tags, every epoch as ``epoch_*`` metrics, and
the SHA-256 of its ``best.pt`` (:data:`~cxrgaze.tracking.CHECKPOINT_TAG`). ``run.json``
beside ``last.pt`` keeps the id, so an interrupted run that resumes continues the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable

import mlflow
from mlflow.tracking import MlflowClient

from cxrgaze.checkpoint import config_variant, load_checkpoint
from cxrgaze.config import DataConfig, RunConfig, from_mapping
from cxrgaze.data.prepared import PreparedDir
from cxrgaze.distributed import context_from_env
from cxrgaze.runtime import resolve_device
from cxrgaze.tracking import (CHECKPOINT_TAG, RUN_FILE, EpochLogger, TrackingGuard, file_digest, finite_metrics,
                              flatten, read_run_file, run_exists, run_tags, set_experiment, write_run_file)
from cxrgaze.train import TrainResult, train

EPOCH_PREFIX = "epoch_"
"""Per-epoch metrics are ``epoch_val_auc_macro``, ``epoch_train_loss``...: the evaluation's
``val_auc_macro`` (of the kept checkpoint) must not be mistaken for the last epoch's."""


def prepared_data_config(prepared_dir: str | Path) -> DataConfig:
    """The DataConfig that produced a prepared folder (from its ``meta.json``)."""
    folder = PreparedDir(prepared_dir)
    return from_mapping(DataConfig, folder.meta().get("config") or {}, where=str(folder.meta_path))


LOSS_WEIGHTS = ("gamma", "alpha", "mass_weight", "outside_weight", "rrr_weight")
"""The loss weights a variant may or may not have (:attr:`cxrgaze.variants.Variant.loss_weights`)."""


def run_params(config: dict[str, Any]) -> dict[str, str]:
    """A run config (``RunConfig.as_dict()``) as MLflow params, without the loss weights the
    variant's objective does not have (no ``loss.alpha`` where there is no set-3 mix)."""
    used = set(config_variant(config).loss_weights)
    return {k: v for k, v in flatten(config).items()
            if not (k.startswith("loss.") and k[len("loss."):] in LOSS_WEIGHTS and k[len("loss."):] not in used)}


def data_params(prepared_dir: str | Path) -> dict[str, Any]:
    """The prepared data's settings (``data.*`` params of a run; none when unreadable)."""
    try:
        return {k: v for k, v in vars(prepared_data_config(prepared_dir)).items() if k != "workers"}
    except (FileNotFoundError, ValueError):
        return {}


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
                   {**run_params(config.as_dict()), **flatten({"data": data_params(prepared_dir)})})
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
               {**{f"best_{k}": v for k, v in finite_metrics(result.best).items()}, "best_epoch": result.best_epoch + 1})  # 1-based
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
    logged = {m.step for m in MlflowClient().get_metric_history(run_id, f"{EPOCH_PREFIX}val_auc_macro")}
    for record in load_checkpoint(last_pt)["history"]:
        if int(record["epoch"]) + 1 not in logged:  # steps are 1-based epoch numbers
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
