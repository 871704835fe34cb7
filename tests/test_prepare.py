"""Data tests for ``prepare`` on a tiny hand-built dataset in the real EGD-CXR/MIMIC layout.

Four good images (three codecs, both polarities) and one image for every exclusion reason.
"""

import json

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, MPEG2MPML, RLELossless

from cxrgaze.config import DataConfig
from cxrgaze.data.dicom import ResizeMap, read_dicom
from cxrgaze.data.gaze import static_heatmap_resized
from cxrgaze.data.prepare import PrepareError, prepare
from cxrgaze.data.schema import mimic_relative_path

from data_factory import (dicom_dataset, master_row, phantom, write_dicom, write_fixations, write_id_subset,
                          write_master_sheet)

pytestmark = pytest.mark.timeout(120)

CONFIG = DataConfig(image_size=32, resize="stretch", gaze_sigma=8.0, workers=1)
GOOD = ["good-mono2", "good-mono1-rle", "good-j2k", "good-second-study"]
# id -> a piece of the reason that excluded.csv must give for it
BAD = {
    "no-label": "master_sheet.csv: no label",
    "two-labels": "2 labels set (CHF, pneumonia)",
    "no-fixations": "fixations.csv: no fixations for this image",
    "missing-file": "missing file",
    "outside": "path resolves outside the DICOM folder",
    "truncated": "truncated DICOM",
    "not-dicom": "not a DICOM file",
    "no-pixels": "no pixel data",
    "no-decoder": "no decoder for transfer syntax MPEG2",
    "gaze-off-image": "none of the 2 fixations is inside the 30 x 40 image",
}


