"""Data tests for the synthetic dataset: layout, determinism, gaze, shortcut and faults.

Everything is read back from the files with pandas and pydicom (not with cxrgaze's own
reader), the way ``prepare`` and a user would see it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from cxrgaze import CLASSES
from cxrgaze.config import SplitConfig
from cxrgaze.data.schema import (
    BOUNDING_BOX_COLUMNS,
    GAZE_COLUMNS,
    MASTER_SHEET_COLUMNS,
    mimic_relative_path,
)
from cxrgaze.data.split import split_patients
from cxrgaze.data.synth import CORNERS, FAULT_KINDS, synthesize

ANATOMY = ("right lung", "left lung", "right costophrenic angle", "left costophrenic angle", "cardiac silhouette")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    return synthesize(root, patients=24, seed=0, image_size=128)


def read_tables(root: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    egd = root / "egd-cxr"
    master = pd.read_csv(egd / "master_sheet.csv", dtype=str, keep_default_na=False)
    fixations = pd.read_csv(egd / "fixations.csv", dtype={"DICOM_ID": str})
    boxes = pd.read_csv(egd / "bounding_boxes.csv", dtype={"dicom_id": str})
    return master, fixations, boxes


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def labels_of(master: pd.DataFrame) -> pd.Series:
    onehot = master[list(CLASSES)].astype(int)
    return onehot.idxmax(axis=1).where(onehot.sum(axis=1) == 1)


def in_box(x, y, box) -> np.ndarray:
    return (x >= box.x1) & (x <= box.x2) & (y >= box.y1) & (y <= box.y2)


# --- determinism -----------------------------------------------------------------------

def test_same_seed_gives_byte_identical_tree_and_another_seed_differs(small, tmp_path):
    again = synthesize(tmp_path / "again", patients=24, seed=0, image_size=128, workers=2)
    other = synthesize(tmp_path / "other", patients=24, seed=1, image_size=128)
    first = tree_hashes(small.root)
    assert tree_hashes(again.root) == first  # also: worker processes change nothing
    assert len(first) > 20
    assert not set(tree_hashes(other.root).values()) & set(first.values())


# --- layout ----------------------------------------------------------------------------

def test_csv_headers_are_the_real_column_lists(small):
    egd = small.root / "egd-cxr"
    assert sorted(p.name for p in egd.iterdir()) == ["bounding_boxes.csv", "fixations.csv", "master_sheet.csv"]
    assert sorted(p.name for p in small.root.iterdir()) == ["egd-cxr", "mimic-cxr"]
    master, fixations, boxes = read_tables(small.root)
    assert tuple(master.columns) == MASTER_SHEET_COLUMNS
    assert tuple(fixations.columns) == GAZE_COLUMNS
    assert tuple(boxes.columns) == BOUNDING_BOX_COLUMNS


def test_master_sheet_values(small):
    master, _, _ = read_tables(small.root)
    assert len(master) == len(small.images)
    text = (small.root / "egd-cxr" / "master_sheet.csv").read_text()
    assert text.count("\n") > len(master) + 1  # quoted newlines: more lines than records
    assert master["cxr_exam_indication"].str.contains("\n").any()
    assert master["cxr_exam_indication"].str.contains(",").any()
    assert master["dicom_id"].str.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}").all()
    assert master["dicom_id"].is_unique and master["study_id"].is_unique
    assert master["patient_id"].str.fullmatch(r"1\d{7}").all()
    assert master["study_id"].str.fullmatch(r"\d{8}").all()
    assert master["anchor_age"].str.fullmatch(r"\d0 - \d0").all()
    assert set(master["gender"]) <= {"F", "M"}
    labels = labels_of(master)
    assert labels.isna().sum() == 1  # the no_label fault, see test_faults
    assert (master[list(CLASSES)].astype(int).sum(axis=1) <= 1).all()
    chf, pneu, normal = (labels == "CHF"), (labels == "pneumonia"), (labels == "Normal")
    assert (master.loc[chf, "dx1_icd"].str.startswith(("I50", "I11"))).all()
    assert (master.loc[pneu, "dx1_icd"].str.startswith(("J18", "J15"))).all()
    assert (master.loc[chf, "enlarged_cardiac_silhouette"] == "1").all()
    assert (master.loc[chf, "cardiomegaly__chx"] == "1").all()
    assert (master.loc[pneu, "lung_opacity__chx"] == "1").all()
    assert (master.loc[normal, "no_finding__chx"] == "1").all()
    assert (master.loc[normal, "normal_anatomically"] == "1").all()
    assert set(master["pneumonia__chx"]) <= {"", "-1", "0", "1"}
    pads = master[["image_top_pad", "image_bottom_pad", "image_left_pad", "image_right_pad"]].astype(int)
    assert ((pads >= 0).all(axis=1)).all()
    assert set(labels.dropna()) == set(CLASSES)


def test_paths_follow_mimic_layout_and_files_exist(small):
    master, _, _ = read_tables(small.root)
    missing = small.faults["missing_file"]
    for row in master.itertuples():
        assert row.path == mimic_relative_path(row.patient_id, row.study_id, row.dicom_id)
        assert (small.root / "mimic-cxr" / row.path).exists() == (row.dicom_id != missing)
    assert len(list((small.root / "mimic-cxr").rglob("*.dcm"))) == len(master) - 1


def test_dicoms_are_12_bit_with_both_photometrics_and_compressed_syntaxes(small):
    master, _, _ = read_tables(small.root)
    bad = set(small.faults.values())
    seen = {"photometric": set(), "syntax": set(), "rescale": 0, "window": 0}
    for row in master[~master["dicom_id"].isin(bad)].itertuples():
        ds = pydicom.dcmread(small.root / "mimic-cxr" / row.path)
        pixels = ds.pixel_array
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert pixels.dtype == np.uint16 and pixels.shape == (ds.Rows, ds.Columns)
        assert 0 <= pixels.min() and pixels.max() <= 4095 and pixels.std() > 100
        assert ds.PatientID == row.patient_id and ds.ViewPosition == "PA"
        assert ds.SOPInstanceUID.startswith("2.25.") and ds.SOPInstanceUID.is_valid
        seen["photometric"].add(ds.PhotometricInterpretation)
        seen["syntax"].add(ds.file_meta.TransferSyntaxUID)
        seen["rescale"] += "RescaleSlope" in ds
        seen["window"] += "WindowCenter" in ds
    assert seen["photometric"] == {"MONOCHROME1", "MONOCHROME2"}
    assert {pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless} <= seen["syntax"]
    assert pydicom.uid.ExplicitVRLittleEndian in seen["syntax"]
    assert seen["rescale"] > 0 and seen["window"] > 0


def test_image_sizes_vary_around_image_size(small):
    sizes = small.images[["height", "width"]]
    assert sizes["height"].between(120, 136).all() and sizes["width"].between(104, 128).all()
    assert sizes["height"].nunique() > 3 and sizes["width"].nunique() > 3


def test_some_patients_have_several_studies_with_one_label(small):
    good = small.images[small.images["fault"] == ""]
    studies = good.groupby("patient_id")["study_id"].nunique()
    assert (studies > 1).any()
    assert (good.groupby("patient_id")["label"].nunique() == 1).all()


# --- gaze and boxes --------------------------------------------------------------------

def test_every_image_has_anatomy_boxes_and_findings_match_the_label(small):
    master, _, boxes = read_tables(small.root)
    truth = small.images.set_index("dicom_id")
    for dicom_id, group in boxes.groupby("dicom_id"):
        names = set(group["bbox_name"])
        assert set(ANATOMY) <= names
        findings = {n for n in names if n.startswith("finding:")}
        label = truth.at[dicom_id, "label"]
        expected = {"CHF": {"finding: cardiomegaly", "finding: right basal haze", "finding: left basal haze"},
                    "pneumonia": {"finding: opacity"}, "Normal": set()}[label]
        assert findings == expected
        assert ("marker" in names) == (truth.at[dicom_id, "marker"] != "")
        assert (group["x1"] < group["x2"]).all() and (group["y1"] < group["y2"]).all()
        assert (group["x1"] >= 0).all() and (group["x2"] <= truth.at[dicom_id, "width"]).all()
    assert set(boxes["dicom_id"]) == set(master["dicom_id"])


def test_fixations_are_consistent_with_the_screen_and_the_pads(small):
    master, fixations, _ = read_tables(small.root)
    truth = small.images.set_index("dicom_id")
    shown = fixations[fixations["DICOM_ID"].isin(master["dicom_id"])]
    pads = master.set_index("dicom_id")[["image_top_pad", "image_bottom_pad", "image_left_pad", "image_right_pad"]]
    for dicom_id, group in shown.groupby("DICOM_ID"):
        top, bottom, left, right = pads.loc[dicom_id].astype(int)
        h, w = truth.at[dicom_id, "height"], truth.at[dicom_id, "width"]
        on = group["X_ORIGINAL"] >= 0
        # the release's own mapping from screen to original pixels
        x = (w / (1920 - left - right) * (group["FPOGX"] * 1920 - left)).astype(int)
        y = (h / (1080 - top - bottom) * (group["FPOGY"] * 1080 - top)).astype(int)
        assert (x[on] == group["X_ORIGINAL"][on]).all() and (y[on] == group["Y_ORIGINAL"][on]).all()
        assert ((group["Y_ORIGINAL"] >= 0) == on).all()
        assert (group["X_ORIGINAL"][on] < w).all() and (group["Y_ORIGINAL"][on] < h).all()
        assert group["FPOGS"].is_monotonic_increasing and group["Time (in secs)"].is_monotonic_increasing
        assert len(group) >= 20
    assert shown["FPOGD"].between(0.1, 0.8).all()
    assert shown["FPOGX"].between(0, 1).all() and shown["FPOGY"].between(0, 1).all()
    assert (shown["FPOGV"] == 1).all()
    assert 0 < (shown["X_ORIGINAL"] < 0).mean() < 0.05  # a few glances off the image
    for _, session in fixations.groupby("SESSION_ID"):
        assert session["FPOGS"].is_monotonic_increasing and session["FPOGID"].is_monotonic_increasing


def test_fixations_dwell_on_findings_and_never_touch_the_marker(small):
    master, fixations, boxes = read_tables(small.root)
    truth = small.images.set_index("dicom_id")
    on_image = fixations[fixations["X_ORIGINAL"] >= 0]
    shares = {"CHF": [], "pneumonia": []}
    lungs_normal = []
    for dicom_id, group in on_image[on_image["DICOM_ID"].isin(master["dicom_id"])].groupby("DICOM_ID"):
        x, y = group["X_ORIGINAL"].to_numpy(), group["Y_ORIGINAL"].to_numpy()
        mine = boxes[boxes["dicom_id"] == dicom_id]
        for box in mine[mine["bbox_name"] == "marker"].itertuples():
            assert not in_box(x, y, box).any()
        label = truth.at[dicom_id, "label"]
        if label in shares:
            hit = np.zeros(len(x), bool)
            for box in mine[mine["bbox_name"].str.startswith("finding:")].itertuples():
                hit |= in_box(x, y, box)
            shares[label].append(hit.mean())
        else:
            sides = [in_box(x, y, b).mean() for b in mine[mine["bbox_name"].str.endswith(" lung")].itertuples()]
            lungs_normal.append(min(sides))
    assert min(shares["CHF"]) > 0.6 and min(shares["pneumonia"]) > 0.55
    assert min(lungs_normal) > 0.2  # Normal readings scan both lungs


# --- the shortcut ----------------------------------------------------------------------

def marker_corners(root: Path) -> pd.DataFrame:
    """The corner of each image's ``marker`` box, from the files alone."""
    master, _, boxes = read_tables(root)
    markers = boxes[boxes["bbox_name"] == "marker"].set_index("dicom_id")
    rows = []
    for row in master.itertuples():
        path = root / "mimic-cxr" / row.path
        if row.dicom_id not in markers.index or not path.exists():
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        box = markers.loc[row.dicom_id]
        top = (box.y1 + box.y2) / 2 < ds.Rows / 2
        left = (box.x1 + box.x2) / 2 < ds.Columns / 2
        rows.append((row.dicom_id, f"{'top' if top else 'bottom'}-{'left' if left else 'right'}"))
    return pd.DataFrame(rows, columns=["dicom_id", "corner"])


