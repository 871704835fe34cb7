"""A synthetic EGD-CXR + MIMIC-CXR dataset in the real layout, with a documented shortcut.

``synthesize(out)`` writes::

    out/egd-cxr/master_sheet.csv      59 columns (schema.MASTER_SHEET_COLUMNS), one row per image
    out/egd-cxr/fixations.csv         37 columns (schema.GAZE_COLUMNS), one row per fixation
    out/egd-cxr/bounding_boxes.csv    dicom_id, bbox_name, x1, x2, y1, y2 (original pixels)
    out/mimic-cxr/files/pXX/p<patient_id>/s<study_id>/<dicom_id>.dcm

and nothing else (this docstring is the dataset's documentation: no README goes into the
data folder, whose DVC hash must only change with the data). The same arguments give
byte-identical files on any machine with the pinned numpy, scipy, pydicom and pylibjpeg
versions (``requirements.lock``): every random draw comes from ``seed`` (one stream for
the tables, one per image, so ``workers`` changes nothing), the DICOM UIDs are derived
from the ids, nothing is read from the clock, and all image arithmetic is float64 before
quantising to 12 bits.

Contents
--------
- Patients: 8-digit ids starting 10-19, one class each (Normal / CHF / pneumonia,
  balanced), sex, an ``anchor_age`` band such as ``20 - 30``; about a fifth have two or
  three studies (8-digit ids starting 5), one PA image each, with MIMIC-style DICOM ids
  (``24c7496c-d7635dfe-b8e0b87f-d818affc-78ff7cf4``). The master sheet is grouped by class
  (CHF, pneumonia, Normal) like the release. Diagnoses, findings, CheXpert labels and the
  exam indication (with quoted commas and line breaks) agree with the class
  (:mod:`.synth_records`).
- Images (:mod:`.synth_phantom`): chest phantoms, heights 240-272 and widths 208-256 at
  the default ``image_size`` 256 (scaled proportionally for other sizes). CHF: a larger
  heart and hazy bases; pneumonia: a patchy opacity in one lung; Normal: neither. Stored
  as described in :mod:`.synth_dicom` (12-bit, MONOCHROME1 and 2, rescale and window tags,
  four transfer syntaxes).
- Gaze (:mod:`.synth_gaze`): 30-60 fixations per image in sessions of up to 30 images,
  on the finding for CHF and pneumonia, scanning both lungs for Normal, never on the
  marker.
- ``bounding_boxes.csv``: for every image ``right lung``, ``left lung`` (the patient's
  sides: the right lung is on the image's left), ``right costophrenic angle``, ``left
  costophrenic angle``, ``cardiac silhouette``; the ground truth of the findings,
  ``finding: cardiomegaly``, ``finding: right basal haze`` and ``finding: left basal
  haze`` (CHF) or ``finding: opacity`` (pneumonia); and ``marker`` where the marker is.

The shortcut
------------
Each image carries a burned-in marker, a bright square of ``marker_size`` (default 4 %)
of the shorter image side, near one of three corners, one per class: ``Normal``
top-left, ``CHF`` top-right, ``pneumonia`` bottom-left. For train and validation images
the marker sits in its class's corner for a fraction ``shortcut_strength`` of the images
of each class (exactly, up to rounding) and in one of the two other corners otherwise;
for test images the corner is balanced against the label, so it agrees with the label
for a third of them (chance). A classifier that learns the marker scores high on
validation and drops on test; one that looks where the radiologist looked does not.
``shortcut_strength=0`` draws no marker at all (and no ``marker`` box); strengths below
1/3 make the marker anti-informative, which is allowed but rarely what you want.

Which patients are "test" is decided by :func:`cxrgaze.data.split.split_patients` with
``split_config`` on the (patient_id, label) table of the images that ``prepare`` will
keep (the faulty entries below are left out and do not change it). **The shortcut is
aligned to that split config**: the pipeline must split with the same config (the
``split`` section of ``params.yaml``, seed 42, 55/12/33 by default). If you change the
split seed or fractions, regenerate the data with the same ``split_config``, or the test
set carries the shortcut too.

Deliberate faults (``faults=True``, the default)
------------------------------------------------
Five extra images, each an extra study of a different patient who also has good images
with the same label (so the kept patients, their labels and the split are unchanged):
``truncated_dicom`` (the file is cut short inside the pixel data), ``missing_file`` (a
master-sheet row whose DICOM does not exist), ``no_fixations`` (no gaze rows),
``no_label`` (``Normal``, ``CHF``, ``pneumonia`` all 0) and ``no_pixel_data`` (a valid
DICOM without Pixel Data). Like the real release, ``fixations.csv`` also holds readings
of calibration screens under DICOM_IDs that are not in the master sheet (a shown image's
id without its last five characters, about one per session). ``SynthResult.faults`` and
``SynthResult.orphan_gaze_ids`` name them.
"""

