"""Faults with real processes: the tracking server stops in the middle of a training run."""

from __future__ import annotations

import json
import shutil

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cxrgaze.checkpoint import load_checkpoint
from cxrgaze.config import resolve_run_config
from cxrgaze.experiment.training import train_tracked

from conftest import mlflow_server

pytestmark = pytest.mark.timeout(300)


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


class _StopServerAfterFirstEpoch:
    def __init__(self, proc) -> None:
        self.proc = proc

    def on_epoch_end(self, record):
        if record["epoch"] == 0:
            import os
            import signal

            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers
            self.proc.wait(timeout=30)


def test_tracking_server_stopped_during_a_run(tiny_prepared, tracking_server, tmp_path, capfd):
    """Training finishes, the loss of tracking is reported clearly, nothing on disk is lost."""
    uri, proc = tracking_server
    prepared, split = tiny_prepared
    config = resolve_run_config({"model": {"encoder": "tu-tinynet_e"}, "train": {"epochs": 3, "batch_size": 16}},
                                "baseline")
    out = tmp_path / "train"
    result, run_id = train_tracked(config, prepared, split, out, callbacks=[_StopServerAfterFirstEpoch(proc)],
                                   progress=False)
    assert len(result.history) == 3
    err = capfd.readouterr().err
    assert "MLflow tracking lost" in err and uri in err
    assert "training finished, but MLflow run" in err
    assert json.loads((out / "run.json").read_text())["tracking_lost"].startswith("epoch 2")
    assert len(pd.read_csv(out / "history.csv")) == 3
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 3
    assert load_checkpoint(out / "last.pt")["epoch"] == 2 and load_checkpoint(out / "best.pt")
    assert mlflow.active_run() is None, "the lost run must not block the next one"


def test_tracking_server_running_gets_the_whole_run(tiny_prepared, tracking_server, tmp_path):
    """The same run through a healthy server: everything arrives (the control for the test above)."""
    prepared, split = tiny_prepared
    config = resolve_run_config({"model": {"encoder": "tu-tinynet_e"}, "train": {"epochs": 2, "batch_size": 16}},
                                "baseline")
    _, run_id = train_tracked(config, prepared, split, tmp_path / "train", progress=False)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "epoch_val_auc_macro")] == [1, 2]
    assert "tracking_lost" not in json.loads((tmp_path / "train" / "run.json").read_text())
