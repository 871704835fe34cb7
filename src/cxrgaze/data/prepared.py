"""``PreparedDir``: the files of a folder written by ``cxrgaze prepare``, named and read in one place.

What each file holds is documented in :mod:`cxrgaze.data.prepare` (the writer). Row i of
``images.npy`` and ``gaze.npy`` is row i of ``manifest.csv``. Readers get ids (dicom,
patient, study) as strings, never as numbers, so leading zeros and long ids survive.

A folder is checked when it is opened (:meth:`PreparedDir.check`, run by the first read of
the manifest or the arrays): files present, ``.npy`` headers that match the file sizes,
float16 (N, S, S) arrays with one row per manifest row. A folder that fails is refused with
a :class:`PreparedDataError` (or a FileNotFoundError) of one line naming the file and the
mismatch, never an IndexError deep inside training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from cxrgaze.config import DataConfig
from cxrgaze.errors import first_line

MANIFEST_DTYPES = {"dicom_id": str, "patient_id": str, "study_id": str, "label": str}
ARRAY_DTYPE = np.dtype(np.float16)
"""The dtype of ``images.npy`` and ``gaze.npy``."""
RERUN = "rerun `cxrgaze prepare`"


class PreparedDataError(ValueError):
    """A prepared folder whose files disagree with each other, with their headers or with the
    data settings (a ValueError: the CLI reports it as one line)."""


def read_manifest_csv(path: str | Path) -> pd.DataFrame:
    """A ``manifest.csv`` with ids and labels as strings; FileNotFoundError naming the file,
    :class:`PreparedDataError` naming it when it is empty or no CSV."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest (run `cxrgaze prepare` first)")
    try:
        return pd.read_csv(path, dtype=MANIFEST_DTYPES)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise PreparedDataError(f"{path}: not a readable CSV ({first_line(exc)}); {RERUN}") from None


def read_npy_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file from its header, without reading the data.

    The file's size must be exactly the header plus the data the header announces (a
    truncated copy, or one with bytes appended, is refused).
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:  # 2.0 and 3.0 headers differ only in their text encoding
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            data_start = fh.tell()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (run `cxrgaze prepare` first)") from None
    except ValueError as exc:
        raise PreparedDataError(f"{path}: not a .npy array file ({first_line(exc)}); {RERUN}") from None
    expected = data_start + math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise PreparedDataError(f"{path}: {size} bytes, but its header describes a {shape} {dtype} array of "
                                f"{expected} bytes ({'truncated' if size < expected else 'extra bytes'}); {RERUN}")
    return shape, dtype


class PreparedDir:
    """A prepared folder: the path of each output file and a reader for each.

    The readers of the manifest and the arrays run :meth:`check` first (once per instance);
    the writer, ``prepare``, only uses the paths.

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
        self._shape: tuple[int, int, int] | None = None

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

    def check(self) -> tuple[int, int, int]:
        """The arrays' shape (N, S, S), once the folder is known to hold one dataset.

        Reads ``manifest.csv`` and the ``.npy`` headers, never the arrays: ``manifest.csv``,
        ``images.npy`` and ``gaze.npy`` present; each ``.npy`` file as long as its header
        says (:func:`read_npy_header`); both arrays float16 of the same (N, S, S) shape, with
        N the manifest's row count; the shape ``meta.json`` recorded, when it is there.
        FileNotFoundError or :class:`PreparedDataError`, one line naming the file, otherwise.
        """
        if self._shape is None:
            rows = len(read_manifest_csv(self.manifest_path))
            shape = self._check_array(self.images_path, rows)
            gaze_shape = self._check_array(self.gaze_path, rows)
            if gaze_shape != shape:
                raise PreparedDataError(f"{self.gaze_path}: shape {gaze_shape}, but {self.IMAGES} has {shape}; {RERUN}")
            recorded = (self.meta().get("arrays") or {}).get("shape") if self.meta_path.is_file() else None
            if recorded is not None and tuple(recorded) != shape:
                raise PreparedDataError(f"{self.meta_path}: arrays.shape {tuple(recorded)}, but {self.IMAGES} has "
                                        f"{shape}; {RERUN}")
            self._shape = shape
        return self._shape

    def _check_array(self, path: Path, rows: int) -> tuple[int, int, int]:
        """The shape of one array file, checked against its dtype, (N, S, S) and ``rows``."""
        shape, dtype = read_npy_header(path)
        if dtype != ARRAY_DTYPE:
            raise PreparedDataError(f"{path}: dtype {dtype}, expected {ARRAY_DTYPE}; {RERUN}")
        if len(shape) != 3 or shape[1] != shape[2]:
            raise PreparedDataError(f"{path}: shape {shape}, expected (N, S, S) square images; {RERUN}")
        if shape[0] != rows:
            raise PreparedDataError(f"{path}: {shape[0]} rows, but {self.MANIFEST} has {rows}; {RERUN}")
        return shape

    def check_settings(self, config: DataConfig, where: str) -> None:
        """Refuse data settings (``where``: the params file) that contradict this folder.

        Training and evaluation read the arrays and never the ``data`` section, so a
        ``data.image_size`` other than the arrays' side (or a ``resize``, ``gaze_sigma``,
        ``gaze_duration_weighted`` other than ``meta.json`` recorded) would otherwise be
        ignored in silence: the params file would describe data the model never saw.
        """
        size = self.check()[1]
        if config.image_size != size:
            raise PreparedDataError(f"{where}: data.image_size: {config.image_size}, but {self.images_path} holds "
                                    f"{size}x{size} images; {RERUN} or set data.image_size: {size}")
        recorded = (self.meta().get("config") or {}) if self.meta_path.is_file() else {}
        for key in ("resize", "gaze_sigma", "gaze_duration_weighted"):
            if key in recorded and recorded[key] != getattr(config, key):
                raise PreparedDataError(f"{where}: data.{key}: {getattr(config, key)!r}, but {self.meta_path} "
                                        f"records {recorded[key]!r}; {RERUN} or set data.{key}: {recorded[key]!r}")

    def images(self, mmap: bool = False) -> np.ndarray:
        """(N, S, S) float16 images in [0, 1]; ``mmap`` opens them read-only without reading."""
        self.check()
        return np.load(self.images_path, mmap_mode="r" if mmap else None)

    def gaze(self, mmap: bool = False) -> np.ndarray:
        """(N, S, S) float16 static gaze heatmaps in [0, 1], on the images' grid."""
        self.check()
        return np.load(self.gaze_path, mmap_mode="r" if mmap else None)

    def manifest(self) -> pd.DataFrame:
        """``manifest.csv``, ids and labels as strings (see :func:`read_manifest_csv`)."""
        self.check()
        return read_manifest_csv(self.manifest_path)

    def excluded(self) -> pd.DataFrame:
        """``excluded.csv``: ``dicom_id, reason``, all text."""
        return pd.read_csv(self.excluded_path, dtype=str, keep_default_na=False)

    def fixations(self) -> pd.DataFrame:
        """``fixations.csv``: ``dicom_id, x, y, duration, start`` in target pixels and seconds."""
        if not self.fixations_path.is_file():
            raise FileNotFoundError(f"{self.fixations_path}: missing (run `cxrgaze prepare` first)")
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
        except json.JSONDecodeError as exc:
            raise PreparedDataError(f"{self.meta_path}: not valid JSON ({exc}); {RERUN}") from None
