"""The per-image work of the synthetic dataset (see :mod:`cxrgaze.data.synth`).

One :class:`ImageJob` per master-sheet row, drawn from its own random stream
(``SeedSequence([seed, 1, index])``): render the phantom, burn in the marker, write the
DICOM (or its fault) and simulate the reading. :func:`draw_all` runs the jobs in order, in
this process or in worker processes, with the same result either way.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cxrgaze.data.synth.anatomy import Box, sample_anatomy
from cxrgaze.data.synth.dicom import Acquisition, encode, stored_pixels
from cxrgaze.data.synth.gaze import sample_reading, to_screen
from cxrgaze.data.synth.phantom import render
from cxrgaze.data.synth.plan import CORNER_CENTRES


@dataclass(frozen=True)
class ImageJob:
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
class Drawn:
    """What the tables need of one drawn image: its boxes and its reading."""

    boxes: dict[str, Box]
    reading: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # FPOGX, FPOGY, X_ORIGINAL, Y_ORIGINAL


def draw(job: ImageJob) -> Drawn:
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
    return Drawn(boxes, to_screen(gaze, job.height, job.width, rng))


def draw_all(jobs: list[ImageJob], workers: int, progress: bool) -> list[Drawn]:
    """:func:`draw` every job, in order, in this process or ``workers`` processes."""
    if workers > 1:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(draw, jobs, chunksize=4)
    else:
        pool, results = None, map(draw, jobs)
    try:
        if progress:
            results = tqdm(results, total=len(jobs), desc="synth", unit="image")
        return list(results)
    finally:
        if pool is not None:
            pool.shutdown()
