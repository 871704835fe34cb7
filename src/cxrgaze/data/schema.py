"""Column layouts of the EGD-CXR release (Karargyris et al. 2021), as published.

These are facts about the real files; the reader checks them and the synthetic
generator writes them, so both sides agree by construction.
"""

from __future__ import annotations

LABEL_COLUMNS: tuple[str, ...] = ("Normal", "CHF", "pneumonia")

FINDING_COLUMNS: tuple[str, ...] = (
    "consolidation",
    "enlarged_cardiac_silhouette",
    "linear__patchy_atelectasis",
    "lobar__segmental_collapse",
    "not_otherwise_specified_opacity___pleural__parenchymal_opacity__",
    "pleural_effusion_or_thickening",
    "pulmonary_edema__hazy_opacity",
    "normal_anatomically",
    "elevated_hemidiaphragm",
    "hyperaeration",
    "vascular_redistribution",
)

CHEXPERT_COLUMNS: tuple[str, ...] = tuple(
    f"{name}__chx"
    for name in (
        "atelectasis",
        "cardiomegaly",
        "consolidation",
        "edema",
        "enlarged_cardiomediastinum",
        "fracture",
        "lung_lesion",
        "lung_opacity",
        "no_finding",
        "pleural_effusion",
        "pleural_other",
        "pneumonia",
        "pneumothorax",
        "support_devices",
    )
)

MASTER_SHEET_COLUMNS: tuple[str, ...] = (
    "dicom_id",
    "path",
    "study_id",
    "patient_id",
    "stay_id",
    "gender",
    "anchor_age",
    "image_top_pad",
    "image_bottom_pad",
    "image_left_pad",
    "image_right_pad",
    *[c for i in range(1, 10) for c in (f"dx{i}", f"dx{i}_icd")],
    "normal_reports",
    *LABEL_COLUMNS,
    *FINDING_COLUMNS,
    *CHEXPERT_COLUMNS,
    "cxr_exam_indication",
)
assert len(MASTER_SHEET_COLUMNS) == 59

GAZE_COLUMNS: tuple[str, ...] = (
    "SESSION_ID",
    "MEDIA_ID",
    "DICOM_ID",
    "CNT",
    "Time (in secs)",
    "TIMETICK(f=10000000)",
    "FPOGX",
    "FPOGY",
    "FPOGS",
    "FPOGD",
    "FPOGID",
    "FPOGV",
    "BPOGX",
    "BPOGY",
    "BPOGV",
    "LPCX",
    "LPCY",
    "LPD",
    "LPS",
    "LPV",
    "RPCX",
    "RPCY",
    "RPD",
    "RPS",
    "RPV",
    "BKID",
    "BKDUR",
    "BKPMIN",
    "LPMM",
    "LPMMV",
    "RPMM",
    "RPMMV",
    "SACCADE_MAG",
    "SACCADE_DIR",
    "VID_FRAME",
    "X_ORIGINAL",
    "Y_ORIGINAL",
)
"""Columns shared by ``fixations.csv`` and ``eye_gaze.csv``."""
assert len(GAZE_COLUMNS) == 37

BOUNDING_BOX_COLUMNS: tuple[str, ...] = ("dicom_id", "bbox_name", "x1", "x2", "y1", "y2")
"""``bounding_boxes.csv``: one anatomy (or, in synthetic data, finding) box per row, original pixels."""

MANIFEST_COLUMNS: tuple[str, ...] = ("dicom_id", "patient_id", "study_id", "label")
"""The leading columns of ``prepare``'s ``manifest.csv`` (more follow)."""

EXCLUDED_COLUMNS: tuple[str, ...] = ("dicom_id", "reason")


def mimic_relative_path(patient_id: int | str, study_id: int | str, dicom_id: str) -> str:
    """The MIMIC-CXR path of an image, as in the master sheet's ``path`` column.

    >>> mimic_relative_path(15628804, 58573295, "abc")
    'files/p15/p15628804/s58573295/abc.dcm'
    """
    patient = str(patient_id)
    return f"files/p{patient[:2]}/p{patient}/s{study_id}/{dicom_id}.dcm"
