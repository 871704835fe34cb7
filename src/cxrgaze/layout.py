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
    """The data version: the md5 that ``data.dvc`` records for ``data/`` (None without one)."""
    path = Path(root) / DATA_DVC
    if not path.exists():
        return None
    try:
        outs = yaml.safe_load(path.read_text()).get("outs") or []
    except (yaml.YAMLError, AttributeError):
        return None
    return str(outs[0].get("md5")) if outs and outs[0].get("md5") else None


def export_data_version(root: str | Path = ".") -> None:
    """Make :func:`data_version` the version every MLflow run of this process (and of the
    workers and ranks it starts) is tagged with (:data:`cxrgaze.DATA_VERSION_ENV`),
    unless the environment already says."""
    version = data_version(root)
    if version and not os.environ.get(DATA_VERSION_ENV):
        os.environ[DATA_VERSION_ENV] = version
