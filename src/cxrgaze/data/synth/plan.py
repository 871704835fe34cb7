"""The table-level draws of the synthetic dataset (see :mod:`cxrgaze.data.synth`).

All from the one table stream, in this order: patients, studies and images
(:func:`plan_images`), marker corners (:func:`assign_markers`), storage choices
(:func:`acquisitions`), then, after the images are drawn, the master-sheet text
(:func:`master_rows`). The constants name the faults, the marker corners and the
master sheet's class order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrgaze import CLASSES
from cxrgaze.data.schema import mimic_relative_path
from cxrgaze.data.synth import records
from cxrgaze.data.synth.dicom import RESCALES, Acquisition
from cxrgaze.data.synth.gaze import screen_pads

FAULT_KINDS: tuple[str, ...] = ("truncated_dicom", "missing_file", "no_fixations", "no_label", "no_pixel_data")
CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left")
"""Marker corner of each class, in ``CLASSES`` order."""
CORNER_CENTRES: tuple[tuple[float, float], ...] = ((0.075, 0.06), (0.925, 0.06), (0.075, 0.94))
"""(u, v) centre of each corner's marker, as fractions of the image width and height."""
MASTER_ORDER: tuple[str, ...] = ("CHF", "pneumonia", "Normal")


def _unique_ints(rng: np.random.Generator, n: int, low: int, span: int) -> np.ndarray:
    return low + rng.choice(span, size=n, replace=False)


def plan_images(rng: np.random.Generator, patients: int, faults: bool, image_size: int) -> pd.DataFrame:
    """Patients, studies and images, in master-sheet order (CHF, pneumonia, Normal blocks)."""
    ids = _unique_ints(rng, patients, 10_000_000, 10_000_000).astype(str)
    labels = np.array(CLASSES)[rng.permutation(np.arange(patients) % len(CLASSES))]
    sex = rng.choice(["F", "M"], patients)
    age = rng.choice(records.AGE_BANDS, patients)
    u = rng.random(patients)
    counts = 1 + (u < 0.2) + (u < 0.05)
    rows = [dict(patient_id=p, label=lab, sex=s, age=a, fault="")
            for p, lab, s, a, c in zip(ids, labels, sex, age, counts) for _ in range(c)]
    if faults:
        owners = rng.choice(patients, size=len(FAULT_KINDS), replace=False)
        rows += [dict(patient_id=ids[o], label=labels[o], sex=sex[o], age=age[o], fault=kind)
                 for o, kind in zip(owners, FAULT_KINDS)]
    table = pd.DataFrame(rows)
    n = len(table)
    table["study_id"] = _unique_ints(rng, n, 50_000_000, 10_000_000).astype(str)
    table["stay_id"] = _unique_ints(rng, n, 30_000_000, 10_000_000).astype(str)
    words = rng.integers(0, 2**32, size=(n, 5), dtype=np.uint64)
    table["dicom_id"] = ["-".join(f"{int(x):08x}" for x in row) for row in words]
    table["study_date"] = [f"21{y:02d}{m:02d}{d:02d}" for y, m, d in
                           zip(rng.integers(10, 90, n), rng.integers(1, 13, n), rng.integers(1, 29, n))]
    k = image_size / 256
    table["height"] = np.rint(rng.integers(240, 273, n) * k).astype(int)
    table["width"] = np.rint(rng.integers(208, 257, n) * k).astype(int)
    order = np.lexsort((rng.random(n), table["label"].map(MASTER_ORDER.index).to_numpy()))
    return table.iloc[order].reset_index(drop=True)


def assign_markers(table: pd.DataFrame, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Marker corner per image (index into ``CORNERS``), -1 for none; see the package docstring."""
    corner = np.full(len(table), -1)
    if strength == 0:
        return corner
    cls = table["label"].map(CLASSES.index).to_numpy()
    good = (table["fault"] == "").to_numpy()
    split = table["split"].to_numpy()
    for name in ("train", "val"):
        for c in range(len(CLASSES)):
            idx = rng.permutation(np.flatnonzero(good & (split == name) & (cls == c)))
            k = int(np.floor(strength * len(idx) + 0.5))
            corner[idx[:k]] = c
            corner[idx[k:]] = (c + 1 + rng.integers(0, 2, len(idx) - k)) % 3
    test = rng.permutation(np.flatnonzero(good & (split == "test")))
    corner[test] = (cls[test] + (np.arange(len(test)) + rng.integers(0, 3)) % 3) % 3
    bad = np.flatnonzero(~good)
    corner[bad] = rng.integers(0, 3, len(bad))
    return corner


def acquisitions(rng: np.random.Generator, n: int) -> list[Acquisition]:
    """Storage choices, in fixed proportions shuffled over the images (all kinds from 4 images on)."""
    syntax = rng.permutation(np.resize(["explicit", "rle", "j2k", "implicit", "explicit", "rle", "explicit", "j2k",
                                        "explicit", "implicit"], n))
    mono1 = rng.permutation(np.resize([True, False, False], n))
    rescale = rng.permutation(np.resize([0, -1, 1, -1, 2, -1], n))
    window = rng.permutation(np.resize([True, False], n))
    low, high = rng.integers(40, 400, n), rng.integers(3200, 4096, n)
    return [Acquisition(str(s), bool(m), RESCALES[r] if r >= 0 else None, bool(w), int(lo), int(hi))
            for s, m, r, w, lo, hi in zip(syntax, mono1, rescale, window, low, high)]


def master_rows(table: pd.DataFrame, rng: np.random.Generator) -> list[list[str]]:
    """``master_sheet.csv`` rows (all ``MASTER_SHEET_COLUMNS``, as text), one per image of ``table``."""
    rows = []
    for r in table.itertuples(index=False):
        onehot = ["0"] * len(CLASSES) if r.fault == "no_label" else [str(int(r.label == c)) for c in CLASSES]
        finding = records.findings(rng, r.label)
        chx = records.chexpert(rng, r.label, consolidation=finding["consolidation"] == "1")
        row = [r.dicom_id, mimic_relative_path(r.patient_id, r.study_id, r.dicom_id), r.study_id, r.patient_id,
               r.stay_id, r.sex, r.age, *map(str, screen_pads(r.height, r.width)), *records.diagnoses(rng, r.label),
               str(int(r.label == "Normal")), *onehot, *finding.values(), *chx.values(),
               records.exam_indication(rng, r.label, r.sex)]
        rows.append(row)
    return rows