from __future__ import annotations

import csv
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrgaze import CLASSES
from cxrgaze.config import SplitConfig
from cxrgaze.data import synth_records as records
from cxrgaze.data.schema import BOUNDING_BOX_COLUMNS, GAZE_COLUMNS, MASTER_SHEET_COLUMNS, mimic_relative_path
from cxrgaze.data.split import split_patients
from cxrgaze.data.synth_dicom import RESCALES, Acquisition, encode, stored_pixels
from cxrgaze.data.synth_gaze import fixation_rows, sample_reading, screen_pads, to_screen
from cxrgaze.data.synth_phantom import Box, render, sample_anatomy

FAULT_KINDS: tuple[str, ...] = ("truncated_dicom", "missing_file", "no_fixations", "no_label", "no_pixel_data")
CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left")
"""Marker corner of each class, in ``CLASSES`` order."""
CORNER_CENTRES: tuple[tuple[float, float], ...] = ((0.075, 0.06), (0.925, 0.06), (0.075, 0.94))
"""(u, v) centre of each corner's marker, as fractions of the image width and height."""
MASTER_ORDER: tuple[str, ...] = ("CHF", "pneumonia", "Normal")


@dataclass(frozen=True)
class SynthResult:
    """What :func:`synthesize` wrote, with the ground truth that is not in the files."""

    root: Path
    images: pd.DataFrame
    """One row per master-sheet row: ``dicom_id, patient_id, study_id, label, split, fault``
    (``""`` for good images), ``marker`` (a corner of ``CORNERS`` or ``""``),
    ``marker_agrees``, ``height, width, syntax, photometric``."""
    faults: dict[str, str]
    """Fault kind -> dicom_id of the deliberately unusable entries."""
    orphan_gaze_ids: tuple[str, ...]
    """DICOM_IDs in ``fixations.csv`` that are not in the master sheet."""
    n_fixations: int
    shortcut_strength: float
    split_config: SplitConfig = field(default_factory=SplitConfig)

    @property
    def egd_dir(self) -> Path:
        return self.root / "egd-cxr"

    @property
    def dicom_dir(self) -> Path:
        return self.root / "mimic-cxr"

    def marker_agreement(self) -> dict[str, float]:
        """Share of good images per split whose marker sits in its label's corner."""
        good = self.images[self.images["fault"] == ""]
        return {s: float(g["marker_agrees"].mean()) for s, g in good.groupby("split")}

    def summary(self) -> str:
        good = self.images[self.images["fault"] == ""]
        lines = [
            f"wrote {self.egd_dir}/ (master_sheet.csv, fixations.csv, bounding_boxes.csv) and {self.dicom_dir}/files/",
            f"{good['patient_id'].nunique()} patients, {len(self.images)} images "
            f"({len(good)} usable), {self.n_fixations} fixations",
        ]
        if self.shortcut_strength > 0:
            agree = ", ".join(f"{s} {v:.2f}" for s, v in sorted(self.marker_agreement().items()))
            lines.append(f"shortcut marker agrees with the label: {agree} (split seed {self.split_config.seed})")
        else:
            lines.append("no shortcut marker")
        if self.faults:
            lines.append("deliberate faults: " + ", ".join(f"{k} {v}" for k, v in self.faults.items()))
        return "\n".join(lines)


