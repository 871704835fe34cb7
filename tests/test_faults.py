"""Faults with real processes: the tracking server stops in the middle of a training run
(issue 16, item 1).

A real ``mlflow server`` (SQLite backend, proxied artifacts) is killed with its workers
after the first epoch. When it is restarted on the same port and database before training
ends, the run gets every epoch at its step and with its original time and ends FINISHED;
when it stays down until the end, ``run.json``, the console and (once it is back) the run
itself say what is missing, and the flush path (a resumed ``train_tracked``, or
``flush_train_run`` as ``cxrgaze evaluate`` and the train stage run it) delivers it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cxrgaze.checkpoint import load_checkpoint
from cxrgaze.config import resolve_run_config
from cxrgaze.experiment.delivery import INCOMPLETE_TAG
from cxrgaze.experiment.training import flush_train_run, train_tracked
from cxrgaze.tracking import CHECKPOINT_TAG, file_digest
from cxrgaze.tracking_buffer import BUFFER_FILE, Pending, metrics_record, summary

from conftest import mlflow_server

pytestmark = pytest.mark.timeout(300)

MISSING = "epochs 2-3, final metrics, history.csv, checkpoint tag, end of run"
"""What a 3-epoch run whose server stops after epoch 1 and never comes back lacks."""


@pytest.fixture
def tracking_server(tmp_path, _migrated_mlflow_db, monkeypatch):
    """A real `mlflow server` on loopback (SQLite backend, local artifacts); its URI and process."""
    db = tmp_path / "server.db"
    shutil.copyfile(_migrated_mlflow_db, db)
    (tmp_path / "server-artifacts").mkdir()
    with mlflow_server(f"sqlite:///{db}", tmp_path / "server-artifacts", tmp_path / "server.log") as (uri, proc):
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            yield uri, proc
        finally:
            while mlflow.active_run() is not None:
                try:
                    mlflow.end_run()
                except Exception:  # noqa: BLE001 - the server may be gone on purpose
                    pass
            mlflow.set_tracking_uri(None)


@pytest.fixture
def restart_server(tracking_server, tmp_path):
    """Start the killed server again: same port, same SQLite database, same artifacts
    (stopped at teardown); returns the time it was asked to start."""
    uri, _ = tracking_server
    with contextlib.ExitStack() as stack:
        def restart() -> float:
            asked = time.time()
            stack.enter_context(mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-artifacts",
                                              tmp_path / "server-restarted.log", port=int(uri.rsplit(":", 1)[1])))
            return asked

        yield restart


class _Outage:
    """Epoch callback: kills the server (and its workers) at the end of epoch ``stop``
    (1-based) and, with ``restart``, starts it again at the end of epoch ``back``."""

    def __init__(self, proc, stop: int = 1, restart=None, back: int | None = None) -> None:
        self.proc, self.stop, self.restart, self.back = proc, stop, restart, back
        self.restarted_at: float | None = None

    def on_epoch_end(self, record):
        epoch = record["epoch"] + 1
        if epoch == self.stop:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        if epoch == self.back:
            self.restarted_at = self.restart()


def _fast_outage(monkeypatch) -> None:
    """A stopped server refuses at once (no client retries) and the end of a run retries
    twice without waiting long: the paths of the defaults, in seconds."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr("cxrgaze.experiment.delivery.END_RETRY_WAITS", (0.2, 0.2))


@pytest.fixture
def fast_outage(monkeypatch):
    _fast_outage(monkeypatch)


def _config(epochs: int = 3):
    return resolve_run_config({"model": {"encoder": "tu-tinynet_e"}, "train": {"epochs": epochs, "batch_size": 16}},
                              "baseline")


def _epoch_steps(run_id: str) -> dict[str, list[int]]:
    """Every ``epoch_*`` metric of the run and the steps it has, in order."""
    client = MlflowClient()
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("epoch_")]
    return {k: sorted(m.step for m in client.get_metric_history(run_id, k)) for k in sorted(keys)}