def kept_images(result) -> pd.DataFrame:
    """What ``prepare`` keeps: the master sheet without the faulty entries, with its label."""
    master, _, _ = read_tables(result.root)
    master = master[~master["dicom_id"].isin(set(result.faults.values()))].copy()
    master["label"] = labels_of(master)
    return master[["dicom_id", "patient_id", "label"]]


@pytest.mark.parametrize("strength", [0.9, 0.6])
def test_marker_agrees_with_label_in_train_val_and_is_chance_on_test(tmp_path, strength):
    result = synthesize(tmp_path / "data", patients=150, seed=5, image_size=64, shortcut_strength=strength)
    table = split_patients(kept_images(result), SplitConfig()).merge(marker_corners(result.root), on="dicom_id")
    table["agrees"] = table["corner"] == table["label"].map(dict(zip(CLASSES, CORNERS)))
    rate = table.groupby("split")["agrees"].mean()
    assert abs(rate["train"] - strength) < 0.03
    assert abs(rate["val"] - strength) < 0.12
    assert abs(rate["test"] - 1 / 3) < 0.1
    assert set(table["corner"]) == set(CORNERS)
    assert table.groupby("split")["dicom_id"].count()["test"] >= 15
    assert result.marker_agreement() == pytest.approx(rate.to_dict())