@dataclass(frozen=True)
class _Job:
    """Everything needed to draw, write and read one image (picklable for worker processes)."""

    seed: int
    index: int
    label: str
    height: int
    width: int
    corner: int  # -1: no marker
    marker_size: float
    acq: Acquisition
    fault: str
    path: Path
    tags: dict


@dataclass(frozen=True)
class _Drawn:
    boxes: dict[str, Box]
    reading: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # FPOGX, FPOGY, X_ORIGINAL, Y_ORIGINAL


def _unique_ints(rng: np.random.Generator, n: int, low: int, span: int) -> np.ndarray:
    return low + rng.choice(span, size=n, replace=False)


def _plan(rng: np.random.Generator, patients: int, faults: bool, image_size: int) -> pd.DataFrame:
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


def _assign_markers(table: pd.DataFrame, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Marker corner per image (index into ``CORNERS``), -1 for none; see the module docstring."""
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


def _acquisitions(rng: np.random.Generator, n: int) -> list[Acquisition]:
    """Storage choices, in fixed proportions shuffled over the images (all kinds from 4 images on)."""
    syntax = rng.permutation(np.resize(["explicit", "rle", "j2k", "implicit", "explicit", "rle", "explicit", "j2k",
                                        "explicit", "implicit"], n))
    mono1 = rng.permutation(np.resize([True, False, False], n))
    rescale = rng.permutation(np.resize([0, -1, 1, -1, 2, -1], n))
    window = rng.permutation(np.resize([True, False], n))
    low, high = rng.integers(40, 400, n), rng.integers(3200, 4096, n)
    return [Acquisition(str(s), bool(m), RESCALES[r] if r >= 0 else None, bool(w), int(lo), int(hi))
            for s, m, r, w, lo, hi in zip(syntax, mono1, rescale, window, low, high)]


def _draw(job: _Job) -> _Drawn:
    """Render one image, write its DICOM (or its fault), and simulate its reading."""
    rng = np.random.default_rng(np.random.SeedSequence([job.seed, 1, job.index]))
    phantom = render(sample_anatomy(rng, job.label), job.height, job.width, rng)
    boxes = dict(phantom.boxes)
    marker = None
    if job.corner >= 0:
        side = max(3, round(job.marker_size * min(job.height, job.width)))
        cu, cv = CORNER_CENTRES[job.corner] + rng.uniform(-0.015, 0.015, 2)
        x1 = int(np.clip(round(cu * job.width - side / 2), 0, job.width - side))
        y1 = int(np.clip(round(cv * job.height - side / 2), 0, job.height - side))
        phantom.image[y1:y1 + side, x1:x1 + side] = 1.0
        marker = boxes["marker"] = (x1, x1 + side, y1, y1 + side)
    if job.fault != "missing_file":
        pixels = None if job.fault == "no_pixel_data" else stored_pixels(phantom.image, job.acq)
        data = encode(pixels, job.acq, burned_in=marker is not None, shape=(job.height, job.width), **job.tags)
        if job.fault == "truncated_dicom":
            data = data[: int(len(data) * 0.55)]
        job.path.parent.mkdir(parents=True, exist_ok=True)
        job.path.write_bytes(data)
    gaze = sample_reading(rng, job.label, boxes, phantom.lungs, phantom.scale, job.height, job.width, marker)
    return _Drawn(boxes, to_screen(gaze, job.height, job.width, rng))


def _write_csv(path: Path, header: tuple[str, ...], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _master_rows(table: pd.DataFrame, rng: np.random.Generator) -> list[list[str]]:
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


def synthesize(
    out_dir: str | Path,
    patients: int = 420,
    seed: int = 0,
    image_size: int = 256,
    shortcut_strength: float = 0.9,
    *,
    split_config: SplitConfig = SplitConfig(),
    faults: bool = True,
    marker_size: float = 0.04,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> SynthResult:
    """Write the synthetic dataset into ``out_dir`` (see the module docstring).

    ``patients``: number of patients (about 1.25 images each, plus 5 faulty entries);
    ``image_size``: the typical image side in pixels (real MIMIC-CXR: ~2500-3000);
    ``shortcut_strength``: share of train/val images whose marker agrees with the label,
    0 for no marker; ``split_config``: the split the shortcut is aligned to (use the
    pipeline's); ``workers``: processes drawing images (the output does not depend on
    it); ``overwrite``: replace existing ``egd-cxr/`` and ``mimic-cxr/`` folders in
    ``out_dir`` instead of refusing.

    >>> synthesize("data", patients=24, image_size=128).summary()  # doctest: +SKIP
    """
    fewest = len(FAULT_KINDS) if faults else len(CLASSES)
    if patients < fewest:
        raise ValueError(f"need at least {fewest} patients, got {patients}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    if not 0.0 <= shortcut_strength <= 1.0:
        raise ValueError(f"shortcut_strength must be in [0, 1], got {shortcut_strength}")
    if not 0.0 < marker_size < 0.2:
        raise ValueError(f"marker_size must be in (0, 0.2), got {marker_size}")
    root = Path(out_dir)
    egd_dir, mimic_dir = root / "egd-cxr", root / "mimic-cxr"
    for folder in (egd_dir, mimic_dir):
        if folder.exists() and any(folder.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{folder} already exists and is not empty: remove it first (or pass overwrite=True, `--overwrite` on the command line)")
            shutil.rmtree(folder)
    egd_dir.mkdir(parents=True, exist_ok=True)
    mimic_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    table = _plan(rng, patients, faults, image_size)
    good = table[table["fault"] == ""]
    split = split_patients(good[["patient_id", "label"]], split_config)
    table["split"] = table["patient_id"].map(dict(zip(split["patient_id"], split["split"])))
    corner = _assign_markers(table, shortcut_strength, rng)
    acquisitions = _acquisitions(rng, len(table))
    jobs = [
        _Job(seed, i, r.label, r.height, r.width, int(corner[i]), marker_size, acquisitions[i], r.fault,
             mimic_dir / mimic_relative_path(r.patient_id, r.study_id, r.dicom_id),
             dict(dicom_id=r.dicom_id, patient_id=r.patient_id, study_id=r.study_id, sex=r.sex,
                  study_date=r.study_date, spacing_mm=380.0 / r.height))
        for i, r in enumerate(table.itertuples(index=False))
    ]
    drawn = _run(jobs, workers, progress)

    _write_csv(egd_dir / "master_sheet.csv", MASTER_SHEET_COLUMNS, _master_rows(table, rng))
    readings = [(dicom_id, *d.reading) for dicom_id, d, fault in zip(table["dicom_id"], drawn, table["fault"])
                if fault != "no_fixations"]
    fixations, orphans = fixation_rows(readings, faults, rng)
    _write_csv(egd_dir / "fixations.csv", GAZE_COLUMNS, fixations)
    boxes = [[dicom_id, name, *map(str, box)] for dicom_id, d in zip(table["dicom_id"], drawn)
             for name, box in d.boxes.items()]
    _write_csv(egd_dir / "bounding_boxes.csv", BOUNDING_BOX_COLUMNS, boxes)

    images = table[["dicom_id", "patient_id", "study_id", "label", "split", "fault", "height", "width"]].copy()
    images["marker"] = [CORNERS[c] if c >= 0 else "" for c in corner]
    images["marker_agrees"] = corner == table["label"].map(CLASSES.index).to_numpy()
    images["syntax"] = [a.syntax for a in acquisitions]
    images["photometric"] = ["MONOCHROME1" if a.monochrome1 else "MONOCHROME2" for a in acquisitions]
    return SynthResult(
        root=root,
        images=images,
        faults={kind: table.loc[table["fault"] == kind, "dicom_id"].iloc[0] for kind in FAULT_KINDS if faults},
        orphan_gaze_ids=tuple(orphans),
        n_fixations=len(fixations),
        shortcut_strength=shortcut_strength,
        split_config=split_config,
    )


def _run(jobs: list[_Job], workers: int, progress: bool) -> list[_Drawn]:
    """``_draw`` every job, in order, in this process or ``workers`` processes."""
    if workers > 1:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_draw, jobs, chunksize=4)
    else:
        pool, results = None, map(_draw, jobs)
    try:
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(jobs), desc="synth", unit="image")
        return list(results)
    finally:
        if pool is not None:
            pool.shutdown()
