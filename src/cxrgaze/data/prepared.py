"""``PreparedDir``: the files of a folder written by ``cxrgaze prepare``, named and read in one place.

What each file holds is documented in :mod:`cxrgaze.data.prepare` (the writer). Row i of
``images.npy`` and ``gaze.npy`` is row i of ``manifest.csv``. Readers get ids (dicom,
patient, study) as strings, never as numbers, so leading zeros and long ids survive.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

MANIFEST_DTYPES = {"dicom_id": str, "patient_id": str, "study_id": str, "label": str}


def read_manifest_csv(path: str | Path) -> pd.DataFrame:
    """A ``manifest.csv`` with ids and labels as strings; FileNotFoundError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest (run `cxrgaze prepare` first)")
    return pd.read_csv(path, dtype=MANIFEST_DTYPES)


class PreparedDir:
    """A prepared folder: the path of each output file and a reader for each.

    >>> folder = PreparedDir(prepared_dir)
    >>> folder.images(mmap=True)[folder.manifest()["index"]]  # doctest: +SKIP
    """

    IMAGES = "images.npy"
    GAZE = "gaze.npy"
    MANIFEST = "manifest.csv"
    EXCLUDED = "excluded.csv"
    FIXATIONS = "fixations.csv"
    BOXES = "boxes.csv"
    META = "meta.json"
    FILES: tuple[str, ...] = (IMAGES, GAZE, MANIFEST, EXCLUDED, FIXATIONS, BOXES, META)
    """Every file ``prepare`` writes (``boxes.csv`` only when the EGD folder has boxes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"PreparedDir({str(self.path)!r})"

    @property
    def images_path(self) -> Path:
        return self.path / self.IMAGES

    @property
    def gaze_path(self) -> Path:
        return self.path / self.GAZE

    @property
    def manifest_path(self) -> Path:
        return self.path / self.MANIFEST

    @property
    def excluded_path(self) -> Path:
        return self.path / self.EXCLUDED

    @property
    def fixations_path(self) -> Path:
        return self.path / self.FIXATIONS

    @property
    def boxes_path(self) -> Path:
        return self.path / self.BOXES

    @property
    def meta_path(self) -> Path:
        return self.path / self.META

    def existing(self) -> dict[str, Path]:
        """The files present, by name without extension (``images``, ``manifest``, ...), in ``FILES`` order."""
        return {name.split(".")[0]: self.path / name for name in self.FILES if (self.path / name).exists()}

    def remove_outputs(self) -> None:
        """Delete every output file (a new ``prepare`` run must not leave stale ones)."""
        for name in self.FILES:
            (self.path / name).unlink(missing_ok=True)

    def images(self, mmap: bool = False) -> np.ndarray:
        """(N, S, S) float16 images in [0, 1]; ``mmap`` opens them read-only without reading."""
        return np.load(self.images_path, mmap_mode="r" if mmap else None)

    def gaze(self, mmap: bool = False) -> np.ndarray:
        """(N, S, S) float16 static gaze heatmaps in [0, 1], on the images' grid."""
        return np.load(self.gaze_path, mmap_mode="r" if mmap else None)

    def manifest(self) -> pd.DataFrame:
        """``manifest.csv``, ids and labels as strings (see :func:`read_manifest_csv`)."""
        return read_manifest_csv(self.manifest_path)

    def excluded(self) -> pd.DataFrame:
        """``excluded.csv``: ``dicom_id, reason``, all text."""
        return pd.read_csv(self.excluded_path, dtype=str, keep_default_na=False)

    def fixations(self) -> pd.DataFrame:
        """``fixations.csv``: ``dicom_id, x, y, duration, start`` in target pixels and seconds."""
        return pd.read_csv(self.fixations_path, dtype={"dicom_id": str})

    def boxes(self) -> pd.DataFrame | None:
        """``boxes.csv`` in target pixels, or None when ``prepare`` had no boxes to write."""
        if not self.boxes_path.is_file() or self.boxes_path.stat().st_size == 0:
            return None
        return pd.read_csv(self.boxes_path, dtype={"dicom_id": str, "bbox_name": str})

    def meta(self) -> dict:
        """``meta.json``: the data config that shaped the arrays, counts, classes, exclusions."""
        try:
            return json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.meta_path}: missing (run `cxrgaze prepare` first)") from None
