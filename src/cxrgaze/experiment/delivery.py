"""A training run's records, delivered through tracking outages: :class:`TrackingGuard`.

The guard sends a run's records (:mod:`cxrgaze.tracking_buffer`: epochs, params, tags,
artifacts, the end of the run) in order. A stopped tracking server costs seconds, not the
run: what it does not take is queued in the output folder (``tracking_buffer.jsonl``) and
sent, with its original steps and timestamps, as soon as it answers again. Until everything
arrived the run carries :data:`INCOMPLETE_TAG` (what it lacks) and is not FINISHED, and
``run.json`` says the same (:data:`INCOMPLETE_FIELDS`). The whole story, with the commands
that send a queue left over after training, is in :mod:`cxrgaze.tracking_buffer`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cxrgaze.errors import reason
from cxrgaze.tracking import write_run_file
from cxrgaze.tracking_buffer import BUFFER_FILE, REJECTED_FILE, Pending, Record, metrics_record, summary

INCOMPLETE_TAG = "cxrgaze.tracking_incomplete"
"""Tag of a run that has not received everything yet: what it lacks, e.g. ``epochs 2-3,
final metrics, history.csv, checkpoint tag, end of run``. Written ahead (with the run's
creation and every batch, as what is still to come), so that a server that goes away for
good already holds the list; removed by the record that ends the run FINISHED."""

INCOMPLETE_FIELDS = ("tracking_incomplete", "tracking_buffer", "tracking_lost")
"""The fields of ``run.json`` while its run lacks records: the same list as
:data:`INCOMPLETE_TAG`, the queue's file name and where and why tracking was lost."""

END_RETRY_WAITS = (2.0, 5.0)
"""Seconds before each last attempt to send a run's queue when its training has ended."""

REJECTED_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
"""MLflow error codes of a record the store refuses for good (not an outage): the record is
set aside in :data:`~cxrgaze.tracking_buffer.REJECTED_FILE` and the queue goes on."""


class TrackingGuard:
    """Delivers the records of run ``run_id`` for work that must not die with the tracking store.

    :meth:`send` queues records and sends the queue in order. The first record the store
    does not take is reported once on stderr (:attr:`lost`: where and why) and stays queued,
    with what follows, in ``folder/tracking_buffer.jsonl``; the next :meth:`send` or
    :meth:`flush` tries again, once, so the work goes on. While records are queued,
    ``folder/run.json`` says what the run lacks (:data:`INCOMPLETE_FIELDS`).
    ``pending``: the queue (by default, what ``folder`` holds for the run).
    """

    def __init__(self, run_id: str, folder: str | Path, pending: Pending | None = None, warn: bool = True) -> None:
        self.run_id = run_id
        self.folder = Path(folder)
        self.pending = pending if pending is not None else Pending(self.folder / BUFFER_FILE, run_id)
        self.lost: str | None = None
        self.warn = warn

    def send(self, *records: Record) -> bool:
        """Queue ``records`` and send the queue; whether everything arrived."""
        backlog = len(self.pending.records)
        self.pending.add(*records)
        return self.flush(backlog)

    def send_metrics(self, what: str, metrics: dict[str, float], step: int, timestamp_ms: int) -> bool:
        """:meth:`send` of one step's metrics (the guard of an :class:`~cxrgaze.tracking.EpochLogger`)."""
        return self.send(metrics_record(what, metrics, step, timestamp_ms))

    def flush(self, backlog: int | None = None) -> bool:
        """Send the queue in order until the store refuses a record; whether everything
        arrived. ``backlog``: how many queued records are late (all by default)."""
        late: list[str] = []
        client = MlflowClient()
        backlog = len(self.pending.records) if backlog is None else backlog
        was_queued = self.pending.path.exists()
        while self.pending.records:
            record = self.pending.records[0]
            try:
                _deliver(client, self.run_id, record, self.folder, summary(self.pending.missing(after=1)))
            except Exception as exc:  # noqa: BLE001 - any tracking failure is reported, never fatal
                if not rejected(exc):
                    self._lose(record["what"], exc)
                    break
                self._reject(record, exc)
                self.pending.records.pop(0)
                continue
            self.pending.records.pop(0)
            late += [record["what"]] if len(late) < backlog else []
        self.pending.save()
        if late:
            print(f"MLflow tracking back ({mlflow.get_tracking_uri()}): run {self.run_id} got {summary(late)}, "
                  "with their original steps and times", file=sys.stderr)
        if self.pending.records:
            write_run_file(self.folder, tracking_incomplete=summary(self.pending.missing()),
                           tracking_buffer=BUFFER_FILE, tracking_lost=self.lost)
        elif was_queued or late:
            self.lost = None
            write_run_file(self.folder, drop=INCOMPLETE_FIELDS)
        return not self.pending.records

    def call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, a failure reported as by :meth:`send` (None then)."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any tracking failure is reported, never fatal
            self._lose(what, exc)
            return None

    def settle(self, waits: tuple[float, ...] | None = None) -> str | None:
        """The training is over: retry the queue after each of ``waits`` seconds
        (:data:`END_RETRY_WAITS`). None when everything arrived; else what the run lacks,
        and the run ends FAILED with :data:`INCOMPLETE_TAG` saying so if the store answers."""
        for wait in END_RETRY_WAITS if waits is None else waits:
            if not self.pending.records:
                break
            time.sleep(wait)
            self.flush()
        if not self.pending.records:
            return None
        missing = summary(self.pending.missing())
        self.end("FAILED", missing)
        return missing

    def end(self, status: str, missing: str = "") -> None:
        """End the run ``status`` if the store answers, with :data:`INCOMPLETE_TAG` set to
        ``missing`` (removed when nothing is); in any case it is this process's active run no
        more (so a next run can start). Nothing is queued: a resumed run ends anew, and a
        queue left over ends the run as it says."""
        try:
            client = MlflowClient()
            end_run(client, self.run_id, status)
            if missing:
                client.set_tag(self.run_id, INCOMPLETE_TAG, missing)
            else:
                drop_incomplete_tag(client, self.run_id)
        except Exception:  # noqa: BLE001 - the store is away: the queue and run.json say the rest
            pass

    def _reject(self, record: Record, exc: Exception) -> None:
        """Set aside a record the store refuses for good (:func:`rejected`): one line on
        stderr, the record appended to :data:`~cxrgaze.tracking_buffer.REJECTED_FILE`."""
        path = self.folder / REJECTED_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        print(f"WARNING: MLflow run {self.run_id} refused {record['what']} ({reason(exc)}); moved to {path}, "
              "the rest of the queue goes on", file=sys.stderr)

    def _lose(self, what: str, exc: Exception) -> None:
        if self.lost is not None:
            return
        self.lost = f"{what}: {reason(exc)}"
        if self.warn:
            print(f"WARNING: MLflow tracking lost ({mlflow.get_tracking_uri()}) at {self.lost}; the work goes on, "
                  f"and what run {self.run_id} does not get is kept in {self.pending.path} and sent when the "
                  "server answers again", file=sys.stderr)


