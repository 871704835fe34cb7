"""``cxrgaze predict``: the served model on local files, without a server.

The model is loaded with ``mlflow.pyfunc.load_model`` (default ``models:/cxrgaze@champion``
from the tracking store that ``MLFLOW_TRACKING_URI`` names; any model URI or local model
folder works) and each file goes through the same ``predict`` as a served request, one
file per call, so that one bad file is reported and the others still run.

For each file, one JSON object: ``file``, ``prob_<class>``..., ``scoring``, ``label`` and ``overlay``
(the path of the overlay PNG, or null), or ``file`` and ``error``. The overlay is the
image (at most :data:`OVERLAY_MAX_SIDE` pixels on its long side, original aspect ratio)
with the heatmap in the ``jet`` colour map blended in proportion to its value, so cool
regions show the plain image.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import mlflow
import numpy as np
import pandas as pd
from matplotlib import colormaps
from mlflow.exceptions import MlflowException
from PIL import Image

from cxrgaze.data.dicom import ResizeMap
from cxrgaze.errors import first_line
from cxrgaze.serving.model import INPUT_COLUMN
from cxrgaze.serving.preprocess import read_image
from cxrgaze.serving.serve import DEFAULT_MODEL_URI

if TYPE_CHECKING:
    from mlflow.pyfunc import PyFuncModel

OVERLAY_MAX_SIDE = 1024
OVERLAY_ALPHA = 0.6
"""Weight of the colour map where the heatmap is 1 (it falls linearly to 0 with the map)."""


def load(model_uri: str = DEFAULT_MODEL_URI) -> "PyFuncModel":
    """The pyfunc at ``model_uri``; an unknown model is a one-line ``RuntimeError``."""
    return load_resolved(model_uri)[0]


def load_resolved(model_uri: str = DEFAULT_MODEL_URI) -> tuple["PyFuncModel", dict[str, Any]]:
    """The pyfunc at ``model_uri`` and what :func:`~cxrgaze.serving.server.resolve_model` says
    of it (an alias is resolved once, so the version named is the one loaded); an unknown
    model is a one-line ``RuntimeError``."""
    from cxrgaze.serving.server import resolve_model

    try:
        load_uri, info = resolve_model(model_uri)
        return mlflow.pyfunc.load_model(load_uri), info
    except MlflowException as exc:
        raise RuntimeError(f"{model_uri}: cannot load the model ({first_line(exc, 300)})") from None


def predict_files(files: Sequence[str | Path], model_uri: str = DEFAULT_MODEL_URI, out_dir: str | Path | None = None,
                  heatmap: str | None = None, heatmap_size: int | None = None) -> Iterator[dict[str, Any]]:
    """One result per file (see the module docstring); overlays go to ``out_dir`` when given."""
    pyfunc = load(model_uri)
    served = pyfunc.unwrap_python_model()
    params = {k: v for k, v in (("heatmap", heatmap), ("heatmap_size", heatmap_size)) if v is not None}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for file in map(Path, files):
        try:
            data = file.read_bytes()
        except OSError as exc:
            yield {"file": str(file), "error": exc.strerror or str(exc)}
            continue
        frame = pd.DataFrame({INPUT_COLUMN: [base64.b64encode(data).decode("ascii")]})
        try:
            row = pyfunc.predict(frame, params=params or None).iloc[0].to_dict()
        except MlflowException as exc:
            yield {"file": str(file), "error": exc.message.removeprefix("row 0: ")}
            continue
        overlay_path = None
        if out is not None and row["heatmap"]:
            overlay_path = _unique(out, file.stem, used)
            heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["heatmap"]))), dtype=np.float32) / 255.0
            overlay(read_image(data, served.limits), heat, served.data_config.resize).save(overlay_path)
        result = {"file": str(file), **{k: v for k, v in row.items() if k != "heatmap"}}
        result["overlay"] = str(overlay_path) if overlay_path is not None else None
        yield result


def overlay(image: np.ndarray, heat: np.ndarray, resize: str) -> Image.Image:
    """RGB picture of ``image`` (H, W) in [0, 1] with ``heat`` (s, s) in [0, 1] blended in.

    ``heat`` lies on the model's square grid; ``resize`` (``stretch`` or ``pad``, the
    data config's) says how the image was put on that grid, so the map is cut back to the
    image region and stretched to the image's aspect ratio.
    """
    height, width = image.shape
    scale = min(1.0, OVERLAY_MAX_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL (w, h)
    grid = ResizeMap.create((height, width), heat.shape[0], resize)
    (h, w), top, left = grid.inner_shape, grid.offset_y, grid.offset_x
    region = np.ascontiguousarray(heat[top:top + h, left:left + w], dtype=np.float32)
    heat_up = np.clip(np.asarray(Image.fromarray(region).resize(size, Image.Resampling.BILINEAR)), 0.0, 1.0)
    grey = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize(size, Image.Resampling.BILINEAR)
    colour = colormaps["jet"](heat_up)[..., :3]  # (h, w, 3)
    weight = (OVERLAY_ALPHA * heat_up)[..., None]  # (h, w, 1)
    rgb = (1.0 - weight) * np.clip(np.asarray(grey), 0.0, 1.0)[..., None] + weight * colour
    return Image.fromarray(np.rint(rgb * 255).astype(np.uint8))  # (h, w, 3) uint8: RGB


def _unique(out: Path, stem: str, used: set[str]) -> Path:
    """``out/<stem>.overlay.png``, with ``-2``, ``-3``... when two inputs share a stem."""
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return out / f"{name}.overlay.png"
