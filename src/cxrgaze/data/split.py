"""Patient-level train/val/test split, seeded and stratified by label.

No patient appears in two splits. Each patient is stratified by the most frequent label
among its images (ties go to the class listed first in ``CLASSES``); within each class the
patients are shuffled with the seed and cut at the configured fractions, so every split
holds about the same class mix "where the patients allow" (a class with one patient puts
it in train).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from cxrgaze import CLASSES
from cxrgaze.config import SplitConfig
from cxrgaze.data.prepared import read_manifest_csv

SPLITS: tuple[str, ...] = ("train", "val", "test")


def patient_labels(table: pd.DataFrame) -> pd.Series:
    """The stratification label of each patient: its most frequent image label."""
    order = {c: i for i, c in enumerate(CLASSES)}
    counts = table.groupby(["patient_id", "label"]).size().reset_index(name="n")
    counts["rank"] = counts["label"].map(order)
    counts = counts.sort_values(["patient_id", "n", "rank"], ascending=[True, False, True])
    return counts.drop_duplicates("patient_id").set_index("patient_id")["label"]


def split_patients(table: pd.DataFrame, config: SplitConfig = SplitConfig()) -> pd.DataFrame:
    """Assign every row of ``table`` (columns ``patient_id``, ``label``) to a split.

    Returns a copy with a ``split`` column (``train``/``val``/``test``). The result depends
    only on the set of (patient, label) pairs and the config, not on the row order.
    """
    missing = {"patient_id", "label"} - set(table.columns)
    if missing:
        raise ValueError(f"split needs columns {sorted(missing)}")
    rng = np.random.default_rng(config.seed)
    labels = patient_labels(table)
    assignment: dict[object, str] = {}
    for cls in sorted(labels.unique(), key=lambda c: (CLASSES.index(c) if c in CLASSES else len(CLASSES), str(c))):
        patients = np.array(sorted(labels.index[labels == cls], key=str), dtype=object)
        patients = patients[rng.permutation(len(patients))]
        n = len(patients)
        for i, patient in enumerate(patients):
            q = (i + 0.5) / n  # position of this patient within its class, in (0, 1)
            if q < config.test:
                assignment[patient] = "test"
            elif q < config.test + config.val:
                assignment[patient] = "val"
            else:
                assignment[patient] = "train"
    out = table.copy()
    out["split"] = out["patient_id"].map(assignment)
    return out


def write_split(manifest_csv: str | Path, out_csv: str | Path, config: SplitConfig = SplitConfig(),
                counts_json: str | Path | None = None) -> pd.DataFrame:
    """Split a prepared ``manifest.csv`` and write ``out_csv``.

    The written table has ``dicom_id, patient_id, label, split`` and ``index`` (the row of
    the prepared arrays). Returns the image counts per split and class; the same counts
    go to ``counts_json`` (default ``<out_csv stem>.json``) for ``dvc metrics show``.
    """
    out_csv = Path(out_csv)
    manifest = read_manifest_csv(manifest_csv)
    table = manifest[["dicom_id", "patient_id", "label"]].copy()
    table["index"] = np.arange(len(table))
    table = split_patients(table, config)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_csv, index=False, lineterminator="\n")
    counts = (
        table.groupby(["split", "label"]).size().unstack(fill_value=0)
        .reindex(index=list(SPLITS), columns=[c for c in CLASSES if c in set(table["label"])], fill_value=0)
    )
    counts["total"] = counts.sum(axis=1)
    counts["patients"] = table.groupby("split")["patient_id"].nunique().reindex(list(SPLITS), fill_value=0)
    metrics = {split: {k: int(v) for k, v in row.items()} for split, row in counts.iterrows()}
    counts_json = Path(counts_json) if counts_json else out_csv.with_suffix(".json")
    counts_json.parent.mkdir(parents=True, exist_ok=True)
    counts_json.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return counts


def read_split(split_csv: str | Path) -> pd.DataFrame:
    """Read a split table written by :func:`write_split` (ids kept as strings).

    The one reader of split tables: ``select_rows`` (and through it ``load_split`` and
    ``PreparedDataset``) reads a split-table path with it.
    """
    split_csv = Path(split_csv)
    if not split_csv.is_file():
        raise FileNotFoundError(f"{split_csv}: no such split table (run `cxrgaze split` first)")
    return pd.read_csv(split_csv, dtype={"dicom_id": str, "patient_id": str})