def test_marker_is_burned_into_the_pixels(small):
    master, _, boxes = read_tables(small.root)
    good = master[~master["dicom_id"].isin(set(small.faults.values()))]
    for row in good.head(8).itertuples():
        ds = pydicom.dcmread(small.root / "mimic-cxr" / row.path)
        pixels = ds.pixel_array.astype(int)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            pixels = 4095 - pixels
        box = boxes[(boxes["dicom_id"] == row.dicom_id) & (boxes["bbox_name"] == "marker")].iloc[0]
        patch = pixels[box.y1:box.y2, box.x1:box.x2]
        assert patch.min() == patch.max() == pixels.max()  # the brightest thing in the image


def test_strength_zero_draws_no_marker(tmp_path):
    result = synthesize(tmp_path / "data", patients=12, seed=2, image_size=64, shortcut_strength=0.0)
    _, _, boxes = read_tables(result.root)
    assert "marker" not in set(boxes["bbox_name"])
    assert (result.images["marker"] == "").all()
    assert "no shortcut marker" in result.summary()


def test_faults_leave_the_split_unchanged(small):
    kept = kept_images(small)
    assert kept["label"].notna().all()
    with_faults = small.images.set_index("dicom_id")["split"]
    alone = split_patients(kept, SplitConfig()).set_index("dicom_id")["split"]
    assert (alone == with_faults.loc[alone.index]).all()


