"""What a run's tracking has not received yet: the records the tracking store did not take,
kept in order on disk until it takes them (no MLflow here:
:class:`cxrgaze.experiment.delivery.TrackingGuard` sends them).

How a training run survives a tracking outage
---------------------------------------------
Everything :func:`cxrgaze.experiment.training.train_tracked` logs after opening its run is a
*record* (:func:`metrics_record`, :func:`params_record`, :func:`tags_record`,
:func:`artifact_record`, :func:`end_record`) that carries its own step and timestamp, taken
when the epoch ended. Records go into a :class:`Pending` queue and are sent in order; a
record the store does not take stays queued, with everything after it, and the queue is
written to ``tracking_buffer.jsonl`` (:data:`BUFFER_FILE`) in the training output folder,
beside ``run.json``. Each later record first retries the queue (one attempt: a stopped
server costs seconds, not minutes), so when the server answers again the missed epochs
arrive with their original steps and times, then the new one.

While anything is missing, the run carries the tag ``cxrgaze.tracking_incomplete``
(:data:`cxrgaze.experiment.delivery.INCOMPLETE_TAG`) listing it, e.g. ``epochs 2-3, final metrics,
history.csv, checkpoint tag, end of run`` (:func:`summary`). The tag is written ahead, with
the run's creation and with every batch, as what is *still to come* (:attr:`Pending.planned`
plus the queue): a server that goes away and stays away cannot be told anything more, so
the tag it last received already says what it will not get. The record that ends the run
removes the tag and sets the run FINISHED; a run is FINISHED only when everything arrived.

At the end of training the queue is retried a few times
(:data:`cxrgaze.experiment.delivery.END_RETRY_WAITS`). What is still queued then stays in
``tracking_buffer.jsonl``; ``run.json`` gets ``tracking_incomplete`` (the same list as the
tag), ``tracking_buffer`` and ``tracking_lost`` (where and why); the console says so; the
run ends FAILED with the tag updated when the store answers, and stays RUNNING with the
tag written ahead when it does not. Whatever touches that run later sends the queue first
(:func:`cxrgaze.experiment.training.flush_train_run`): the same ``cxrgaze train`` again
(it resumes, nothing is trained again), ``cxrgaze evaluate --train-dir`` of the folder, or
``dvc repro`` (the train stage keeps the seed's resume folder and fails until its run is
complete). Then the run ends FINISHED without the tag and ``run.json`` loses those fields.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable

BUFFER_FILE = "tracking_buffer.jsonl"
"""The queue of a training output folder: one JSON record a line, oldest first."""

REJECTED_FILE = "tracking_buffer.rejected.jsonl"
"""Beside :data:`BUFFER_FILE`: the records the store refused for good (a run or value it
rejects, an artifact whose file is gone), set aside so that the rest of the queue goes on."""

Record = dict[str, Any]


def metrics_record(what: str, metrics: dict[str, float], step: int, timestamp_ms: int) -> Record:
    """Metrics of one step, logged at ``timestamp_ms`` (milliseconds since the epoch)."""
    return {"kind": "metrics", "what": what, "metrics": metrics, "step": step, "timestamp": timestamp_ms}


def params_record(what: str, params: dict[str, str]) -> Record:
    return {"kind": "params", "what": what, "params": {k: str(v) for k, v in params.items()}}


def tags_record(what: str, tags: dict[str, str]) -> Record:
    return {"kind": "tags", "what": what, "tags": {k: str(v) for k, v in tags.items()}}


def artifact_record(name: str, artifact_path: str | None = None) -> Record:
    """The file ``name`` of the output folder (relative to it, so the folder may move)."""
    return {"kind": "artifact", "what": name, "path": name, "artifact_path": artifact_path}


def end_record(status: str, end_time_ms: int) -> Record:
    return {"kind": "end", "what": "end of run", "status": status, "end_time": end_time_ms}


def summary(names: Iterable[str]) -> str:
    """``["epoch 2", "epoch 3", "epoch 5", "history.csv"]`` -> ``"epochs 2-3, 5, history.csv"``
    (names once each, in order; the epochs where the first one was)."""
    names = list(dict.fromkeys(names))
    epochs = [int(m.group(1)) for n in names if (m := re.fullmatch(r"epoch (\d+)", n))]
    if not epochs:
        return ", ".join(names)
    runs: list[list[int]] = []
    for e in sorted(epochs):
        if runs and e == runs[-1][-1] + 1:
            runs[-1].append(e)
        else:
            runs.append([e])
    text = ("epochs " if len(epochs) > 1 else "epoch ") + ", ".join(
        f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
    first = next(i for i, n in enumerate(names) if re.fullmatch(r"epoch \d+", n))
    rest = [n for n in names if not re.fullmatch(r"epoch \d+", n)]
    return ", ".join([*rest[:first], text, *rest[first:]])


class Pending:
    """The records of run ``run_id`` not yet delivered, oldest first, persisted in ``path``
    (rewritten whole, atomically, by :meth:`save`; removed when empty).

    Records of another run in ``path`` are dropped with a note (a folder trained again into
    a new run); with ``keep_end=False`` so are end records (a resumed run ends anew).
    :attr:`planned` names what the run is still to produce, so that :meth:`missing` can
    say what the store will lack if it never answers again.
    """

    def __init__(self, path: str | Path, run_id: str, keep_end: bool = True) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.records: list[Record] = []
        self.planned: list[str] = []
        records = self._read()
        others = [r.get("what") for r in records if r.get("run_id") != run_id]
        if others:
            print(f"{self.path}: dropped what another MLflow run never received ({summary(others)}): "
                  f"the folder now belongs to run {run_id}", file=sys.stderr)
        self.records = [r for r in records if r.get("run_id") == run_id and (keep_end or r.get("kind") != "end")]

    def _read(self) -> list[Record]:
        if not self.path.exists():
            return []
        out = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"{self.path}:{number}: not a JSON record; skipped", file=sys.stderr)
        return out

    def add(self, *records: Record) -> None:
        """Queue records (they are produced: no longer planned)."""
        for record in records:
            self.records.append({**record, "run_id": self.run_id})
            if record["what"] in self.planned:
                self.planned.remove(record["what"])

    def missing(self, after: int = 0) -> list[str]:
        """What the store lacks once the first ``after`` queued records are delivered."""
        return list(dict.fromkeys([r["what"] for r in self.records[after:]] + self.planned))

    def save(self) -> None:
        """Write the queue to :attr:`path` (remove the file when the queue is empty)."""
        if not self.records:
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records))
        tmp.replace(self.path)
