"""The default paths of the DVC pipeline's layout (dvc.yaml); the library takes paths as
arguments and never names them.

The command line's defaults and ``cxrgaze summary`` read these constants, and the entry
points (:func:`cxrgaze.cli.main`, the stage scripts in ``pipelines/``) take the data version
from ``data.dvc`` here (:func:`export_data_version`): this module is the one place in
``src/`` that knows the pipeline's folders and DVC files. Paths are relative to the
project folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from cxrgaze import DATA_VERSION_ENV

PARAMS = "params.yaml"
"""The pipeline's parameters."""
MLFLOW_DB = "mlflow.db"
"""The default MLflow tracking store (SQLite; artifacts in ``mlruns/``)."""
DICOM_DIR = "data/mimic-cxr"
"""The MIMIC-CXR root (DICOM files)."""
PREPARED = "outputs/prepared"
"""``prepare``: decoded arrays, gaze heatmaps, manifest.csv, excluded.csv, meta.json."""
SPLIT = "outputs/split.csv"
"""``split``: the patient-level train/val/test split."""
TUNE_BEST = "outputs/tune/best.yaml"
"""``tune``: the tuned per-variant overrides."""
TRAIN_ROOT = "outputs/train"
"""``train``: a folder per variant, in it a ``seedS`` folder per seed."""
EVAL_ROOT = "outputs/eval"
"""``evaluate``: a folder per variant."""
REGISTER_JSON = "outputs/register.json"
"""``register``: the registry's decision."""
REPORTS = "reports"
"""``report``: results.md, results.json, paired.csv."""
RESULTS_MD = "reports/results.md"
"""``report``: the full report."""
TUNE_METRICS = "metrics/tune.json"
"""``tune``'s DVC metric: which variants were tuned."""
HEADLINE = "metrics/headline.json"
"""``report``'s DVC metric: the per-variant headline numbers."""

DATA_DVC = "data.dvc"
"""The DVC file of ``data/`` (the raw DICOMs and EGD-CXR tables): its md5 is the data version."""


def data_version(root: str | Path = ".") -> str | None:
    """The data version: the md5 that ``data.dvc`` records for ``data/`` (None without one,
    or when the file is not the DVC file it should be: the version is a tag, never a reason
    to stop a command)."""
    path = Path(root) / DATA_DVC
    try:
        outs = yaml.safe_load(path.read_text()).get("outs") or []
        md5 = outs[0].get("md5") if isinstance(outs, list) and outs and isinstance(outs[0], dict) else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        return None
    return str(md5) if md5 else None


_exported: str | None = None
"""The value :func:`export_data_version` last set in this process."""


def export_data_version(root: str | Path = ".") -> None:
    """Make :func:`data_version` of ``root`` the version every MLflow run of this process
    (and of the workers and ranks it starts) is tagged with (:data:`cxrgaze.DATA_VERSION_ENV`).

    A value set by the user (or by the process that started this one) is kept; a value this
    function set earlier is replaced, so a process that runs commands in several projects
    tags each one's runs with that project's version."""
    global _exported
    current = os.environ.get(DATA_VERSION_ENV)
    if current and current != _exported:
        return
    version = data_version(root)
    if version:
        os.environ[DATA_VERSION_ENV] = version
    else:
        os.environ.pop(DATA_VERSION_ENV, None)
    _exported = version
