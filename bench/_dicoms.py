"""Full-size test data for the data benchmarks: MIMIC-like DICOMs and EGD-CXR tables.

Images are about 2500 x 3000, 12 bits stored in 16, with film-grain noise (so that JPEG
2000 has real work to do), some MONOCHROME1 and some with a VOI window, as in MIMIC-CXR.
"""

from __future__ import annotations

import csv
from pathlib import Path

import sys

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian

from cxrgaze import CLASSES
from cxrgaze.data.schema import GAZE_COLUMNS, MASTER_SHEET_COLUMNS, mimic_relative_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import data_factory  # noqa: E402  (one DICOM writer for the tests and the benchmarks)


def radiograph(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth chest-like (H, W) uint16 picture in 12 bits with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= height
    xx /= width
    lungs = np.exp(-(((xx - 0.3) / 0.15) ** 2 + ((yy - 0.45) / 0.3) ** 2)) + np.exp(
        -(((xx - 0.7) / 0.15) ** 2 + ((yy - 0.45) / 0.3) ** 2))
    image = 2600 - 1400 * lungs + 300 * np.sin(40 * yy) * lungs + rng.normal(0, 25, (height, width))
    return np.clip(image, 0, 4095).astype(np.uint16)


def write_dicom(path: Path, pixels: np.ndarray, syntax: str = ExplicitVRLittleEndian, photometric: str = "MONOCHROME2",
                window: tuple[float, float] | None = None) -> None:
    """Save ``pixels`` as a 12-bit DX DICOM in ``syntax``: the tests' writer, at full size."""
    tags = {"WindowCenter": window[0], "WindowWidth": window[1]} if window is not None else {}
    data_factory.write_dicom(path, pixels, compress=None if syntax == ExplicitVRLittleEndian else syntax,
                             photometric=photometric, **tags)


def write_layout(root: Path, syntaxes: list[str], shape: tuple[int, int] = (3000, 2500)) -> tuple[Path, Path]:
    """Write ``len(syntaxes)`` images and their EGD tables under ``root``; returns (egd, dicom) dirs."""
    egd, mimic = root / "egd-cxr", root / "mimic-cxr"
    egd.mkdir(parents=True, exist_ok=True)
    rows, fixations = [], []
    rng = np.random.default_rng(0)
    for i, syntax in enumerate(syntaxes):
        dicom_id, patient, study = f"bench-{i:03d}", str(10_000_000 + i), str(50_000_000 + i)
        height, width = shape if i % 2 == 0 else (2544, 3056)  # portrait and landscape films
        rel = mimic_relative_path(patient, study, dicom_id)
        write_dicom(mimic / rel, radiograph(height, width, i), syntax, "MONOCHROME1" if i % 3 == 1 else "MONOCHROME2",
                    (2000.0, 3000.0) if i % 4 == 2 else None)
        row = {c: "" for c in MASTER_SHEET_COLUMNS}
        row.update({"dicom_id": dicom_id, "path": rel, "study_id": study, "patient_id": patient,
                    "Normal": "0", "CHF": "0", "pneumonia": "0", "cxr_exam_indication": "cough,\nfever"})
        row[CLASSES[i % 3]] = "1"
        rows.append(row)
        for k in range(40):
            fixations.append((dicom_id, rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.1, 0.8), 0.3 * k))
    with (egd / "master_sheet.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MASTER_SHEET_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    with (egd / "fixations.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(GAZE_COLUMNS))
        writer.writeheader()
        for dicom_id, x, y, duration, start in fixations:
            row = {c: "0" for c in GAZE_COLUMNS}
            row.update({"DICOM_ID": dicom_id, "X_ORIGINAL": f"{x:.0f}", "Y_ORIGINAL": f"{y:.0f}",
                        "FPOGD": f"{duration:.3f}", "FPOGS": f"{start:.3f}"})
            writer.writerow(row)
    return egd, mimic
