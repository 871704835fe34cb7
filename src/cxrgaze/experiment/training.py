"""Training as an MLflow run (:func:`train_tracked`), and the prepared data's settings as params.

The run is named after the variant, carries the resolved config, the data settings and
the run's layout (``runtime.world_size``, ``runtime.shards``, ``runtime.threads``) as
params, :func:`cxrgaze.tracking.run_tags` as tags, every epoch as ``epoch_*`` metrics, and
the SHA-256 of its ``best.pt`` (:data:`~cxrgaze.tracking.CHECKPOINT_TAG`). ``run.json``
beside ``last.pt`` keeps the id, so an interrupted run that resumes continues the same run.

A tracking server that stops during training costs seconds, not the run: what it does not
get is kept in ``tracking_buffer.jsonl`` beside ``run.json`` and sent, with its steps and
times, when it answers again (:mod:`cxrgaze.experiment.delivery`); until then the run has
the tag ``cxrgaze.tracking_incomplete`` listing what it lacks and is not FINISHED, and
``run.json`` says the same. A queue left over after training is sent by
:func:`flush_train_run`: a resumed :func:`train_tracked` (the same ``cxrgaze train``
again), ``cxrgaze evaluate`` of the folder, and the train stage (:func:`finish_train_run`)
call it (the whole story: :mod:`cxrgaze.tracking_buffer`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import mlflow
from mlflow.tracking import MlflowClient

from cxrgaze.checkpoint import config_variant, load_checkpoint
from cxrgaze.config import DataConfig, RunConfig, from_mapping
from cxrgaze.data.prepared import PreparedDir
from cxrgaze.distributed import context_from_env
from cxrgaze.experiment.delivery import INCOMPLETE_FIELDS, INCOMPLETE_TAG, TrackingGuard
from cxrgaze.outlock import FolderInUse, output_lock
from cxrgaze.runtime import resolve_device
from cxrgaze.tracking import (CHECKPOINT_TAG, RUN_FILE, EpochLogger, apply_http_defaults, file_digest, finite_metrics,
                              flatten, read_run, read_run_file, run_exists, run_tags, set_experiment, write_run_file)
from cxrgaze.tracking_buffer import (BUFFER_FILE, Pending, Record, artifact_record, end_record, metrics_record,
                                     params_record, summary, tags_record)
from cxrgaze.train import TrainResult, train
from cxrgaze.train.loop import check_resumable, run_layout

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


def runtime_params(config: RunConfig) -> dict[str, str]:
    """``runtime.world_size``, ``runtime.shards`` and ``runtime.threads`` of a run started
    in this process (:func:`cxrgaze.train.loop.run_layout`): not settings, but what its
    results depend on besides them (the ``metrics.json`` of the run has the same)."""
    return flatten({"runtime": run_layout(context_from_env().world_size, config.train.micro_batches)})


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
    ``out_dir`` is held (:mod:`cxrgaze.outlock`) from before the run is opened until it ends.
    """
    out_dir = Path(out_dir)
    if not context_from_env().is_main:
        return train(config, prepared_dir, split_csv, out_dir, callbacks=callbacks, progress=progress,
                     resume=resume), ""
    # Held before the MLflow run is opened: a second process refused by the lock must not
    # reopen, log into or end the run of the process training in the folder.
    with output_lock(out_dir):
        return _train_tracked(config, prepared_dir, split_csv, out_dir, callbacks, progress, resume)


