"""``synthesize``: write the synthetic dataset, and ``SynthResult``, what it wrote.

The order of the work is the order of the random draws (see :mod:`cxrgaze.data.synth`):
the table stream plans the images, the split decides the markers, then the storage
choices; each image is drawn from its own stream (:mod:`.draw`); last the table stream
writes the master-sheet text and the reading sessions.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrgaze import CLASSES
from cxrgaze.config import SplitConfig
from cxrgaze.data.schema import BOUNDING_BOX_COLUMNS, GAZE_COLUMNS, MASTER_SHEET_COLUMNS, mimic_relative_path
from cxrgaze.data.split import split_patients
from cxrgaze.data.synth.dicom import Acquisition
from cxrgaze.data.synth.draw import Drawn, ImageJob, draw_all
from cxrgaze.data.synth.gaze import fixation_rows
from cxrgaze.data.synth.plan import CORNERS, FAULT_KINDS, acquisitions, assign_markers, master_rows, plan_images


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
    """Write the synthetic dataset into ``out_dir`` (see :mod:`cxrgaze.data.synth`).

    ``patients``: number of patients (about 1.25 images each, plus 5 faulty entries);
    ``image_size``: the typical image side in pixels (real MIMIC-CXR: ~2500-3000);
    ``shortcut_strength``: share of train/val images whose marker agrees with the label,
    0 for no marker; ``split_config``: the split the shortcut is aligned to (use the
    pipeline's); ``workers``: processes drawing images (the output does not depend on
    it); ``overwrite``: replace existing ``egd-cxr/`` and ``mimic-cxr/`` folders in
    ``out_dir`` instead of refusing.

    >>> synthesize("data", patients=24, image_size=128).summary()  # doctest: +SKIP
    """
    _check_arguments(patients, image_size, shortcut_strength, marker_size, faults)
    root = Path(out_dir)
    egd_dir, mimic_dir = _empty_folders(root, overwrite)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    table = plan_images(rng, patients, faults, image_size)
    good = table[table["fault"] == ""]
    split = split_patients(good[["patient_id", "label"]], split_config)
    table["split"] = table["patient_id"].map(dict(zip(split["patient_id"], split["split"])))
    corner = assign_markers(table, shortcut_strength, rng)
    storage = acquisitions(rng, len(table))
    drawn = draw_all(_jobs(table, corner, storage, seed, marker_size, mimic_dir), workers, progress)
    n_fixations, orphans = _write_tables(egd_dir, table, drawn, faults, rng)
    return SynthResult(
        root=root,
        images=_images_table(table, corner, storage),
        faults={kind: table.loc[table["fault"] == kind, "dicom_id"].iloc[0] for kind in FAULT_KINDS if faults},
        orphan_gaze_ids=tuple(orphans),
        n_fixations=n_fixations,
        shortcut_strength=shortcut_strength,
        split_config=split_config,
    )


def _check_arguments(patients: int, image_size: int, shortcut_strength: float, marker_size: float,
                     faults: bool) -> None:
    """ValueError naming the first out-of-range argument of :func:`synthesize`."""
    fewest = len(FAULT_KINDS) if faults else len(CLASSES)
    if patients < fewest:
        raise ValueError(f"need at least {fewest} patients, got {patients}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    if not 0.0 <= shortcut_strength <= 1.0:
        raise ValueError(f"shortcut_strength must be in [0, 1], got {shortcut_strength}")
    if not 0.0 < marker_size < 0.2:
        raise ValueError(f"marker_size must be in (0, 0.2), got {marker_size}")


def _empty_folders(root: Path, overwrite: bool) -> tuple[Path, Path]:
    """``root/egd-cxr`` and ``root/mimic-cxr``, created empty (a non-empty one is refused unless ``overwrite``)."""
    egd_dir, mimic_dir = root / "egd-cxr", root / "mimic-cxr"
    for folder in (egd_dir, mimic_dir):
        if folder.exists() and any(folder.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{folder} already exists and is not empty: remove it first "
                                      "(or pass overwrite=True, `--overwrite` on the command line)")
            shutil.rmtree(folder)
    egd_dir.mkdir(parents=True, exist_ok=True)
    mimic_dir.mkdir(parents=True, exist_ok=True)
    return egd_dir, mimic_dir


def _jobs(table: pd.DataFrame, corner: np.ndarray, storage: list[Acquisition], seed: int, marker_size: float,
          mimic_dir: Path) -> list[ImageJob]:
    """One :class:`ImageJob` per row of ``table``, writing under ``mimic_dir``."""
    return [
        ImageJob(seed, i, r.label, r.height, r.width, int(corner[i]), marker_size, storage[i], r.fault,
                 mimic_dir / mimic_relative_path(r.patient_id, r.study_id, r.dicom_id),
                 dict(dicom_id=r.dicom_id, patient_id=r.patient_id, study_id=r.study_id, sex=r.sex,
                      study_date=r.study_date, spacing_mm=380.0 / r.height))
        for i, r in enumerate(table.itertuples(index=False))
    ]


def _write_csv(path: Path, header: tuple[str, ...], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_tables(egd_dir: Path, table: pd.DataFrame, drawn: list[Drawn], faults: bool,
                  rng: np.random.Generator) -> tuple[int, list[str]]:
    """``master_sheet.csv``, ``fixations.csv`` and ``bounding_boxes.csv``; returns (fixation count, orphan ids)."""
    _write_csv(egd_dir / "master_sheet.csv", MASTER_SHEET_COLUMNS, master_rows(table, rng))
    readings = [(dicom_id, *d.reading) for dicom_id, d, fault in zip(table["dicom_id"], drawn, table["fault"])
                if fault != "no_fixations"]
    fixations, orphans = fixation_rows(readings, faults, rng)
    _write_csv(egd_dir / "fixations.csv", GAZE_COLUMNS, fixations)
    boxes = [[dicom_id, name, *map(str, box)] for dicom_id, d in zip(table["dicom_id"], drawn)
             for name, box in d.boxes.items()]
    _write_csv(egd_dir / "bounding_boxes.csv", BOUNDING_BOX_COLUMNS, boxes)
    return len(fixations), orphans


def _images_table(table: pd.DataFrame, corner: np.ndarray, storage: list[Acquisition]) -> pd.DataFrame:
    """:attr:`SynthResult.images`: the plan's columns with marker, agreement and storage."""
    images = table[["dicom_id", "patient_id", "study_id", "label", "split", "fault", "height", "width"]].copy()
    images["marker"] = [CORNERS[c] if c >= 0 else "" for c in corner]
    images["marker_agrees"] = corner == table["label"].map(CLASSES.index).to_numpy()
    images["syntax"] = [a.syntax for a in storage]
    images["photometric"] = ["MONOCHROME1" if a.monochrome1 else "MONOCHROME2" for a in storage]
    return images
