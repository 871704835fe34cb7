"""Reading a prepared folder for training: row selection, a torch ``Dataset``, whole-split tensors.

Images come back as single-channel [0, 1] floats (models normalise inside themselves),
gaze maps as [0, 1] floats on the same grid, labels as class indices into ``CLASSES``.
Rows are found by ``dicom_id`` through ``manifest.csv``, so a split table cannot silently
point at the wrong image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cxrgaze import CLASSES
from cxrgaze.data.prepared import PreparedDir
from cxrgaze.data.split import read_split


def select_rows(prepared_dir: str | Path, rows: Sequence[str] | pd.DataFrame | str | Path | None = None,
                split: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Array rows, class indices and ids of the chosen images, in the order given.

    ``rows``: None (every prepared image), a sequence of dicom_ids, or a split table (a
    DataFrame, or the path of the CSV written by ``cxrgaze split``; a plain string is a
    path) with a ``dicom_id`` column; ``split`` keeps only that table's rows whose
    ``split`` equals it.
    """
    prepared = PreparedDir(prepared_dir)
    manifest = prepared.manifest()
    if rows is None:
        ids = manifest["dicom_id"].tolist()
    else:
        if isinstance(rows, (str, Path)):
            rows = read_split(rows)
        if isinstance(rows, pd.DataFrame):
            if split is not None:
                if "split" not in rows:
                    raise ValueError(f"split table has no 'split' column to select {split!r} from")
                rows = rows[rows["split"] == split]
            ids = rows["dicom_id"].astype(str).tolist()
        else:
            ids = [str(i) for i in rows]
    position = pd.Series(np.arange(len(manifest)), index=manifest["dicom_id"])
    missing = [i for i in ids if i not in position.index]
    if missing:
        raise ValueError(f"{prepared.manifest_path}: {len(missing)} id(s) not prepared, e.g. "
                         f"{missing[0]} (is the split table from another prepare run?)")
    index = position.loc[ids].to_numpy(dtype=np.int64)  # (N,)
    classes = {c: i for i, c in enumerate(CLASSES)}
    labels = manifest["label"].to_numpy()[index]
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"{prepared.manifest_path}: unknown label(s) {unknown}")
    return index, np.array([classes[v] for v in labels], dtype=np.int64), ids


class PreparedDataset(Dataset):
    """Items of a prepared folder: ``{"image", "gaze", "label", "dicom_id"}``.

    ``image`` and ``gaze`` are float32 (1, S, S) in [0, 1]; ``label`` a long class index.
    ``rows`` and ``split`` choose the images as in ``select_rows``. The arrays are opened
    with ``np.load(mmap_mode="r")`` in each process on first use (cheap to pickle for
    DataLoader workers). ``augment`` applies one small random affine transform (rotation
    up to 5 degrees, shift up to 4 %, scale 0.95-1.05) identically to image and gaze, with
    zero fill; off by default (the reference trained without augmentation).
    """

    def __init__(self, prepared_dir: str | Path, rows: Sequence[str] | pd.DataFrame | str | Path | None = None,
                 split: str | None = None, augment: bool = False) -> None:
        self.prepared_dir = Path(prepared_dir)
        self.index, self.labels, self.dicom_ids = select_rows(prepared_dir, rows, split)
        self.augment = augment
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = None  # reopen the memory maps in the receiving process
        return state

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            prepared = PreparedDir(self.prepared_dir)
            self._arrays = (prepared.images(mmap=True), prepared.gaze(mmap=True))
        return self._arrays

    def __getitem__(self, i: int) -> dict:
        images, gaze = self._open()
        row = self.index[i]
        pair = torch.from_numpy(np.stack([images[row], gaze[row]]).astype(np.float32))  # (2, S, S)
        if self.augment:
            pair = random_affine(pair.unsqueeze(1)).squeeze(1)
        return {"image": pair[0:1], "gaze": pair[1:2], "label": torch.tensor(self.labels[i]),
                "dicom_id": self.dicom_ids[i]}


def random_affine(x: torch.Tensor, max_degrees: float = 5.0, max_shift: float = 0.04,
                  scale: tuple[float, float] = (0.95, 1.05), generator: torch.Generator | None = None) -> torch.Tensor:
    """One random affine transform applied to every map of ``x`` (K, C, H, W) alike, zero fill."""
    angle = math.radians(float(torch.empty(1).uniform_(-max_degrees, max_degrees, generator=generator)))
    factor = float(torch.empty(1).uniform_(*scale, generator=generator))
    shift = torch.empty(2).uniform_(-2 * max_shift, 2 * max_shift, generator=generator)  # grid units span 2
    cos, sin = math.cos(angle) / factor, math.sin(angle) / factor
    theta = torch.tensor([[cos, -sin, float(shift[0])], [sin, cos, float(shift[1])]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)  # (K, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0, 1)


@dataclass(frozen=True)
class SplitTensors:
    """A whole split in memory: ``images``/``gaze`` (N, 1, S, S) float16, ``labels`` (N,) long."""

    images: torch.Tensor
    gaze: torch.Tensor
    labels: torch.Tensor
    dicom_ids: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def load_split(prepared_dir: str | Path, split_table: str | Path | pd.DataFrame | None = None,
               split: str | None = None) -> SplitTensors:
    """Load one split (or everything when ``split_table`` is None) as tensors at once.

    Kept float16 to halve memory (1083 images at 224 px: 2 x 109 MB); convert per batch
    with ``.to(device, torch.float32)``. Rows follow the split table's order.
    """
    index, labels, ids = select_rows(prepared_dir, split_table, split)
    prepared = PreparedDir(prepared_dir)
    images, gaze = prepared.images(mmap=True), prepared.gaze(mmap=True)
    return SplitTensors(
        images=torch.from_numpy(np.ascontiguousarray(images[index])).unsqueeze(1),  # (N, 1, S, S)
        gaze=torch.from_numpy(np.ascontiguousarray(gaze[index])).unsqueeze(1),  # (N, 1, S, S)
        labels=torch.from_numpy(labels),  # (N,)
        dicom_ids=ids,
    )