def _train_tracked(config: RunConfig, prepared_dir: str | Path, split_csv: str | Path, out_dir: Path,
                   callbacks: Iterable[Any], progress: bool, resume: bool) -> tuple[TrainResult, str]:
    variant = config.train.variant
    set_experiment()
    last = load_checkpoint(out_dir / "last.pt") if resume and (out_dir / "last.pt").exists() else None
    history = last["history"] if last is not None else []
    run_id = None
    if history:
        _check_resume(last, config, prepared_dir, out_dir)  # refused before the run is touched
        if (out_dir / RUN_FILE).exists():
            previous = read_run_file(out_dir)["run_id"]
            run_id = previous if run_exists(previous) else None
    if run_id is not None and _trained(run_id, history, config, out_dir):
        return _flush_trained(config, prepared_dir, split_csv, out_dir, callbacks, progress, resume), run_id
    planned = [f"epoch {k}" for k in range(len(history) + 1, config.train.epochs + 1)] + list(FINAL_ITEMS)
    guard = _open_run(config, prepared_dir, out_dir, run_id, planned)
    logger = EpochLogger(prefix=EPOCH_PREFIX, guard=guard)
    if run_id is not None and guard.flush():  # what the last process could not send, then what it never logged
        guard.call("replay of checkpointed epochs", _replay_unlogged_epochs, run_id, history, logger)
    try:
        result = train(config, prepared_dir, split_csv, out_dir, callbacks=[logger, *callbacks],
                       progress=progress, resume=resume)
        guard.send(*_final_records(result.best, result.best_epoch, out_dir))
        missing = guard.settle()
    except BaseException as exc:
        guard.pending.planned = []  # never produced: the run lacks only what the store did not take
        lacks = summary(guard.pending.missing())
        if lacks:
            write_run_file(out_dir, tracking_incomplete=lacks)
        guard.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", lacks)
        raise
    if missing is not None:
        print(f"{variant}: training finished, but MLflow run {guard.run_id} is incomplete: it lacks {missing} "
              f"(tracking lost at {guard.lost}). They are kept in {out_dir / BUFFER_FILE} and sent, with their "
              f"steps and times, once the tracking server answers, by the same `cxrgaze train` again (nothing is "
              f"trained again), `cxrgaze evaluate --train-dir {out_dir}` or `dvc repro`", file=sys.stderr)
    return result, guard.run_id


def _check_resume(last: dict[str, Any], config: RunConfig, prepared_dir: str | Path, out_dir: Path) -> None:
    """What :func:`cxrgaze.train.train` checks before it resumes, checked before the run of
    ``out_dir`` is reopened: a resume it would refuse must leave that run as it is."""
    check_resumable(last, config, out_dir / "last.pt")
    PreparedDir(prepared_dir).check()


