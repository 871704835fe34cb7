"""MLflow tracking: one run per trained model, found again by what it produced.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (a server, a database, anything MLflow
takes), else MLflow's default, ``sqlite:///mlflow.db`` in the working directory with
artifacts under ``./mlruns``, so plain ``mlflow ui`` in the repository root shows
everything.

Stage outputs hold no run ids: DVC versions them by content, so they must be the same
wherever and whenever the pipeline produces them (a run id would make every ``dvc.lock``
differ). Instead a run is tagged with the SHA-256 of what it produced, and later stages
find it by that tag (:func:`find_runs`): a training run by its ``best.pt``
(:data:`CHECKPOINT_TAG`), an evaluation by its ``metrics.json`` (:data:`EVALUATION_TAG`).

Every run also carries :func:`run_context`, the git revision and, under ``dvc exp run``,
the DVC experiment's name (DVC puts it in the stage's environment), so that runs of an
experiment are told apart from its baseline's, and a later stage prefers the runs of its own
revision and experiment (:func:`same_context`).

The training callback (:class:`EpochLogger`) logs each epoch's record, so the train loop
knows nothing of MLflow; a training run's epochs go through the guard of
:mod:`cxrgaze.experiment.delivery`, which queues what a stopped tracking server does not
take and sends it when the server answers again (:mod:`cxrgaze.tracking_buffer`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterable, Mapping

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from cxrgaze import DATA_VERSION_ENV
from cxrgaze.errors import reason
from cxrgaze.mlflow_ui import experiment_tag_updates

EXPERIMENT = "cxrgaze"
"""The MLflow experiment of every cxrgaze run (overridable with ``MLFLOW_EXPERIMENT_NAME``)."""

RUN_FILE = "run.json"
"""Name of the file that carries a training run's MLflow run id beside its resume state
(``last.pt``), so that a killed run resumes into the same MLflow run. Never in a DVC output."""

CHECKPOINT_TAG = "cxrgaze.checkpoint_sha256"
"""Tag of a run that trained (or evaluated) a checkpoint: the SHA-256 of its ``best.pt``."""

NOTE_TAG = "mlflow.note.content"
"""The tag the MLflow UI shows as a run's (or experiment's) description (markdown)."""

EVALUATED_TAG = "cxrgaze.evaluated"
"""``true`` on a run that holds a finished evaluation and its servable model (the registry
considers only these)."""

EVALUATION_TAG = "cxrgaze.evaluation_sha256"
"""Tag of an evaluation run: the SHA-256 of the ``metrics.json`` it wrote."""

GIT_REVISION_TAG = "cxrgaze.git_revision"
"""The commit the run's code and params came from (``HEAD``; a ``dvc exp run``'s baseline)."""

DVC_EXPERIMENT_TAG = "cxrgaze.dvc_experiment"
"""The DVC experiment's name (``DVC_EXP_NAME``), absent outside ``dvc exp run``."""

HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""Applied unless set: with MLflow's own defaults (7 retries, exponential backoff) one call
to a stopped tracking server blocks for minutes; these give up in seconds, and the
:class:`~cxrgaze.experiment.delivery.TrackingGuard` lets the work go on."""


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or does not hold the run an output names."""


