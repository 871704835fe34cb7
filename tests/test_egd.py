"""Data tests for the EGD-CXR table readers: real layout, quoted newlines, labels, id lists."""

import pandas as pd
import pytest

from cxrgaze.data.egd import EGDFormatError, read_bounding_boxes, read_fixations, read_id_subset, read_master_sheet
from cxrgaze.data.schema import MASTER_SHEET_COLUMNS

from data_factory import INDICATION, master_row, write_fixations, write_id_subset, write_master_sheet


@pytest.fixture
def sheet(tmp_path):
    rows = [
        master_row("a-1", "15628804", "58573295", "Normal"),
        master_row("b-2", "10000001", "50000001", "CHF"),
        master_row("c-3", "10000002", "50000002", "pneumonia"),
        master_row("d-4", "10000003", "50000003", None),
        master_row("e-5", "10000004", "50000004", ("CHF", "pneumonia")),
    ]
    return write_master_sheet(tmp_path / "master_sheet.csv", rows)


def test_master_sheet_has_more_lines_than_records_and_parses_every_record(sheet):
    text = sheet.read_text()
    assert text.count("\n") > 6  # the quoted newlines make extra text lines
    table = read_master_sheet(sheet)
    assert len(table) == 5
    assert list(table.columns[:59]) == list(MASTER_SHEET_COLUMNS)
    assert (table["cxr_exam_indication"] == INDICATION).all()


def test_ids_stay_strings_and_path_is_the_mimic_layout(sheet):
    table = read_master_sheet(sheet)
    assert table.loc[0, "patient_id"] == "15628804" and table.loc[0, "study_id"] == "58573295"
    assert table.loc[0, "path"] == "files/p15/p15628804/s58573295/a-1.dcm"


def test_labels_from_one_hot_columns_with_reasons_for_none_and_two(sheet):
    table = read_master_sheet(sheet)
    assert table["label"].tolist()[:3] == ["Normal", "CHF", "pneumonia"]
    assert pd.isna(table.loc[3, "label"]) and pd.isna(table.loc[4, "label"])
    assert table["n_labels"].tolist() == [1, 1, 1, 0, 2]
    assert pd.isna(table.loc[0, "label_error"])
    assert "no label" in table.loc[3, "label_error"]
    assert "2 labels set (CHF, pneumonia)" in table.loc[4, "label_error"]


def test_label_values_written_as_floats_are_understood(tmp_path):
    row = master_row("x", "10000000", "50000000", None)
    row["CHF"] = "1.0"
    table = read_master_sheet(write_master_sheet(tmp_path / "m.csv", [row]))
    assert table.loc[0, "label"] == "CHF"


def test_missing_required_column_names_the_file_and_column(tmp_path):
    table = pd.DataFrame([master_row("a", "10000000", "50000000", "CHF")]).drop(columns=["pneumonia"])
    path = tmp_path / "master_sheet.csv"
    table.to_csv(path, index=False)
    with pytest.raises(EGDFormatError, match=r"master_sheet\.csv: missing required column\(s\) pneumonia"):
        read_master_sheet(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="master_sheet.csv: no such file"):
        read_master_sheet(tmp_path / "master_sheet.csv")


def test_fixations_and_eye_gaze_share_the_reader(tmp_path):
    points = [("a-1", 100, 200, 0.25), ("a-1", 101.5, 201, 0.5), ("b-2", 5, 6, 0.1)]
    for name in ("fixations.csv", "eye_gaze.csv"):
        table = read_fixations(write_fixations(tmp_path / name, points))
        assert list(table.columns) == ["DICOM_ID", "FPOGS", "FPOGD", "X_ORIGINAL", "Y_ORIGINAL"]
        assert table["DICOM_ID"].tolist() == ["a-1", "a-1", "b-2"]
        assert table["X_ORIGINAL"].tolist() == [100, 101.5, 5]
        assert table["FPOGD"].dtype.kind == "f"


def test_fixations_missing_column_is_named(tmp_path):
    path = tmp_path / "fixations.csv"
    path.write_text("DICOM_ID,X_ORIGINAL\na,1\n")
    with pytest.raises(EGDFormatError, match=r"fixations\.csv: missing required column\(s\) FPOGS, FPOGD, Y_ORIGINAL"):
        read_fixations(path)


def test_id_subset_in_the_papers_format(tmp_path):
    path = write_id_subset(tmp_path / "ids.csv", ["a-1", "b-2.dcm", "c-3"])
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf,filename\r\n1,a-1\r\n")
    assert read_id_subset(path) == ["a-1", "b-2", "c-3"]


def test_id_subset_with_lf_and_dicom_id_header(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("dicom_id\nx\n\ny.dcm\n")
    assert read_id_subset(path) == ["x", "y"]


def test_id_subset_without_filename_column_is_refused(tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(EGDFormatError, match="ids.csv: no 'filename' column"):
        read_id_subset(path)


def test_bounding_boxes(tmp_path):
    path = tmp_path / "bounding_boxes.csv"
    path.write_text("dicom_id,bbox_name,x1,x2,y1,y2\na-1,cardiac silhouette,10,20,30,40\n")
    table = read_bounding_boxes(path)
    assert table.loc[0, "bbox_name"] == "cardiac silhouette"
    assert table.loc[0, ["x1", "x2", "y1", "y2"]].tolist() == [10, 20, 30, 40]
