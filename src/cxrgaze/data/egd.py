"""Readers for the EGD-CXR tables: master sheet, fixations / raw gaze, boxes, id subsets.

Every reader parses with a real CSV parser (the master sheet's last column holds quoted
newlines and commas), keeps ids as strings, accepts a UTF-8 byte-order mark, and fails
with one line naming the file and the problem when a required column is missing.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from cxrgaze.data.schema import BOUNDING_BOX_COLUMNS, LABEL_COLUMNS

MASTER_REQUIRED: tuple[str, ...] = ("dicom_id", "path", "study_id", "patient_id", *LABEL_COLUMNS)
"""Master sheet columns that ``prepare`` needs (the other 52 are kept when present)."""
MASTER_ID_COLUMNS: tuple[str, ...] = ("dicom_id", "path", "study_id", "patient_id", "stay_id")
FIXATION_REQUIRED: tuple[str, ...] = ("DICOM_ID", "FPOGS", "FPOGD", "X_ORIGINAL", "Y_ORIGINAL")
"""The columns of ``fixations.csv``/``eye_gaze.csv`` that ``read_fixations`` returns by default."""


class EGDFormatError(ValueError):
    """An EGD-CXR table that does not have the published layout (one line, names the file)."""


def read_master_sheet(path: str | Path) -> pd.DataFrame:
    """Read ``master_sheet.csv``: one row per image, ids as stripped strings, in file order.

    Adds ``label`` (the class name when exactly one of ``Normal``/``CHF``/``pneumonia`` is 1,
    else missing: None/NaN, test with ``pd.isna``), ``n_labels`` (how many are 1) and
    ``label_error`` (missing, or a one-line reason such as ``no label (Normal, CHF,
    pneumonia all 0 or empty)``). The label columns
    become numbers (empty -> NaN); every other column stays text ('' when empty).
    """
    path = Path(path)
    table = _read_csv(path, required=MASTER_REQUIRED)
    for column in MASTER_ID_COLUMNS:
        if column in table:
            table[column] = table[column].str.strip()
    onehot = pd.DataFrame({c: pd.to_numeric(table[c].str.strip(), errors="coerce") for c in LABEL_COLUMNS})
    for column in LABEL_COLUMNS:
        table[column] = onehot[column]
    is_set = onehot.to_numpy() == 1  # (N, 3)
    table["n_labels"] = is_set.sum(axis=1)
    table["label"] = [LABEL_COLUMNS[int(np.argmax(row))] if row.sum() == 1 else None for row in is_set]
    table["label_error"] = [_label_error(row) for row in is_set]
    return table


def _label_error(is_set: np.ndarray) -> str | None:
    """Why a one-hot row gives no single label (None when it does)."""
    names = [c for c, s in zip(LABEL_COLUMNS, is_set) if s]
    if len(names) == 1:
        return None
    if not names:
        return f"no label ({', '.join(LABEL_COLUMNS)} all 0 or empty)"
    return f"{len(names)} labels set ({', '.join(names)}); exactly one expected"


def read_fixations(path: str | Path, columns: Iterable[str] = FIXATION_REQUIRED) -> pd.DataFrame:
    """Read ``fixations.csv`` or ``eye_gaze.csv`` (same 37 columns), only ``columns``.

    ``DICOM_ID`` is a stripped string; every other requested column is numeric (unparseable
    -> NaN). Rows keep file order (time order within an image). Reading only the needed
    columns keeps the 1.5M-row ``eye_gaze.csv`` fast.
    """
    path = Path(path)
    columns = tuple(dict.fromkeys(("DICOM_ID", *columns)))
    table = _read_csv(path, required=columns, usecols=columns)
    table["DICOM_ID"] = table["DICOM_ID"].str.strip()
    for column in columns:
        if column != "DICOM_ID":
            table[column] = pd.to_numeric(table[column].str.strip(), errors="coerce")
    return table[list(columns)]


def read_bounding_boxes(path: str | Path) -> pd.DataFrame:
    """Read ``bounding_boxes.csv``: ``dicom_id, bbox_name, x1, x2, y1, y2`` (original pixels)."""
    path = Path(path)
    table = _read_csv(path, required=BOUNDING_BOX_COLUMNS, usecols=BOUNDING_BOX_COLUMNS)
    table["dicom_id"] = table["dicom_id"].str.strip()
    for column in ("x1", "x2", "y1", "y2"):
        table[column] = pd.to_numeric(table[column].str.strip(), errors="coerce")
    return table[list(BOUNDING_BOX_COLUMNS)]


def read_id_subset(path: str | Path) -> list[str]:
    """Read an id list in the paper's format: UTF-8 (BOM allowed), CRLF or LF, header
    ``,filename``, rows ``1,<dicom_id>``. Also accepts a ``dicom_id`` column or a single
    column. A trailing ``.dcm`` is stripped; blank rows are skipped; order and duplicates
    are kept (``prepare`` reports duplicates).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such id list")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = [row for row in csv.reader(fh) if any(cell.strip() for cell in row)]
    if not rows:
        raise EGDFormatError(f"{path}: empty id list (expected header ',filename')")
    header = [cell.strip() for cell in rows[0]]
    if "filename" in header:
        column = header.index("filename")
    elif "dicom_id" in header:
        column = header.index("dicom_id")
    elif len(header) == 1:
        column = 0
    else:
        raise EGDFormatError(f"{path}: no 'filename' column in header {','.join(header)!r} (expected ',filename')")
    ids = []
    for number, row in enumerate(rows[1:], start=2):
        if column >= len(row) or not row[column].strip():
            raise EGDFormatError(f"{path}: row {number} has no id in column {header[column] or column}")
        value = row[column].strip()
        ids.append(value[:-4] if value.lower().endswith(".dcm") else value)
    return ids


def _read_csv(path: Path, required: Iterable[str], usecols: Iterable[str] | None = None) -> pd.DataFrame:
    """All-text ``read_csv`` (BOM-tolerant, quoted newlines) that checks ``required`` columns."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        header = pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns
    except pd.errors.EmptyDataError:
        raise EGDFormatError(f"{path}: empty file (no header)") from None
    stripped = {str(c).strip(): c for c in header}
    missing = [c for c in required if c not in stripped]
    if missing:
        raise EGDFormatError(f"{path}: missing required column(s) {', '.join(missing)}")
    wanted = None if usecols is None else [stripped[c] for c in usecols]
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig",
                            usecols=wanted)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise EGDFormatError(f"{path}: not a readable CSV ({' '.join(str(exc).split())})") from None
    return table.rename(columns=lambda c: str(c).strip())