def experiment_name(name: str | None = None) -> str:
    """``MLFLOW_EXPERIMENT_NAME``, else ``name``, else :data:`EXPERIMENT`."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or name or EXPERIMENT


def set_experiment(name: str | None = None) -> str:
    """Select (creating if needed) the cxrgaze experiment; returns its id.

    ``MLFLOW_EXPERIMENT_NAME`` wins over ``name``, so a user can point a pipeline at
    another experiment without editing anything.
    """
    name = experiment_name(name)
    apply_http_defaults()
    try:
        experiment = mlflow.set_experiment(name)
        label_experiment(experiment.experiment_id, experiment.tags)
        return experiment.experiment_id
    except Exception as exc:  # noqa: BLE001 - any store failure is one user-facing reason
        raise TrackingError(f"MLflow tracking store {mlflow.get_tracking_uri()}: "
                            f"{reason(exc)}") from exc


def label_experiment(experiment_id: str, tags: Mapping[str, str], attempts: int = 3) -> None:
    """Write the experiment's kind, description and results view where they are missing or
    stale (:func:`~cxrgaze.mlflow_ui.experiment_tag_updates`; a user's description stays).

    Commands started together (two ``cxrgaze tune`` workers on one study) label the same new
    experiment at once; a store checks whether a tag exists before inserting it, so the
    slower writer can hit a duplicate-key error. A failed write is therefore retried against
    the tags as the store holds them now, where the other writer's tag is an update, not an
    insert; the error is raised only after ``attempts`` such rounds.
    """
    client = MlflowClient()
    for attempt in range(attempts):
        try:
            for key, value in experiment_tag_updates(experiment_id, tags).items():
                client.set_experiment_tag(experiment_id, key, value)
            return
        except Exception:  # noqa: BLE001 - re-read and retry; the last failure is raised
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
            tags = client.get_experiment(experiment_id).tags


def apply_http_defaults() -> None:
    """Set :data:`HTTP_DEFAULTS` where the environment does not."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def data_version() -> str | None:
    """The data version runs are tagged with: :data:`DATA_VERSION_ENV` (None when unset)."""
    return os.environ.get(DATA_VERSION_ENV) or None


def git_commit(root: str | Path = ".") -> str | None:
    """``HEAD``'s commit, with ``-dirty`` when tracked files differ from it (None outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def git_revision(root: str | Path = ".") -> str | None:
    """``HEAD``'s commit without ``-dirty``: ``dvc repro`` rewrites ``dvc.lock`` between
    stages, so the dirty flag is no identity of a pipeline run (None outside git)."""
    commit = git_commit(root)
    return commit.removesuffix("-dirty") if commit else None


def run_context(root: str | Path = ".") -> dict[str, str]:
    """The tags that tell which revision and DVC experiment a run belongs to."""
    context = {GIT_REVISION_TAG: git_revision(root), DVC_EXPERIMENT_TAG: os.environ.get("DVC_EXP_NAME"),
               "cxrgaze.dvc_baseline": os.environ.get("DVC_EXP_BASELINE_REV")}
    return {k: v for k, v in context.items() if v}


def same_context(tags: Mapping[str, str], root: str | Path = ".") -> bool:
    """Whether a run with ``tags`` belongs to this process's revision and DVC experiment."""
    here = run_context(root)
    return all(tags.get(key) == here.get(key) for key in (GIT_REVISION_TAG, DVC_EXPERIMENT_TAG))


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (what :data:`CHECKPOINT_TAG` and :data:`EVALUATION_TAG` hold)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_runs(tags: Mapping[str, str]) -> list[Any]:
    """The active runs of the cxrgaze experiment with all of ``tags``, newest first
    (:class:`TrackingError` when the store cannot be searched)."""
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    try:
        experiment = mlflow.get_experiment_by_name(experiment_name())
        if experiment is None:
            return []
        return MlflowClient().search_runs([experiment.experiment_id], filter_string=query,
                                          order_by=["attributes.start_time DESC"])
    except Exception as exc:  # noqa: BLE001 - any store failure is one user-facing reason
        raise TrackingError(f"MLflow tracking store {mlflow.get_tracking_uri()}: cannot search runs "
                            f"({reason(exc)})") from exc


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide a result."""
    out = {"python": platform.python_version()}
    for name in ("cxrgaze", "torch", "segmentation-models-pytorch", "timm", "mlflow", "pydicom", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def run_tags(variant: str | None = None, device: str | None = None, root: str | Path = ".") -> dict[str, str]:
    """The tags every cxrgaze run carries: variant, device, git commit, revision and DVC
    experiment (:func:`run_context`), data version (:func:`data_version`, the entry
    point's), library versions."""
    tags = {"cxrgaze.variant": variant, "cxrgaze.device": device, "mlflow.source.git.commit": git_commit(root),
            "cxrgaze.data_version": data_version(), **run_context(root)}
    tags.update({f"cxrgaze.version.{k}": v for k, v in library_versions().items()})
    return {k: str(v) for k, v in tags.items() if v is not None}


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model": {"encoder": "x"}}`` -> ``{"model.encoder": "x"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = str(value)
    return out


def finite_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of a record (MLflow rejects NaN in some stores; they mean "undefined")."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class EpochLogger:
    """Training callback: logs each epoch's numeric record at ``step = epoch + 1``: steps are
    1-based epoch numbers, as the console prints them (records count epochs from 0).

    Logs into ``run_id`` through the client (safe when several runs are active, as in an
    Optuna study), or into the active run when ``run_id`` is None. With a ``guard``
    (:class:`cxrgaze.experiment.delivery.TrackingGuard`), the epoch goes to the guard's run,
    timestamped now and queued while the store is away: a tracking failure never stops training.
    """

    def __init__(self, run_id: str | None = None, prefix: str = "", guard: Any = None) -> None:
        self.run_id = run_id
        self.prefix = prefix
        self.guard = guard

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        step = int(record.get("epoch", 0)) + 1
        metrics = {f"{self.prefix}{k}": v for k, v in finite_metrics(record).items() if k != "epoch"}
        now = int(time.time() * 1000)
        if self.guard is not None:
            self.guard.send_metrics(f"epoch {step}", metrics, step, now)
        elif self.run_id is None:
            mlflow.log_metrics(metrics, step=step)
        else:
            MlflowClient().log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])


def write_run_file(out_dir: str | Path, drop: Iterable[str] = (), **fields: Any) -> Path:
    """Write (or update) ``out_dir/run.json`` with the run id and whatever else later stages
    need (``None`` values are left as they are; ``drop``: fields to remove)."""
    path = Path(out_dir) / RUN_FILE
    current = read_run_file(out_dir) if path.exists() else {}
    current.update({k: v for k, v in fields.items() if v is not None})
    for key in drop:
        current.pop(key, None)
    current.setdefault("tracking_uri", mlflow.get_tracking_uri())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_run_file(out_dir: str | Path) -> dict[str, Any]:
    """The fields of ``out_dir/run.json`` (a clear error when it is missing or damaged)."""
    path = Path(out_dir) / RUN_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no MLflow run file (run the train stage first)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not data.get("run_id"):
        raise ValueError(f"{path}: has no run_id")
    return data


def run_exists(run_id: str) -> bool:
    """Whether the current tracking store holds ``run_id`` (not deleted): False only when the
    store says it has no such run or the run is deleted; :class:`TrackingError` when the store
    cannot say (unreachable, 503, database locked...), so that a transient failure never
    passes for a missing run."""
    try:
        return read_run(run_id).info.lifecycle_stage == "active"
    except TrackingError as exc:
        cause = exc.__cause__
        if isinstance(cause, mlflow.exceptions.MlflowException) and cause.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def read_run(run_id: str) -> Any:
    """``MlflowClient().get_run(run_id)``; any failure (no such run included) is a
    :class:`TrackingError` naming the store and the run, caused by the store's exception."""
    try:
        return MlflowClient().get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - any store failure is one user-facing reason
        raise TrackingError(f"MLflow tracking store {mlflow.get_tracking_uri()}: cannot read run {run_id} "
                            f"({reason(exc)})") from exc
