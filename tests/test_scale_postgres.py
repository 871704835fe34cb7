"""Scaling out on a real PostgreSQL (started by :mod:`postgres_fixture`): two `cxrgaze tune`
commands sharing one study, an MLflow tracking server with PostgreSQL as its backend store,
and a tune worker killed mid-trial whose trial is failed and retried through its stale
heartbeat (also with SQLite, which needs no server and always runs)."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cxrgaze.config import tune_config
from cxrgaze.tune.storage import TRIAL_RUN_ATTR, live_trials, open_study

from conftest import mlflow_server as start_mlflow_server
from conftest import tool_env
from postgres_fixture import postgres, postgres_url  # noqa: F401,F811 - fixtures

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TINY = {
    "model": {"encoder": "tu-tinynet_e", "decoder_channels": [32, 16, 16, 8, 8]},
    "train": {"batch_size": 16, "lr": 0.003, "device": "cpu"},
    "variants": {"unet": {}, "set3-gbp": {}, "set3-deconv": {}},
}
HEARTBEAT, GRACE = 1, 4
"""Seconds: a dead worker's trial is failed and retried ``GRACE`` s after its last heartbeat."""


def tune_params(storage: str, **tune) -> dict:
    return {**TINY, "tune": {"storage": storage, "study_prefix": f"scale-{uuid.uuid4().hex[:8]}", "variants": ["set3-gbp"],
                             "n_trials": 4, "epochs": 1, "n_startup_trials": 10, "n_warmup_steps": 0,
                             "heartbeat_interval": HEARTBEAT, "grace_period": GRACE,
                             "space": {"alpha": {"low": 0.0, "high": 1.0}}, **tune}}


class Workers:
    """`cxrgaze tune` commands started as separate processes (as on separate machines); all
    of them are killed at the end, whatever happened."""

    def __init__(self, folder: Path, params: dict, tiny_prepared, tracking_uri: str) -> None:
        self.folder, self.prepared, self.split = folder, *tiny_prepared
        self.params_path = folder / "params.yaml"
        self.params_path.write_text(yaml.safe_dump(params))
        self.env = {**tool_env(), "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # two workers, few cores: no oversubscription
        self.env.pop("MLFLOW_EXPERIMENT_NAME", None)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self) -> subprocess.Popen:
        k = len(self.procs)
        log = self.folder / f"worker-{k}.log"
        cmd = [sys.executable, "-m", "cxrgaze.cli", "tune", "--variant", "set3-gbp", "--params", str(self.params_path),
               "--prepared", str(self.prepared), "--split", str(self.split), "--out", str(self.folder / f"best-{k}.yaml")]
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=self.folder, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def output(self, proc: subprocess.Popen) -> str:
        return self.logs[self.procs.index(proc)].read_text(errors="replace")

    def wait(self, proc: subprocess.Popen, timeout: float = 240) -> str:
        """Wait for a worker to exit; fail with its output unless it exited 0."""
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(proc)
            pytest.fail(f"tune worker {proc.pid} still running after {timeout} s:\n{self.output(proc)[-4000:]}")
        out = self.output(proc)
        assert proc.returncode == 0, f"tune worker {proc.pid} exited {proc.returncode}:\n{out[-4000:]}"
        return out

    def close(self) -> None:
        for proc in self.procs:
            kill(proc)


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL, grace: float = 10) -> None:
    """Send ``sig`` to a process started in its own session and to its children (SIGKILL
    after ``grace`` s); reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture
def workers(tmp_path, tiny_prepared):
    made: list[Workers] = []

    def make(params: dict, tracking_uri: str) -> Workers:
        made.append(Workers(tmp_path, params, tiny_prepared, tracking_uri))
        return made[-1]

    yield make
    for w in made:
        w.close()


def mlflow_sqlite(template: Path, folder: Path) -> str:
    shutil.copyfile(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def child_runs(client: MlflowClient, parent_id: str) -> list:
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def wait_for_trial(procs: list[subprocess.Popen], study: optuna.Study, client: MlflowClient, workers: Workers,
                   timeout: float = 180) -> tuple[subprocess.Popen, int]:
    """The first of ``procs`` seen running a trial whose MLflow run exists (training is under
    way), and that trial's number."""
    by_pid = {str(proc.pid): proc for proc in procs}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            run_id = trial.user_attrs.get(TRIAL_RUN_ATTR)
            if run_id:
                pid = client.get_run(run_id).data.tags.get("cxrgaze.worker", "").rsplit(":", 1)[-1]
                if pid in by_pid:
                    return by_pid[pid], trial.number
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"worker {proc.pid} exited {proc.returncode} before we could kill it:\n"
                            f"{workers.output(proc)[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"no worker ran a trial in {timeout} s:\n" + "\n".join(workers.output(p)[-2000:] for p in procs))