def _tracking_fields(out) -> dict:
    return {k: v for k, v in json.loads((out / "run.json").read_text()).items() if k.startswith("tracking_")
            and k != "tracking_uri"}


def test_tracking_server_back_before_the_end_gets_every_epoch(tiny_prepared, tracking_server, restart_server,
                                                             fast_outage, tmp_path, capfd):
    """Killed after epoch 1, restarted after epoch 2: the run gets epoch 2 (queued) with its
    original time, then epoch 3, at the steps of an uninterrupted run; it ends FINISHED,
    untagged, and ``run.json`` says nothing is missing."""
    uri, proc = tracking_server
    prepared, split = tiny_prepared
    outage = _Outage(proc, stop=1, restart=restart_server, back=2)
    out = tmp_path / "train"
    result, run_id = train_tracked(_config(), prepared, split, out, callbacks=[outage], progress=False)
    assert len(result.history) == 3
    err = capfd.readouterr().err
    assert f"MLflow tracking lost ({uri}) at epoch 2" in err
    assert f"MLflow tracking back ({uri}): run {run_id} got epoch 2, with their original steps and times" in err
    assert "incomplete" not in err

    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert INCOMPLETE_TAG not in run.data.tags
    assert run.data.tags[CHECKPOINT_TAG] == file_digest(out / "best.pt")
    assert run.data.metrics["best_epoch"] == result.best_epoch + 1
    assert [a.path for a in client.list_artifacts(run_id)] == ["history.csv"]
    epoch2 = [m for m in client.get_metric_history(run_id, "epoch_val_auc_macro") if m.step == 2]
    assert len(epoch2) == 1 and epoch2[0].timestamp <= outage.restarted_at * 1000, "logged when it ended, not when sent"
    assert _tracking_fields(out) == {} and not (out / BUFFER_FILE).exists()

    _, control = train_tracked(_config(), prepared, split, tmp_path / "control", progress=False)
    steps = _epoch_steps(run_id)
    assert steps == _epoch_steps(control) and steps["epoch_val_auc_macro"] == [1, 2, 3]


@pytest.mark.parametrize("retries", ["fast", pytest.param("defaults", marks=pytest.mark.slow)])
def test_tracking_server_down_until_the_end_says_what_is_missing_then_flushes(
        retries, tiny_prepared, tracking_server, restart_server, tmp_path, capfd, monkeypatch):
    """Killed after epoch 1 and down until training ended: training finishes and its files
    are complete; the console, ``run.json`` and (once the server is back) the run's tag and
    status say what the run lacks; the flush path then delivers it with the kept steps and
    times and the run ends FINISHED, untagged. ``defaults``: cxrgaze's client retries and
    end-of-run retries (about 30 s of waiting for a server that does not answer)."""
    if retries == "fast":
        _fast_outage(monkeypatch)
    uri, proc = tracking_server
    prepared, split = tiny_prepared
    out = tmp_path / "train"
    started = time.monotonic()
    result, run_id = train_tracked(_config(), prepared, split, out, callbacks=[_Outage(proc)], progress=False)
    assert time.monotonic() - started < 120, "a stopped server must cost seconds, not minutes"
    assert len(result.history) == 3 and len(pd.read_csv(out / "history.csv")) == 3
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 3
    assert load_checkpoint(out / "last.pt")["epoch"] == 2 and load_checkpoint(out / "best.pt")
    assert mlflow.active_run() is None, "the lost run must not block the next one"
    err = capfd.readouterr().err
    assert f"MLflow tracking lost ({uri}) at epoch 2" in err
    assert f"training finished, but MLflow run {run_id} is incomplete: it lacks {MISSING}" in err
    assert str(out / BUFFER_FILE) in err
    fields = _tracking_fields(out)
    assert fields["tracking_incomplete"] == MISSING and fields["tracking_buffer"] == BUFFER_FILE
    assert fields["tracking_lost"].startswith("epoch 2: ")
    queued = [json.loads(line) for line in (out / BUFFER_FILE).read_text().splitlines()]
    assert [r["what"] for r in queued] == ["epoch 2", "epoch 3", "final metrics", "history.csv", "checkpoint tag",
                                           "end of run"]

    restart_server()
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING", "the server never heard the end of the run"
    assert run.data.tags[INCOMPLETE_TAG] == MISSING == fields["tracking_incomplete"]
    assert CHECKPOINT_TAG not in run.data.tags and _epoch_steps(run_id)["epoch_val_auc_macro"] == [1]

    assert flush_train_run(out) is None
    assert f"MLflow tracking back ({uri}): run {run_id} got {MISSING}" in capfd.readouterr().err
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == queued[-1]["end_time"]
    assert INCOMPLETE_TAG not in run.data.tags
    assert run.data.tags[CHECKPOINT_TAG] == file_digest(out / "best.pt")
    assert [a.path for a in client.list_artifacts(run_id)] == ["history.csv"]
    steps = _epoch_steps(run_id)
    assert len(steps) > 5 and all(s == [1, 2, 3] for s in steps.values()), steps
    sent = {m.step: m.timestamp for m in client.get_metric_history(run_id, "epoch_val_auc_macro")}
    assert [sent[2], sent[3]] == [queued[0]["timestamp"], queued[1]["timestamp"]]
    assert _tracking_fields(out) == {} and not (out / BUFFER_FILE).exists()
    assert flush_train_run(out) is None, "nothing left to send"


