"""Shared fixtures: a throwaway copy of the project in a real git + DVC repository."""

from __future__ import annotations

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


def tool_env() -> dict[str, str]:
    """Environment for subprocesses: this venv's tools first, git identity, no analytics."""
    env = dict(os.environ)
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