def check_killed_trial_retried(study: optuna.Study, killed: int, n_trials: int, client: MlflowClient) -> None:
    """The killed trial ended FAIL, one retry with its parameters completed, and the study holds
    ``n_trials`` live trials, all complete."""
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(n_trials + 1)), "one trial more than the budget: the retry"
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [killed]
    retries = [t for t in trials if t.system_attrs.get("retry_history") == [killed]]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == trials[killed].params
    live = live_trials(study)
    assert len(live) == n_trials and killed not in {t.number for t in live}
    assert all(t.state == TrialState.COMPLETE for t in live)
    run = client.get_run(trials[killed].user_attrs[TRIAL_RUN_ATTR])  # the dead worker's MLflow run
    assert run.info.status == "FAILED" and run.data.tags["optuna.trial.state"] == "FAIL"
    assert run.data.tags["cxrgaze.error"] == "worker stopped sending heartbeats"
    assert client.get_run(retries[0].user_attrs[TRIAL_RUN_ATTR]).info.status == "FINISHED"


# --- SQLite: no server needed, always runs ----------------------------------------------------


def test_sqlite_a_killed_workers_trial_is_failed_and_retried_by_the_next_worker(workers, tmp_path, _migrated_mlflow_db):
    tracking_uri = mlflow_sqlite(_migrated_mlflow_db, tmp_path)
    params = tune_params(f"sqlite:///{tmp_path / 'optuna.db'}", n_trials=2)
    study = open_study(tune_config(params), "set3-gbp")  # created here so the test can watch it
    client = MlflowClient(tracking_uri=tracking_uri)
    w = workers(params, tracking_uri)

    first = w.start()
    _, killed = wait_for_trial([first], study, client, w)
    kill(first)  # SIGKILL mid-trial: no Python cleanup, the trial stays RUNNING
    assert first.returncode == -signal.SIGKILL
    assert study.get_trials()[killed].state == TrialState.RUNNING

    second = w.start()  # another worker, later: it fails the stale trial and runs it again
    w.wait(second)
    check_killed_trial_retried(study, killed, 2, client)


# --- PostgreSQL ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """``mlflow server`` with a fresh PostgreSQL database as backend store and a local folder as
    artifact destination (proxied: clients need only the URL); yields ``(url, artifact_folder)``."""
    backend = postgres.new_database("mlflow")
    root = tmp_path_factory.mktemp("mlflow-server")
    artifacts = root / "artifacts"
    with start_mlflow_server(backend, artifacts, root / "server.log") as (url, _):
        yield url, artifacts


def test_two_tune_commands_share_one_postgresql_study_exactly(postgres, mlflow_server, workers):
    """Two `cxrgaze tune` commands, as on two machines: one PostgreSQL study (a fresh database,
    so creating Optuna's tables races too), one MLflow server."""
    server_url, _ = mlflow_server
    n_trials = 4
    params = tune_params(postgres.new_database("optuna"), n_trials=n_trials)
    w = workers(params, server_url)
    procs = [w.start(), w.start()]
    for proc in procs:
        w.wait(proc)

    study = optuna.load_study(study_name=f"{params['tune']['study_prefix']}-set3-gbp", storage=params["tune"]["storage"])
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(n_trials))  # exactly the budget: none lost, none extra
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.params["alpha"] for t in trials}) == n_trials  # the workers do not propose the same values
    client = MlflowClient(tracking_uri=server_url)
    parent_id = study.user_attrs["cxrgaze.mlflow_parent_run_id"]
    runs = child_runs(client, parent_id)
    assert sorted(r.info.run_id for r in runs) == sorted(t.user_attrs[TRIAL_RUN_ATTR] for t in trials)
    assert {r.data.tags["cxrgaze.worker"].rsplit(":", 1)[1] for r in runs} == {str(p.pid) for p in procs}
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_complete"] == n_trials
    assert "optimization_history.png" in {a.path for a in client.list_artifacts(parent_id)}