def _trained(run_id: str, history: list[dict[str, Any]], config: RunConfig, out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a finished training (its run FINISHED, or every epoch in
    ``last.pt`` and ``best.pt`` and ``metrics.json`` written): nothing to reopen its run for."""
    if all((out_dir / name).exists() for name in ("best.pt", "metrics.json")) and len(history) >= config.train.epochs:
        return True
    return read_run(run_id).info.status == "FINISHED"


def _flush_trained(config: RunConfig, prepared_dir: str | Path, split_csv: str | Path, out_dir: Path,
                   callbacks: Iterable[Any], progress: bool, resume: bool) -> TrainResult:
    """The same ``cxrgaze train`` on a finished folder: nothing is trained again and its run
    is not reopened; what the run still lacks is sent through the client
    (:func:`finish_train_run`: the queue, and the end of a run killed before it)."""
    result = train(config, prepared_dir, split_csv, out_dir, callbacks=callbacks, progress=progress, resume=resume)
    missing = finish_train_run(out_dir)
    if missing is not None:
        print(f"{config.train.variant}: MLflow run of {out_dir} still lacks {missing}; kept in "
              f"{out_dir / BUFFER_FILE}", file=sys.stderr)
    return result


FINAL_ITEMS = ("final metrics", "history.csv", "checkpoint tag", "end of run")
"""What a training run gets after its epochs (:func:`_final_records`), by name."""


def _open_run(config: RunConfig, prepared_dir: str | Path, out_dir: Path, run_id: str | None,
              planned: list[str]) -> TrackingGuard:
    """Start the run of ``out_dir`` (resume ``run_id``), tagged with what it is still to get
    (``planned``, and on a resume what the last process queued); ``run.json`` names it."""
    variant, new = config.train.variant, run_id is None
    if new:
        tags = {**run_tags(variant, str(resolve_device(config.train.device))), INCOMPLETE_TAG: summary(planned)}
        run_id = mlflow.start_run(run_name=variant, tags=tags).info.run_id
        pending = Pending(out_dir / BUFFER_FILE, run_id)  # drops the queue of an earlier run
        pending.planned = planned
    else:
        pending = Pending(out_dir / BUFFER_FILE, run_id, keep_end=False)  # the resumed run ends anew
        pending.planned = planned
        mlflow.start_run(run_id=run_id, tags={INCOMPLETE_TAG: summary(pending.missing())})
    write_run_file(out_dir, drop=INCOMPLETE_FIELDS, run_id=run_id, variant=variant)
    guard = TrackingGuard(run_id, out_dir, pending)
    if new:
        guard.send(params_record("run params", {**run_params(config.as_dict()), **runtime_params(config),
                                                **flatten({"data": data_params(prepared_dir)})}))
    return guard


def _final_records(best: dict[str, float], best_epoch: int, out_dir: Path) -> list[Record]:
    """What a finished training sends after its epochs (:data:`FINAL_ITEMS`): the best
    epoch's metrics (``best_*``, ``best_epoch`` 1-based), ``history.csv``, the checkpoint
    tag and the end of the run, FINISHED."""
    now = int(time.time() * 1000)
    metrics = {**{f"best_{k}": v for k, v in finite_metrics(best).items()}, "best_epoch": best_epoch + 1}
    return [metrics_record("final metrics", metrics, 0, now), artifact_record("history.csv"),
            tags_record("checkpoint tag", {CHECKPOINT_TAG: file_digest(out_dir / "best.pt"), "cxrgaze.kind": "train"}),
            end_record("FINISHED", now)]


def flush_train_run(out_dir: str | Path) -> str | None:
    """Send what the training run of ``out_dir`` did not get (its ``tracking_buffer.jsonl``,
    :mod:`cxrgaze.tracking_buffer`) with the steps and times it was kept with; a run left
    incomplete by a tracking outage ends FINISHED without its
    :data:`~cxrgaze.experiment.delivery.INCOMPLETE_TAG` once everything arrived, and
    ``run.json`` loses its ``tracking_*`` fields. Returns what the run still lacks (None:
    nothing). A folder another process trains in is left to that process (the return value
    then says so: never None)."""
    out_dir = Path(out_dir)
    if not (out_dir / BUFFER_FILE).exists() or not (out_dir / RUN_FILE).exists():
        return None
    try:
        with output_lock(out_dir):
            return _flush(out_dir)
    except FolderInUse as exc:
        return f"what the process training in {out_dir} has not sent yet ({exc})"


def _flush(out_dir: Path) -> str | None:
    """:func:`flush_train_run` by the holder of ``out_dir``'s lock."""
    if not (out_dir / BUFFER_FILE).exists() or not (out_dir / RUN_FILE).exists():
        return None
    apply_http_defaults()
    guard = TrackingGuard(read_run_file(out_dir)["run_id"], out_dir, warn=False)
    if guard.flush():
        return None
    missing = summary(guard.pending.missing())
    print(f"MLflow run {guard.run_id} still lacks {missing} ({mlflow.get_tracking_uri()}, {guard.lost}); "
          f"kept in {out_dir / BUFFER_FILE}", file=sys.stderr)
    return missing


def finish_train_run(out_dir: str | Path) -> str | None:
    """Bring the run of a finished ``out_dir`` (``best.pt``, ``metrics.json``) up to date:
    send its queue (:func:`flush_train_run`), and when a kill came between the last file and
    the end of the run, send the end as :func:`train_tracked` would have (final metrics,
    ``history.csv``, checkpoint tag, FINISHED). Returns what the run still lacks (None: nothing).
    Holds ``out_dir`` throughout: a folder another process trains in is refused
    (:class:`~cxrgaze.outlock.FolderInUse`), never closed behind that process's back."""
    out_dir = Path(out_dir)
    with output_lock(out_dir):
        return _finish(out_dir)


def _finish(out_dir: Path) -> str | None:
    """:func:`finish_train_run` by the holder of ``out_dir``'s lock."""
    missing = _flush(out_dir)
    if missing is not None or not (out_dir / RUN_FILE).exists():
        return missing
    apply_http_defaults()
    guard = TrackingGuard(read_run_file(out_dir)["run_id"], out_dir)
    unfinished = guard.call(f"closing run {guard.run_id}", _unfinished, guard.run_id)
    if unfinished is None:  # the store did not say: the run may still lack its end
        return f"end of run (not checked: {guard.lost})"
    if unfinished:
        metrics = json.loads((out_dir / "metrics.json").read_text())
        best = {k: v for k, v in metrics.items() if k.startswith("val_")}
        if not guard.send(*_final_records(best, int(metrics["best_epoch"]), out_dir)):
            return summary(guard.pending.missing())
    return None


def _unfinished(run_id: str) -> bool:
    return run_exists(run_id) and MlflowClient().get_run(run_id).info.status != "FINISHED"


def _replay_unlogged_epochs(run_id: str, history: list[dict[str, Any]], logger: EpochLogger) -> None:
    """Log the checkpointed epochs (``history`` of ``last.pt``) the run lacks: a process
    killed between writing ``last.pt`` and logging that epoch resumes after it."""
    logged = {m.step for m in MlflowClient().get_metric_history(run_id, f"{EPOCH_PREFIX}val_auc_macro")}
    for record in history:
        if int(record["epoch"]) + 1 not in logged:  # steps are 1-based epoch numbers
            logger.on_epoch_end(record)