def _add(rows, fixations, dicom_id, patient, study, label, shape=(40, 30), path=None, points=None):
    rows.append(master_row(dicom_id, patient, study, label, path=path))
    height, width = shape
    for x, y, d in points if points is not None else [(width // 3, height // 2, 0.4), (width // 2, height // 3, 0.2)]:
        fixations.append((dicom_id, x, y, d))
    return mimic_relative_path(patient, study, dicom_id) if path is None else path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("egd")
    egd, mimic = root / "egd-cxr", root / "mimic-cxr"
    rows, fixations = [], []
    images = {}

    def good(dicom_id, patient, study, label, shape, seed, **kwargs):
        rel = _add(rows, fixations, dicom_id, patient, study, label, shape)
        images[dicom_id] = write_dicom(mimic / rel, phantom(*shape, seed=seed), **kwargs)

    good("good-mono2", "10000001", "50000001", "Normal", (40, 30), 1)
    good("good-mono1-rle", "10000002", "50000002", "CHF", (36, 44), 2, photometric="MONOCHROME1", compress=RLELossless)
    good("good-j2k", "10000003", "50000003", "pneumonia", (32, 32), 3, compress=JPEG2000Lossless)
    good("good-second-study", "10000001", "50000009", "CHF", (40, 30), 4)

    for dicom_id, label in (("no-label", None), ("two-labels", ("CHF", "pneumonia"))):
        rel = _add(rows, fixations, dicom_id, "10000004", "50000004", label)
        write_dicom(mimic / rel, phantom(40, 30))
    rel = mimic_relative_path("10000005", "50000005", "no-fixations")
    rows.append(master_row("no-fixations", "10000005", "50000005", "CHF"))
    write_dicom(mimic / rel, phantom(40, 30))
    _add(rows, fixations, "missing-file", "10000006", "50000006", "Normal")
    write_dicom(root / "elsewhere" / "outside.dcm", phantom(40, 30))  # exists, but outside --dicom-dir
    _add(rows, fixations, "outside", "10000007", "50000007", "Normal", path="files/../../elsewhere/outside.dcm")
    data = write_dicom(root / "t.dcm", phantom(40, 30)).read_bytes()
    rel = _add(rows, fixations, "truncated", "10000008", "50000008", "CHF")
    (mimic / rel).parent.mkdir(parents=True)
    (mimic / rel).write_bytes(data[:-200])
    rel = _add(rows, fixations, "not-dicom", "10000010", "50000010", "CHF")
    (mimic / rel).parent.mkdir(parents=True)
    (mimic / rel).write_text("this is not a DICOM file\n")
    ds = dicom_dataset(phantom(40, 30))
    del ds.PixelData
    rel = _add(rows, fixations, "no-pixels", "10000011", "50000011", "Normal")
    (mimic / rel).parent.mkdir(parents=True)
    ds.save_as(mimic / rel, enforce_file_format=True)
    ds = dicom_dataset(phantom(40, 30))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    rel = _add(rows, fixations, "no-decoder", "10000012", "50000012", "pneumonia")
    (mimic / rel).parent.mkdir(parents=True)
    ds.save_as(mimic / rel, enforce_file_format=True)
    rel = _add(rows, fixations, "gaze-off-image", "10000013", "50000013", "Normal",
               points=[(-50, 10, 0.3), (31, 5, 0.3)])
    write_dicom(mimic / rel, phantom(40, 30))

    fixations.append(("not-in-sheet", 5, 5, 0.2))
    write_master_sheet(egd / "master_sheet.csv", rows)
    write_fixations(egd / "fixations.csv", fixations)
    (egd / "bounding_boxes.csv").write_text(
        "dicom_id,bbox_name,x1,x2,y1,y2\ngood-mono2,cardiac silhouette,0,29,0,39\ngood-j2k,left lung,8,15,4,27\n")
    listed = [r["dicom_id"] for r in rows]
    subset = write_id_subset(root / "ids.csv", listed[:2] + ["ghost-id"] + listed[2:] + [listed[0]])
    return {"root": root, "egd": egd, "mimic": mimic, "images": images, "subset": subset}


@pytest.fixture(scope="module")
def prepared(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    result = prepare(dataset["egd"], dataset["mimic"], out, CONFIG, ids_csv=dataset["subset"], progress=False)
    return out, result


def test_good_images_are_prepared_in_subset_order(prepared):
    out, result = prepared
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    assert list(manifest.columns[:4]) == ["dicom_id", "patient_id", "study_id", "label"]
    assert manifest["dicom_id"].tolist() == GOOD
    assert manifest["label"].tolist() == ["Normal", "CHF", "pneumonia", "CHF"]
    assert manifest.loc[0, "patient_id"] == "10000001" and manifest.loc[3, "study_id"] == "50000009"
    assert manifest["index"].tolist() == ["0", "1", "2", "3"]
    assert manifest["photometric"].tolist()[:2] == ["MONOCHROME2", "MONOCHROME1"]
    assert manifest.loc[2, "transfer_syntax"] == JPEG2000Lossless
    assert result.n_prepared == 4 and result.class_counts == {"Normal": 1, "CHF": 2, "pneumonia": 1}


def test_every_exclusion_reason_is_reported_in_one_line(prepared, dataset):
    out, result = prepared
    excluded = pd.read_csv(out / "excluded.csv", dtype=str, keep_default_na=False)
    assert list(excluded.columns) == ["dicom_id", "reason"]
    reasons = dict(zip(excluded["dicom_id"], excluded["reason"]))
    for dicom_id, piece in BAD.items():
        assert piece in reasons[dicom_id], (dicom_id, reasons[dicom_id])
    assert reasons["ghost-id"] == "ids.csv: listed but not in master_sheet.csv"
    assert (excluded["dicom_id"] == "good-mono2").sum() == 1  # the repeated id
    assert "listed more than once" in excluded.loc[excluded["dicom_id"] == "good-mono2", "reason"].item()
    assert reasons["truncated"].startswith("files/p10/p10000008/s50000008/truncated.dcm: truncated DICOM")
    assert all("\n" not in r and r and str(dataset["root"]) not in r for r in excluded["reason"])
    assert result.n_excluded == len(excluded) == len(BAD) + 2


def test_arrays_match_decoding_and_resizing_each_dicom(prepared, dataset):
    out, _ = prepared
    images, gaze = np.load(out / "images.npy"), np.load(out / "gaze.npy")
    assert images.shape == gaze.shape == (4, 32, 32) and images.dtype == gaze.dtype == np.float16
    assert 0 <= images.min() and images.max() <= 1 and 0 <= gaze.min() and gaze.max() == 1
    for row, dicom_id in enumerate(GOOD):
        image, _ = read_dicom(dataset["images"][dicom_id])
        expected = ResizeMap.create(image.shape, 32, "stretch").resize(image).astype(np.float16)
        np.testing.assert_array_equal(images[row], expected)


def test_fixations_and_boxes_are_in_target_pixels(prepared):
    out, _ = prepared
    fixations = pd.read_csv(out / "fixations.csv", dtype={"dicom_id": str})
    assert list(fixations.columns) == ["dicom_id", "x", "y", "duration", "start"]
    first = fixations[fixations["dicom_id"] == "good-mono2"].iloc[0]
    x, y = ResizeMap.create((40, 30), 32, "stretch").map_points(np.array([10]), np.array([20]))
    assert first["x"] == pytest.approx(x[0], abs=1e-3) and first["y"] == pytest.approx(y[0], abs=1e-3)
    assert first["duration"] == pytest.approx(0.4)
    assert set(fixations["dicom_id"]) == set(GOOD)
    boxes = pd.read_csv(out / "boxes.csv", dtype={"dicom_id": str})
    assert boxes["dicom_id"].tolist() == ["good-mono2", "good-j2k"]  # corner pixels mapped as points
    assert boxes.loc[0, ["x1", "x2", "y1", "y2"]].tolist() == pytest.approx([0.0333, 30.9667, -0.1, 31.1], abs=1e-3)


def test_gaze_is_the_static_heatmap_of_the_image_fixations(prepared):
    out, _ = prepared
    gaze = np.load(out / "gaze.npy")
    resize_map = ResizeMap.create((40, 30), 32, "stretch")
    expected = static_heatmap_resized(np.array([10, 15]), np.array([20, 13]), resize_map, sigma=8.0)
    np.testing.assert_array_equal(gaze[0], expected.astype(np.float16))
    peak_y, peak_x = np.unravel_index(gaze[0].argmax(), gaze[0].shape)
    x, y = resize_map.map_points(np.array([12.5]), np.array([16.5]))  # between the two fixations
    assert np.hypot(peak_x - x[0], peak_y - y[0]) < 2


def test_meta_has_config_counts_and_classes(prepared):
    out, _ = prepared
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"] == {"image_size": 32, "resize": "stretch", "gaze_sigma": 8.0, "gaze_duration_weighted": False}
    assert meta["counts"]["prepared"] == 4 and meta["counts"]["listed"] == len(BAD) + len(GOOD) + 2
    assert meta["counts"]["fixation_ids_not_in_master_sheet"] == 1
    assert meta["classes"] == {"Normal": 1, "CHF": 2, "pneumonia": 1}
    assert meta["excluded_by_kind"]["truncated"] == 1 and meta["excluded_by_kind"]["no_decoder"] == 1


def test_without_subset_rows_follow_the_master_sheet(dataset, tmp_path):
    result = prepare(dataset["egd"], dataset["mimic"], tmp_path, CONFIG, progress=False)
    manifest = pd.read_csv(tmp_path / "manifest.csv", dtype=str)
    assert manifest["dicom_id"].tolist() == GOOD
    excluded = pd.read_csv(tmp_path / "excluded.csv", dtype=str)
    assert set(excluded["dicom_id"]) == set(BAD)
    assert result.n_listed == len(GOOD) + len(BAD)


def test_same_inputs_same_bytes_with_one_or_two_workers(dataset, tmp_path):
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        config = DataConfig(image_size=32, resize="pad", gaze_sigma=8.0, gaze_duration_weighted=True, workers=workers)
        prepare(dataset["egd"], dataset["mimic"], out, config, ids_csv=dataset["subset"], progress=False)
        outputs.append(out)
    names = sorted(p.name for p in outputs[0].iterdir())
    assert names == ["boxes.csv", "excluded.csv", "fixations.csv", "gaze.npy", "images.npy", "manifest.csv",
                     "meta.json"]
    assert names == sorted(p.name for p in outputs[1].iterdir())
    for name in names:
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name


def test_nothing_usable_is_an_error_with_the_reasons_written(dataset, tmp_path):
    ids = write_id_subset(tmp_path / "bad.csv", ["no-label", "truncated", "ghost"])
    with pytest.raises(PrepareError, match=r"no usable images: all 3 listed images were excluded") as caught:
        prepare(dataset["egd"], dataset["mimic"], tmp_path / "out", CONFIG, ids_csv=ids, progress=False)
    assert "\n" not in str(caught.value) and "excluded.csv" in str(caught.value)
    assert len(pd.read_csv(tmp_path / "out" / "excluded.csv")) == 3
    assert not (tmp_path / "out" / "images.npy").exists()


def test_missing_inputs_are_clear_errors(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such DICOM folder"):
        prepare(dataset["egd"], tmp_path / "nope", tmp_path / "out", CONFIG, progress=False)
    with pytest.raises(FileNotFoundError, match=r"fixations\.csv: no such file"):
        (tmp_path / "egd").mkdir()
        (tmp_path / "egd" / "master_sheet.csv").write_bytes((dataset["egd"] / "master_sheet.csv").read_bytes())
        prepare(tmp_path / "egd", dataset["mimic"], tmp_path / "out", CONFIG, progress=False)


def test_monochrome1_came_out_in_monochrome2_polarity(prepared, dataset):
    out, _ = prepared
    images = np.load(out / "images.npy").astype(np.float32)
    ds = pydicom.dcmread(dataset["images"]["good-mono1-rle"])
    stored = ds.pixel_array.astype(np.float32)
    stored = (stored - stored.min()) / (stored.max() - stored.min())
    expected = ResizeMap.create(stored.shape, 32, "stretch").resize(1.0 - stored)
    np.testing.assert_allclose(images[1], expected, atol=1e-3)