def test_postgresql_a_killed_workers_trial_is_failed_and_retried_by_the_other(postgres_url, mlflow_server, workers):
    server_url, _ = mlflow_server
    n_trials = 3
    params = tune_params(postgres_url, n_trials=n_trials)
    study = open_study(tune_config(params), "set3-gbp")  # created here so the test can watch it
    client = MlflowClient(tracking_uri=server_url)
    w = workers(params, server_url)
    procs = [w.start(), w.start()]

    victim, killed = wait_for_trial(procs, study, client, w)  # whichever runs a trial first
    survivor = next(p for p in procs if p is not victim)
    kill(victim)  # SIGKILL mid-trial: its connections drop, its trial stays RUNNING
    assert victim.returncode == -signal.SIGKILL
    out = w.wait(survivor)  # runs the rest, waits for the dead trial's heartbeat to go stale, runs its retry
    check_killed_trial_retried(study, killed, n_trials, client)
    parent = client.get_run(study.user_attrs["cxrgaze.mlflow_parent_run_id"])
    assert parent.data.metrics["trials_complete"] == n_trials and parent.data.metrics["trials_retried"] == 1
    assert "3 complete" in out


def test_training_and_evaluation_through_an_mlflow_server_on_postgresql(mlflow_server, tiny_prepared, tmp_path, monkeypatch):
    """A client that knows only ``MLFLOW_TRACKING_URI``: run, params, metrics, artifacts and a
    registered model version, all through the server."""
    import mlflow

    from cxrgaze.config import EvalConfig, resolve_run_config
    from cxrgaze.experiment.evaluation import evaluate_tracked
    from cxrgaze.experiment.training import train_tracked

    server_url, artifacts = mlflow_server
    prepared, split = tiny_prepared
    monkeypatch.chdir(tmp_path)  # nothing may land in a local ./mlruns or ./mlflow.db
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"scale-{uuid.uuid4().hex[:8]}")
    mlflow.set_tracking_uri(None)  # follow the environment, as a fresh client would
    try:
        config = resolve_run_config({**TINY, "train": {**TINY["train"], "epochs": 1}}, "unet")
        result, run_id = train_tracked(config, prepared, split, tmp_path / "train", progress=False)
        dicom_dir = prepared.parent / "data" / "mimic-cxr"
        _, eval_run, model_uri = evaluate_tracked(tmp_path / "train", prepared, split, tmp_path / "eval",
                                                  EvalConfig(n_resamples=100), progress=False)
        client = MlflowClient(tracking_uri=server_url)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["model.encoder"] == "tu-tinynet_e" and run.data.params["train.epochs"] == "1"
        assert run.data.metrics["best_val_auc_macro"] == pytest.approx(result.best["val_auc_macro"])
        assert [m.step for m in client.get_metric_history(run_id, "epoch_val_auc_macro")] == [1]
        evaluated = client.get_run(eval_run)
        assert evaluated.data.tags["mlflow.parentRunId"] == run_id and evaluated.data.tags["cxrgaze.evaluated"] == "true"
        assert "test_auc_macro" in evaluated.data.metrics
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
        assert "history.csv" in {a.path for a in client.list_artifacts(run_id)}
        assert {"figures", "evaluation"} <= {a.path for a in client.list_artifacts(eval_run)}
        fetched = client.download_artifacts(run_id, "history.csv", str(tmp_path))
        assert Path(fetched).read_text() == (tmp_path / "train" / "history.csv").read_text()
        assert list(artifacts.rglob("history.csv")), "the server stores the artifacts in its destination"
        assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()

        # The model registry of the same server: register, alias, load back and predict.
        name = f"cxrgaze-scale-{uuid.uuid4().hex[:6]}"
        version = mlflow.register_model(model_uri, name)
        client.set_registered_model_alias(name, "champion", version.version)
        assert client.get_model_version_by_alias(name, "champion").run_id == eval_run  # the model is the evaluation run's
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")  # downloaded through the server
        manifest = pd.read_csv(prepared / "manifest.csv", dtype=str).set_index("dicom_id")
        predictions = pd.read_csv(tmp_path / "eval" / "predictions.csv", dtype={"dicom_id": str})
        case = predictions[predictions["split"] == "test"].iloc[0]
        payload = base64.b64encode((dicom_dir / manifest.loc[case["dicom_id"], "path"]).read_bytes()).decode()
        served = model.predict(pd.DataFrame({"image": [payload]}), params={"heatmap": "none"})
        cols = ["prob_Normal", "prob_CHF", "prob_pneumonia"]
        np.testing.assert_allclose(served[cols].to_numpy()[0], case[cols].to_numpy(float), atol=1e-5)
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
