"""Data tests for the patient-level split: determinism, no leakage, stratification."""

import json

import numpy as np
import pandas as pd
import pytest

from cxrgaze import CLASSES
from cxrgaze.config import ConfigError, SplitConfig
from cxrgaze.data.split import read_split, split_patients, write_split


def make_table(n_patients: int = 300, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = CLASSES[p % 3]
        for s in range(int(rng.integers(1, 4))):  # 1-3 images per patient
            rows.append({"dicom_id": f"d{p}-{s}", "patient_id": str(10_000_000 + p), "label": label})
    return pd.DataFrame(rows)


def test_no_patient_in_two_splits_and_every_row_assigned():
    out = split_patients(make_table())
    assert out["split"].notna().all()
    assert (out.groupby("patient_id")["split"].nunique() == 1).all()


def test_same_seed_same_split_independent_of_row_order():
    table = make_table()
    a = split_patients(table, SplitConfig(seed=7)).set_index("dicom_id")["split"]
    shuffled = table.sample(frac=1.0, random_state=3)
    b = split_patients(shuffled, SplitConfig(seed=7)).set_index("dicom_id")["split"]
    assert a.sort_index().equals(b.sort_index())
    c = split_patients(table, SplitConfig(seed=8)).set_index("dicom_id")["split"]
    assert not a.sort_index().equals(c.sort_index())


def test_fractions_and_stratification_by_patient():
    out = split_patients(make_table(600), SplitConfig(seed=42, train=0.8, val=0.1, test=0.1))
    patients = out.drop_duplicates("patient_id")
    share = patients["split"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.8, abs=0.02)
    assert share["val"] == pytest.approx(0.1, abs=0.02)
    assert share["test"] == pytest.approx(0.1, abs=0.02)
    # every split holds about a third of each class (patients are 1/3 each)
    mix = patients.groupby("split")["label"].value_counts(normalize=True)
    for split in ("train", "val", "test"):
        for cls in CLASSES:
            assert mix[(split, cls)] == pytest.approx(1 / 3, abs=0.03)


def test_tiny_class_goes_to_train_where_patients_do_not_allow():
    table = pd.DataFrame({"dicom_id": ["a"], "patient_id": ["1"], "label": ["CHF"]})
    assert split_patients(table)["split"].tolist() == ["train"]


def test_bad_fractions_are_refused():
    with pytest.raises(ConfigError, match="sum to 1"):
        SplitConfig(train=0.8, val=0.3, test=0.1)


def test_write_split_roundtrip(tmp_path):
    table = make_table(60)
    table["study_id"] = "50000000"
    table[["dicom_id", "patient_id", "study_id", "label"]].to_csv(tmp_path / "manifest.csv", index=False)
    counts = write_split(tmp_path / "manifest.csv", tmp_path / "split.csv")
    back = read_split(tmp_path / "split.csv")
    assert list(back.columns) == ["dicom_id", "patient_id", "label", "index", "split"]
    assert back["index"].tolist() == list(range(len(table)))
    assert counts["total"].sum() == len(table)
    metrics = json.loads((tmp_path / "split.json").read_text())
    assert sum(m["total"] for m in metrics.values()) == len(table)
    # the written bytes are deterministic
    first = (tmp_path / "split.csv").read_bytes()
    write_split(tmp_path / "manifest.csv", tmp_path / "split.csv")
    assert (tmp_path / "split.csv").read_bytes() == first


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.csv: no such manifest"):
        write_split(tmp_path / "manifest.csv", tmp_path / "split.csv")