def rejected(exc: BaseException) -> bool:
    """Whether the store refused a record for good (:data:`REJECTED_CODES`, or an artifact
    whose file is gone), not for an outage: retrying it would block the queue forever."""
    if isinstance(exc, MlflowException):
        return exc.error_code in REJECTED_CODES
    return isinstance(exc, FileNotFoundError)


def end_run(client: MlflowClient, run_id: str, status: str, end_time: int | None = None) -> None:
    """End ``run_id`` ``status``: this process's active run through :func:`mlflow.end_run`
    (it pops the run first, then reaches the store, so a next run can start even when the
    store is away), any other through the client (at ``end_time``, ms; now when None)."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:
        client.set_terminated(run_id, status, end_time)


def drop_incomplete_tag(client: MlflowClient, run_id: str) -> None:
    """Remove :data:`INCOMPLETE_TAG` from ``run_id`` (nothing when it has none)."""
    try:
        client.delete_tag(run_id, INCOMPLETE_TAG)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def _deliver(client: MlflowClient, run_id: str, record: Record, folder: Path, missing: str) -> None:
    """Send one record; a batch also sets :data:`INCOMPLETE_TAG` to ``missing`` (what the
    run lacks once it has this record), or removes it when nothing is."""
    ahead = [RunTag(INCOMPLETE_TAG, missing)] if missing else []
    kind = record["kind"]
    if kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, record["timestamp"], record["step"])
                                          for k, v in record["metrics"].items()], tags=ahead)
    elif kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in record["params"].items()], tags=ahead)
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()] + ahead)
    elif kind == "artifact":
        path = folder / record["path"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        client.log_artifact(run_id, str(path), record.get("artifact_path"))
    elif kind == "end":
        drop_incomplete_tag(client, run_id)
        end_run(client, run_id, record["status"], record.get("end_time"))  # a failure leaves the record queued
        return
    else:
        raise ValueError(f"{folder / BUFFER_FILE}: unknown record kind {kind!r}")
    if not missing:
        drop_incomplete_tag(client, run_id)
