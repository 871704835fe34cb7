"""Helpers for the data tests: real-format EGD-CXR tables and DICOMs written by hand.

Not the synthetic generator (``cxrgaze.data.synth``): these write tiny, explicit cases.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrgaze.data.schema import GAZE_COLUMNS, MASTER_SHEET_COLUMNS, mimic_relative_path

INDICATION = 'History: cough, fever.\nEvaluate for "pneumonia", effusion,\r\nor CHF'
"""A ``cxr_exam_indication`` value with quoted newlines (LF and CRLF), commas and quotes."""


def dicom_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                  signed: bool = False, **tags) -> Dataset:
    """A minimal single-frame DX dataset holding ``pixels`` (H, W) uint16/int16 uncompressed."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray, For Presentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(pixels.shape), photometric, str(tags)])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    return ds


def write_dicom(path: Path, pixels: np.ndarray, compress: str | None = None, **kwargs) -> Path:
    """Write ``pixels`` as a DICOM file, optionally compressed with ``ds.compress(uid)``."""
    ds = dicom_dataset(pixels, **kwargs)
    if compress is not None:
        ds.compress(compress, pixels.astype(np.int16 if kwargs.get("signed") else np.uint16))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def phantom(height: int, width: int, seed: int = 0, bits: int = 12) -> np.ndarray:
    """A smooth 'chest-like' (H, W) uint16 image using the full ``bits`` range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    image = 0.5 + 0.3 * np.sin(6 * xx + seed) * np.cos(4 * yy) + 0.05 * rng.standard_normal((height, width))
    image = (image - image.min()) / (image.max() - image.min())
    return np.round(image * (2**bits - 1)).astype(np.uint16)


def master_row(dicom_id: str, patient_id: str, study_id: str, label: str | tuple[str, ...] | None,
               path: str | None = None) -> dict:
    """One master-sheet row with all 59 columns; ``label`` may be None or several classes."""
    labels = () if label is None else ((label,) if isinstance(label, str) else label)
    row = {column: "" for column in MASTER_SHEET_COLUMNS}
    row.update({
        "dicom_id": dicom_id, "path": path if path is not None else mimic_relative_path(patient_id, study_id, dicom_id),
        "study_id": study_id, "patient_id": patient_id, "stay_id": "", "gender": "F", "anchor_age": "60 - 70",
        "image_top_pad": "0", "image_bottom_pad": "0", "image_left_pad": "176", "image_right_pad": "176",
        "dx1": "Pneumonia, organism unspecified", "dx1_icd": "J18.9", "normal_reports": "0",
        "Normal": "0", "CHF": "0", "pneumonia": "0", "cxr_exam_indication": INDICATION,
    })
    for name in labels:
        row[name] = "1"
    return row


def write_master_sheet(path: Path, rows: list[dict]) -> Path:
    """``master_sheet.csv`` with the 59 published columns (quoted where needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MASTER_SHEET_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_fixations(path: Path, points: list[tuple[str, float, float, float]]) -> Path:
    """``fixations.csv`` with the 37 published columns from (dicom_id, x, y, duration) tuples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(GAZE_COLUMNS))
        writer.writeheader()
        for count, (dicom_id, x, y, duration) in enumerate(points):
            row = {column: "0" for column in GAZE_COLUMNS}
            row.update({"SESSION_ID": "1", "MEDIA_ID": "1", "DICOM_ID": dicom_id, "CNT": str(count),
                        "Time (in secs)": f"{0.1 * count:.3f}", "FPOGS": f"{0.3 * count:.3f}",
                        "FPOGD": f"{duration:.3f}", "FPOGV": "1", "X_ORIGINAL": f"{x:g}", "Y_ORIGINAL": f"{y:g}"})
            writer.writerow(row)
    return path


def write_id_subset(path: Path, ids: list[str]) -> Path:
    """An id list in the paper's format: UTF-8 BOM, CRLF, header ``,filename``, rows ``i,<id>``."""
    lines = [",filename"] + [f"{i},{dicom_id}" for i, dicom_id in enumerate(ids, start=1)]
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    return path