def test_the_same_train_again_sends_what_the_server_missed(tiny_prepared, tracking_server, restart_server,
                                                           fast_outage, tmp_path, capfd):
    """The other flush path: the same ``train_tracked`` into the folder once the server is
    back resumes the run, sends the queue first and trains nothing again."""
    _, proc = tracking_server
    prepared, split = tiny_prepared
    out = tmp_path / "train"
    _, run_id = train_tracked(_config(), prepared, split, out, callbacks=[_Outage(proc)], progress=False)
    assert _tracking_fields(out)["tracking_incomplete"] == MISSING
    restart_server()
    capfd.readouterr()
    result, again = train_tracked(_config(), prepared, split, out, progress=False)
    assert again == run_id and len(result.history) == 3
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    assert f"run {run_id} got epochs 2-3, final metrics, history.csv, checkpoint tag" in capfd.readouterr().err
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and INCOMPLETE_TAG not in run.data.tags
    steps = _epoch_steps(run_id)
    assert len(steps) > 5 and all(s == [1, 2, 3] for s in steps.values()), steps
    assert _tracking_fields(out) == {} and not (out / BUFFER_FILE).exists()


def test_tracking_server_running_gets_the_whole_run(tiny_prepared, tracking_server, tmp_path):
    """The same run through a healthy server: everything arrives, nothing is queued (the
    control for the tests above)."""
    prepared, split = tiny_prepared
    _, run_id = train_tracked(_config(epochs=2), prepared, split, tmp_path / "train", progress=False)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and INCOMPLETE_TAG not in run.data.tags
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "epoch_val_auc_macro")] == [1, 2]
    assert _tracking_fields(tmp_path / "train") == {} and not (tmp_path / "train" / BUFFER_FILE).exists()


def test_the_queue_keeps_its_run_order_and_says_what_is_missing(tmp_path, capsys):
    """The queue on disk: records of another run are dropped with a note, an end record is
    dropped for a resumed run, and the summary lists epochs as ranges."""
    path = tmp_path / BUFFER_FILE
    old = Pending(path, "old-run")
    old.add(metrics_record("epoch 1", {"x": 1.0}, 1, 10))
    old.save()
    mine = Pending(path, "run")
    assert mine.records == [] and "dropped what another MLflow run never received (epoch 1)" in capsys.readouterr().err
    mine.planned = ["epoch 2", "epoch 3", "epoch 5", "final metrics", "end of run"]
    mine.add(metrics_record("epoch 2", {"x": 2.0}, 2, 20))
    assert summary(mine.missing()) == "epochs 2-3, 5, final metrics, end of run"
    mine.add(metrics_record("epoch 3", {"x": 3.0}, 3, 30))
    assert summary(mine.missing(after=1)) == "epochs 3, 5, final metrics, end of run"
    mine.add({"kind": "end", "what": "end of run"})
    mine.save()
    assert [r["what"] for r in Pending(path, "run").records] == ["epoch 2", "epoch 3", "end of run"]
    assert [r["what"] for r in Pending(path, "run", keep_end=False).records] == ["epoch 2", "epoch 3"]
    mine.records.clear()
    mine.save()
    assert not path.exists()


