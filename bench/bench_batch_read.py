"""Reading one training batch (32 images at 224 px): prepared arrays vs per-item DICOM decoding.

The reference code decoded and resized every full-size DICOM in ``__getitem__``, every
epoch. ``prepare`` does that once; training then reads float16 arrays. This script writes
8 full-size DICOMs (4 uncompressed, 4 JPEG 2000 lossless), prepares them, tiles the
prepared rows to the paper's 1083 images, and times in the same run:

- prepared, ``PreparedDataset`` + ``DataLoader`` (shuffled, memory-mapped arrays);
- prepared, ``load_split`` tensors indexed per batch (what ``cxrgaze.train`` does);
- reference-style per item: ``dcmread`` + ``pixel_array`` / max + antialiased resize to 224,
  over the uncompressed files (the reference's cheapest case; no gaze PNG read, which the
  reference also did) and over the JPEG 2000 files (2 loader workers).

Run: .venv/bin/python bench/bench_batch_read.py   (about 2 minutes on a 2-core CPU)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import torch
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dicoms import write_layout  # noqa: E402

from cxrgaze.config import DataConfig  # noqa: E402
from cxrgaze.data.dataset import PreparedDataset, load_split  # noqa: E402
from cxrgaze.data.dicom import ResizeMap  # noqa: E402
from cxrgaze.data.prepare import prepare  # noqa: E402

BATCH, SIZE, N_IMAGES = 32, 224, 1083


class PerItemDicoms(Dataset):
    """The reference's way: decode and resize the full-size DICOM in every ``__getitem__``."""

    def __init__(self, paths: list[Path], length: int) -> None:
        self.paths, self.length = paths, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        ds = pydicom.dcmread(self.paths[i % len(self.paths)])
        image = ds.pixel_array.astype(np.float32)  # (H, W)
        image /= image.max()
        return torch.from_numpy(ResizeMap.create(image.shape, SIZE).resize(image)).unsqueeze(0)  # (1, S, S)


def tile_prepared(prepared: Path, out: Path, n: int) -> None:
    """A prepared folder of ``n`` rows made by repeating the rows of ``prepared``."""
    out.mkdir()
    manifest = pd.read_csv(prepared / "manifest.csv", dtype=str)
    rows = np.arange(n) % len(manifest)
    for name in ("images.npy", "gaze.npy"):
        np.save(out / name, np.load(prepared / name)[rows])  # (n, S, S)
    tiled = manifest.iloc[rows].reset_index(drop=True)
    tiled["dicom_id"] = [f"{d}-{k}" for k, d in enumerate(tiled["dicom_id"])]
    tiled.to_csv(out / "manifest.csv", index=False)


def time_batches(loader: DataLoader, batches: int) -> list[float]:
    """Seconds per batch for the first ``batches`` batches of ``loader``."""
    times, it = [], iter(loader)
    for _ in range(batches):
        t0 = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        root = Path(tmp)
        egd, dicoms = write_layout(root, [ExplicitVRLittleEndian] * 4 + [JPEG2000Lossless] * 4)
        prepare(egd, dicoms, root / "prepared", DataConfig(image_size=SIZE, workers=2), progress=False)
        tile_prepared(root / "prepared", root / "tiled", N_IMAGES)
        paths = sorted(dicoms.rglob("*.dcm"))
        raw, j2k = paths[:4], paths[4:]
        assert all(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEG2000Lossless
                   for p in j2k)

        torch.manual_seed(0)
        loader = DataLoader(PreparedDataset(root / "tiled"), batch_size=BATCH, shuffle=True, num_workers=0)
        prepared_loader = statistics.median(time_batches(loader, 30))
        t0 = time.perf_counter()
        split = load_split(root / "tiled")
        load_seconds = time.perf_counter() - t0
        order = torch.randperm(len(split)).split(BATCH)
        tensor_times = []
        for idx in order[:30]:
            t0 = time.perf_counter()
            _ = split.images[idx].float(), split.gaze[idx].float(), split.labels[idx]
            tensor_times.append(time.perf_counter() - t0)
        prepared_tensor = statistics.median(tensor_times)

        reference_raw = time_batches(DataLoader(PerItemDicoms(raw, BATCH), batch_size=BATCH), 1)[0]
        reference_j2k = time_batches(DataLoader(PerItemDicoms(j2k, BATCH), batch_size=BATCH, num_workers=2), 1)[0]

    print(f"one batch of {BATCH} at {SIZE} px ({os.cpu_count()} CPU cores; prepared data tiled to {N_IMAGES} images)")
    print(f"{'how':<58} {'ms/batch':>10} {'x prepared DataLoader':>22}")
    table = [
        ("prepared: PreparedDataset + DataLoader (0 workers)", prepared_loader),
        ("prepared: load_split tensors, indexed", prepared_tensor),
        ("reference: decode+resize per item, uncompressed (0 wkrs)", reference_raw),
        ("reference: decode+resize per item, JPEG 2000 (2 workers)", reference_j2k),
    ]
    for name, seconds in table:
        print(f"{name:<58} {1000 * seconds:10.2f} {seconds / prepared_loader:21.1f}x")
    print(f"speed-up, same loader settings (uncompressed reference / prepared DataLoader): "
          f"{reference_raw / prepared_loader:.0f}x")
    print(f"(load_split of all {N_IMAGES} images once: {load_seconds:.2f} s)")


if __name__ == "__main__":
    main()