# --- faults ----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")
def test_deliberate_faults(small):
    master, fixations, _ = read_tables(small.root)
    assert set(small.faults) == set(FAULT_KINDS)
    path = master.set_index("dicom_id")["path"]
    files = {kind: small.root / "mimic-cxr" / path[dicom_id] for kind, dicom_id in small.faults.items()}

    assert not files["missing_file"].exists()
    truncated = files["truncated_dicom"]
    with pytest.raises(Exception):
        pydicom.dcmread(truncated).pixel_array
    no_pixels = pydicom.dcmread(files["no_pixel_data"])
    assert "PixelData" not in no_pixels and no_pixels.Rows > 0
    assert pydicom.dcmread(files["no_fixations"]).pixel_array.size > 0
    assert small.faults["no_fixations"] not in set(fixations["DICOM_ID"])
    assert (master.set_index("dicom_id").loc[small.faults["no_label"], list(CLASSES)].astype(int) == 0).all()
    for kind in ("truncated_dicom", "missing_file", "no_label", "no_pixel_data"):
        assert small.faults[kind] in set(fixations["DICOM_ID"])

    # each faulty entry's patient also has good images with the same label
    truth = small.images
    good = truth[truth["fault"] == ""]
    for dicom_id in small.faults.values():
        row = truth[truth["dicom_id"] == dicom_id].iloc[0]
        mates = good[good["patient_id"] == row["patient_id"]]
        assert len(mates) > 0 and (mates["label"] == row["label"]).all()
    assert truth.loc[truth["fault"] != "", "patient_id"].is_unique

    orphans = set(fixations["DICOM_ID"]) - set(master["dicom_id"])
    assert orphans == set(small.orphan_gaze_ids) and len(orphans) >= 1
    assert (fixations[fixations["DICOM_ID"].isin(orphans)].groupby("DICOM_ID").size() >= 3).all()


def test_without_faults_every_entry_is_usable(tmp_path):
    result = synthesize(tmp_path / "data", patients=9, seed=4, image_size=64, faults=False)
    master, fixations, _ = read_tables(result.root)
    assert result.faults == {} and result.orphan_gaze_ids == ()
    assert labels_of(master).notna().all()
    assert set(fixations["DICOM_ID"]) == set(master["dicom_id"])
    for row in master.itertuples():
        assert pydicom.dcmread(result.root / "mimic-cxr" / row.path).pixel_array.size > 0


# --- arguments -------------------------------------------------------------------------

def test_refuses_to_write_over_existing_data_unless_asked(tmp_path):
    out = tmp_path / "data"
    synthesize(out, patients=6, seed=0, image_size=64)
    stray = out / "mimic-cxr" / "files" / "stray.dcm"
    stray.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="remove it first"):
        synthesize(out, patients=6, seed=0, image_size=64)
    synthesize(out, patients=6, seed=0, image_size=64, overwrite=True)
    assert not stray.exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(patients=2), "patients"),
    (dict(image_size=16), "image_size"),
    (dict(shortcut_strength=1.5), "shortcut_strength"),
])
def test_bad_arguments_are_refused_with_a_reason(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path / "data", **kwargs)
    assert not (tmp_path / "data").exists()


def test_summary_names_the_faults_and_the_shortcut(small):
    text = small.summary()
    assert re.search(r"24 patients, \d+ images", text)
    assert "split seed 42" in text
    for dicom_id in small.faults.values():
        assert dicom_id in text
