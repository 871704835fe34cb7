"""The per-image work of ``prepare`` (:mod:`cxrgaze.data.prepare`), run in worker processes.

:class:`ImageTask` is what a worker gets (picklable), :func:`decode_image` what it does:
decode the DICOM, resize it to the model grid, draw its static gaze heatmap and map the
fixations inside the image to target pixels. A spawned worker imports only this module
and what it needs (not pandas' EGD readers, nor tqdm).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxrgaze.data.dicom import DicomError, ResizeMap, model_grid, read_dicom
from cxrgaze.data.gaze import inside_image, static_heatmap_resized


@dataclass(frozen=True)
class ImageTask:
    """One image to decode, with everything the worker needs (picklable)."""

    index: int
    dicom_id: str
    path: str
    name: str
    x: np.ndarray
    y: np.ndarray
    duration: np.ndarray
    start: np.ndarray
    size: int
    resize: str
    sigma: float
    duration_weighted: bool


def decode_image(task: ImageTask) -> dict:
    """Worker: decode, resize and heatmap one image; exclusions come back as ``error``."""
    try:
        image, info = read_dicom(task.path, name=task.name)
    except DicomError as exc:
        return {"index": task.index, "error": (exc.kind, str(exc))}
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the run
        return {"index": task.index, "error": ("error", f"{task.name}: unexpected {type(exc).__name__}: {exc}")}
    shape = (info.original_height, info.original_width)
    inside = inside_image(task.x, task.y, shape)  # (F,)
    if not inside.any():
        return {"index": task.index, "error": ("no_fixations", f"fixations.csv: none of the {len(inside)} fixations "
                                                                 f"is inside the {shape[1]} x {shape[0]} image")}
    resize_map = ResizeMap.create(shape, task.size, task.resize)
    weights = task.duration if task.duration_weighted else None
    gaze = static_heatmap_resized(task.x, task.y, resize_map, task.sigma, weights)  # (S, S)
    tx, ty = resize_map.map_points(task.x[inside], task.y[inside])
    return {
        "index": task.index,
        "image": model_grid(image, resize_map),  # (S, S) float16
        "gaze": gaze.astype(np.float16),  # (S, S)
        "info": info,
        "fixations": np.stack([tx, ty, task.duration[inside], task.start[inside]], axis=1),  # (F_in, 4)
        "n_outside": int((~inside).sum()),
    }
