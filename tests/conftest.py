"""Shared fixtures: a throwaway copy of the project in a real git + DVC repository."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Test tensors are small: one intra-op thread is as fast, and immune to a busy machine
    (two spinning OpenMP threads next to another busy process slow a step down many times).
    Subprocesses that tests start keep torch's default."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_data_version(monkeypatch):
    """Each test starts without a data version: one that an earlier test's ``cxrgaze``
    command exported must not tag this test's runs."""
    monkeypatch.delenv("CXRGAZE_DATA_VERSION", raising=False)


def tool_env() -> dict[str, str]:
    """Environment for subprocesses: this venv's tools first, git identity, no analytics,
    no inherited data version (the subprocess's own entry point reads its project's)."""
    env = dict(os.environ)
    env.pop("CXRGAZE_DATA_VERSION", None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("GIT_AUTHOR_NAME", "cxrgaze-test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@cxrgaze.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "cxrgaze-test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@cxrgaze.invalid")
    return env


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def make_project(dest: Path, params_update: dict | None = None) -> Path:
    """Copy the project's pipeline files into ``dest`` as a fresh git + DVC repository.

    ``params_update`` is merged section by section into ``params.yaml`` (tiny profiles).
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "pipelines", dest / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    if params_update:
        params = yaml.safe_load((dest / "params.yaml").read_text())
        for section, values in params_update.items():
            params.setdefault(section, {}).update(values)
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["dvc", "init", "-q"], dest)
    return dest


def tiny_pipeline_project(dest: Path, variants: dict, remote: Path | None = None) -> Path:
    """A :func:`make_project` with a tiny profile of ``variants`` (32 px, 2 epochs, 2 tuning
    trials of set3-gbp) over a tiny synthetic dataset added with DVC and committed, so that
    ``dvc repro`` of the whole pipeline takes a few minutes; ``remote``: a default DVC remote."""
    from cxrgaze.data.synth import synthesize

    root = make_project(dest)
    if remote is not None:
        run(["dvc", "remote", "add", "-q", "-d", "store", str(remote)], root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(image_size=32, workers=1)
    params["train"].update(epochs=2, batch_size=16)
    params["evaluate"].update(n_resamples=200, panel_per_class=1, sanity_images=4)
    params["tune"].update(variants=["set3-gbp"], n_trials=2, epochs=1)
    params["variants"] = variants
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    synthesize(root / "data", patients=36, seed=4, image_size=96)
    run(["dvc", "add", "-q", "data"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "tiny profile"], root)
    return root


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> tuple[Path, Path]:
    """(prepared_dir, split_csv) of a tiny synthetic dataset at 32 px, made once per session
    by the real synth -> prepare -> split chain."""
    from cxrgaze.config import DataConfig
    from cxrgaze.data.prepare import prepare
    from cxrgaze.data.split import write_split
    from cxrgaze.data.synth import synthesize

    root = tmp_path_factory.mktemp("tiny")
    synthesize(root / "data", patients=48, seed=5, image_size=128, workers=1)
    prepared = root / "prepared"
    prepare(root / "data" / "egd-cxr", root / "data" / "mimic-cxr", prepared,
            DataConfig(image_size=32, gaze_sigma=7, workers=1), progress=False)
    write_split(prepared / "manifest.csv", root / "split.csv")
    return prepared, root / "split.csv"


@pytest.fixture(scope="session")
def _migrated_mlflow_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, migrated once per session (migrations take seconds)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root = tmp_path_factory.mktemp("mlflow-template")
    SqlAlchemyStore(f"sqlite:///{root / 'mlflow.db'}", str(root / "mlruns")).engine.dispose()
    return root / "mlflow.db"


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, _migrated_mlflow_db) -> str:
    """A fresh SQLite tracking + registry store in ``tmp_path`` (also the working directory,
    so artifacts land in ``tmp_path/mlruns``); returns its URI."""
    import mlflow

    db = tmp_path / "mlflow.db"
    shutil.copyfile(_migrated_mlflow_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)  # the registry follows the tracking URI
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, log: Path, timeout: float = 120, port: int | None = None):
    """A real ``mlflow server`` on a free loopback port (or ``port``: a server restarted
    where its clients expect it), with proxied artifacts in ``artifacts`` and output in
    ``log``, healthy on entry and killed with its workers on exit; yields ``(url, process)``.
    The job runner is off: its huey consumers serve GenAI jobs only and slow the shutdown."""
    import signal
    import time
    import urllib.request

    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in tool_env().items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    cmd = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", backend_uri, "--artifacts-destination",
           artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {timeout:.0f} s:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.3)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