def _held_by_another_process(folder):
    """A child process holding ``folder``'s output lock (:mod:`cxrgaze.outlock`) until killed."""
    import subprocess
    import sys

    code = ("import sys, time\nfrom cxrgaze.outlock import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _queued_run(folder, run_id, *records):
    """``folder`` as a training left it for ``run_id``: ``run.json`` and a queue of ``records``."""
    from cxrgaze.tracking import write_run_file

    write_run_file(folder, run_id=run_id, variant="baseline")
    pending = Pending(folder / BUFFER_FILE, run_id)
    pending.add(*records)
    pending.save()


def test_a_refused_resume_and_a_finished_folder_leave_the_run_as_it_was(tiny_prepared, mlflow_store, tmp_path):
    """Issue item 2: the same training again on a finished folder does not reopen its
    FINISHED run (no new end time, no second best_* or history.csv); another config is
    refused with the train loop's one line before MLflow is touched."""
    prepared, split = tiny_prepared
    out = tmp_path / "train"
    _, run_id = train_tracked(_config(epochs=1), prepared, split, out, progress=False)
    client = MlflowClient()
    before = client.get_run(run_id)
    assert before.info.status == "FINISHED"
    time.sleep(0.01)
    result, again = train_tracked(_config(epochs=1), prepared, split, out, progress=False)
    assert again == run_id and len(result.history) == 1
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert len(client.get_metric_history(run_id, "best_epoch")) == 1
    assert len(client.get_metric_history(run_id, "epoch_val_auc_macro")) == 1
    assert [a.path for a in client.list_artifacts(run_id)] == ["history.csv"]
    with pytest.raises(ValueError, match="written by a run with a different config; .*--no-resume"):
        train_tracked(_config(epochs=2), prepared, split, out, progress=False)
    refused = client.get_run(run_id)
    assert refused.info.status == "FINISHED" and refused.info.end_time == before.info.end_time
    assert INCOMPLETE_TAG not in refused.data.tags
    assert len(client.search_runs([before.info.experiment_id])) == 1


def test_run_exists_tells_a_missing_run_from_an_unreachable_store(mlflow_store, tmp_path, monkeypatch):
    """Issue item 5: only "no such run" (or deleted) is False; a store that does not answer
    is a TrackingError, and the train stage's finish_train_run then says the run may still
    lack its end (so the stage keeps the resume folder) instead of None."""
    from cxrgaze.experiment.training import finish_train_run
    from cxrgaze.tracking import TrackingError, run_exists, set_experiment, write_run_file

    client = MlflowClient()
    experiment = set_experiment()
    live, gone = (client.create_run(experiment).info.run_id for _ in range(2))
    client.delete_run(gone)
    assert run_exists(live) and not run_exists(gone) and not run_exists("0" * 32)
    write_run_file(tmp_path / "train", run_id=live)

    from conftest import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    with pytest.raises(TrackingError, match=f"cannot read run {live}"):
        run_exists(live)
    missing = finish_train_run(tmp_path / "train")
    assert missing is not None and missing.startswith("end of run")


def test_a_crash_or_a_flushed_queue_leaves_no_incomplete_tag(tiny_prepared, mlflow_store, tmp_path):
    """Issue item 6: a training that crashes with nothing queued ends FAILED without the
    tag (its planned epochs are not an outage's loss); a queue without an end record,
    once delivered, removes the tag."""
    prepared, split = tiny_prepared

    class Crash:
        def on_epoch_end(self, record):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train_tracked(_config(epochs=2), prepared, split, tmp_path / "crash", callbacks=[Crash()], progress=False)
    client = MlflowClient()
    run = client.get_run(json.loads((tmp_path / "crash" / "run.json").read_text())["run_id"])
    assert run.info.status == "FAILED" and INCOMPLETE_TAG not in run.data.tags

    # issue item 2 on an unfinished run: a resume that train() would refuse (another
    # config, a prepared folder that is not one) leaves the run as the crash left it
    with pytest.raises(ValueError, match="written by a run with a different config; .*--no-resume"):
        train_tracked(_config(epochs=3), prepared, split, tmp_path / "crash", progress=False)
    with pytest.raises(FileNotFoundError):
        train_tracked(_config(epochs=2), tmp_path / "no-prepared", split, tmp_path / "crash", progress=False)
    again = client.get_run(run.info.run_id)
    assert (again.info.status, again.info.end_time, again.data.tags) == (run.info.status, run.info.end_time,
                                                                         run.data.tags)

    run_id = client.create_run(run.info.experiment_id, tags={INCOMPLETE_TAG: "epoch 2"}).info.run_id
    _queued_run(tmp_path / "queued", run_id, metrics_record("epoch 2", {"x": 2.0}, 2, 20))
    assert flush_train_run(tmp_path / "queued") is None
    assert INCOMPLETE_TAG not in client.get_run(run_id).data.tags
    assert [m.step for m in client.get_metric_history(run_id, "x")] == [2]


def test_a_record_the_store_refuses_for_good_is_set_aside(mlflow_store, tmp_path, capfd):
    """Issue item 7: a param the run already has with another value (INVALID_PARAMETER_VALUE)
    and an artifact whose file is gone are named once each, moved to the rejected file, and
    the rest of the queue is delivered."""
    from cxrgaze.tracking import set_experiment
    from cxrgaze.tracking_buffer import REJECTED_FILE, artifact_record, params_record

    client = MlflowClient()
    run_id = client.create_run(set_experiment()).info.run_id
    client.log_param(run_id, "a", "1")
    folder = tmp_path / "train"
    _queued_run(folder, run_id, params_record("run params", {"a": "2"}), artifact_record("gone.csv"),
                metrics_record("epoch 1", {"x": 1.0}, 1, 10))
    assert flush_train_run(folder) is None
    assert [m.step for m in client.get_metric_history(run_id, "x")] == [1]
    assert not (folder / BUFFER_FILE).exists()
    rejected = [json.loads(line) for line in (folder / REJECTED_FILE).read_text().splitlines()]
    assert [r["what"] for r in rejected] == ["run params", "gone.csv"]
    err = capfd.readouterr().err
    assert f"MLflow run {run_id} refused run params" in err and f"MLflow run {run_id} refused gone.csv" in err


def test_a_folder_another_process_holds_is_not_closed(mlflow_store, tmp_path):
    """Issue item 15: while another process holds the folder, finish_train_run is refused
    with FolderInUse and the run is left RUNNING; flush_train_run says it sent nothing."""
    from cxrgaze.experiment.training import finish_train_run
    from cxrgaze.outlock import FolderInUse
    from cxrgaze.tracking import set_experiment

    client = MlflowClient()
    run_id = client.create_run(set_experiment()).info.run_id
    folder = tmp_path / "train"
    _queued_run(folder, run_id, metrics_record("epoch 1", {"x": 1.0}, 1, 10))
    (folder / "best.pt").write_bytes(b"weights")
    (folder / "history.csv").write_text("epoch\n0\n")
    (folder / "metrics.json").write_text(json.dumps({"best_epoch": 0, "val_auc_macro": 0.5}))
    proc = _held_by_another_process(folder)
    try:
        assert flush_train_run(folder) is not None
        with pytest.raises(FolderInUse):
            finish_train_run(folder)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and "x" not in run.data.metrics
