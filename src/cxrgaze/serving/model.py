"""The served model: an MLflow pyfunc that takes image files and returns diagnosis and heatmap.

Input: a table with one string column ``image``, each row a base64-encoded DICOM (PNG and
JPEG are accepted too; standard base64 alphabet, no line breaks). Other columns are
ignored (MLflow's schema enforcement drops them). Params (optional): ``heatmap`` (``mask``, ``gbp``, ``gradcam`` or
``none``) and ``heatmap_size`` (side of the returned PNG, pixels, 8 to 2048; default the
model's input size). Output, one row per input row: ``prob_Normal``, ``prob_CHF``,
``prob_pneumonia`` (the class scores of the training objective, :mod:`cxrgaze.predict`:
sigmoid per class for a model trained with per-class BCE, so they need not sum to 1;
softmax for cross-entropy), ``scoring`` (``sigmoid`` or ``softmax``: which of the two),
``label`` (the class with the highest score) and ``heatmap`` (base64 PNG, 8-bit grey,
``heatmap_size`` square, on the model's input grid; an empty string for ``none``).

Heatmaps: ``mask`` is the U-Net decoder's mask (sigmoid of its logits), from the same
forward pass as the class logits; ``gbp`` (guided backpropagation) and ``gradcam`` explain
the predicted class. The default is ``mask`` for a model with a decoder and ``gbp`` for
``baseline`` and ``rrr-*`` (no decoder; the logged params schema carries that default);
asking such a model for ``mask`` explicitly is an error rather than a silent substitute.

Bad input: every problem is an ``MlflowException`` with ``INVALID_PARAMETER_VALUE`` (HTTP
400 from ``mlflow models serve``) whose message names the row (0-based position in the
input) and the problem, e.g. ``row 2: not valid base64 (...)``. A batch with bad rows is
refused as a whole: the scoring server answers one status per request, and a 200 with
holes would be easy to misread. Every row is checked before anything is predicted, so the
message lists all bad rows (the first five, and how many in all). Before ``predict`` runs,
MLflow's own schema check refuses a table without an ``image`` column ("Model is missing
inputs ['image']", also a 400). Images are decoded one at a time and reduced to the model
grid at once, so a batch holds at most one decoded full-size image; inference runs in
chunks of :data:`CHUNK` images under a lock (the scoring server calls ``predict`` from
several threads; Grad-CAM hooks the model).

The artifacts are the checkpoint (:mod:`cxrgaze.checkpoint` format) and a JSON config written by
:func:`write_config`: the ``DataConfig`` fields that shaped the training arrays, the class
names and the image size limits. The device is ``CXRGAZE_DEVICE`` (default ``auto``: CUDA
when present); the limits may be overridden where the model runs (see
:class:`cxrgaze.serving.preprocess.Limits`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

from cxrgaze.checkpoint import load_checkpoint, model_from_checkpoint
from cxrgaze.config import DataConfig, from_mapping
from cxrgaze.explain import generator_maps, trace
from cxrgaze.models import class_logits
from cxrgaze.predict import scores_from_logits, scoring_rule
from cxrgaze.runtime import resolve_device
from cxrgaze.serving.preprocess import InputError, Limits, decode_base64, preprocess

HEATMAPS: tuple[str, ...] = ("mask", "gbp", "gradcam", "none")
HEATMAP_SIZE_RANGE: tuple[int, int] = (8, 2048)
INPUT_COLUMN = "image"
CHUNK = 16
"""Images per forward pass."""
MAX_LISTED_ERRORS = 5
ARTIFACT_CHECKPOINT = "checkpoint"
ARTIFACT_CONFIG = "config"


def output_columns(classes: tuple[str, ...] | list[str]) -> list[str]:
    """``prob_<class>`` for each class, then ``scoring``, ``label`` and ``heatmap``."""
    return [f"prob_{c}" for c in classes] + ["scoring", "label", "heatmap"]


def default_heatmap(has_decoder: bool) -> str:
    """``mask`` for a U-Net, ``gbp`` for a model without decoder."""
    return "mask" if has_decoder else "gbp"


def write_config(path: Path, data_config: DataConfig, classes: tuple[str, ...], limits: Limits) -> Path:
    """The JSON config artifact: data config (as ``prepare`` used it), class names, limits."""
    path.write_text(json.dumps({"data": asdict(data_config), "classes": list(classes), "limits": asdict(limits)},
                               indent=2) + "\n")
    return path


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class CxrGazeModel(mlflow.pyfunc.PythonModel):
    """The pyfunc (see the module docstring); built by ``model_code.py``, logged by
    :func:`cxrgaze.serving.log.log_model`."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = json.loads(Path(context.artifacts[ARTIFACT_CONFIG]).read_text())
        self.data_config = from_mapping(DataConfig, config["data"], where="serving config: data")
        self.classes: tuple[str, ...] = tuple(config["classes"])
        self.limits = Limits.from_env(Limits(**config["limits"]))
        checkpoint = load_checkpoint(context.artifacts[ARTIFACT_CHECKPOINT])
        model = model_from_checkpoint(checkpoint)
        self.cls_loss = checkpoint["config"]["loss"]["cls_loss"]
        self.device = resolve_device(os.environ.get("CXRGAZE_DEVICE", "auto"))
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)  # gradients are needed for the inputs only
        self.has_decoder = self.model.has_decoder
        self._lock = threading.Lock()

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Diagnosis and heatmap for each row of ``model_input`` (see the module docstring)."""
        heatmap, size = self._options(params or {})
        images = self._decode(model_input)  # (B, S, S) float16
        probs, maps = [], []
        with self._lock:
            for start in range(0, len(images), CHUNK):
                x = torch.from_numpy(images[start:start + CHUNK]).to(self.device, torch.float32).unsqueeze(1)
                p, m = self._infer(x, heatmap)  # (b, K), (b, S, S) or None
                probs.append(p)
                maps.append(m)
        prob = np.concatenate(probs)  # (B, K)
        table = pd.DataFrame({f"prob_{c}": prob[:, k].astype(np.float64) for k, c in enumerate(self.classes)})
        table["scoring"] = scoring_rule(self.cls_loss)
        table["label"] = [self.classes[k] for k in prob.argmax(axis=1)]
        if heatmap == "none":
            table["heatmap"] = ""
        else:
            table["heatmap"] = [_png_base64(h, size) for chunk in maps for h in chunk]
        return table

    def _options(self, params: dict[str, Any]) -> tuple[str, int]:
        heatmap = params.get("heatmap") or default_heatmap(self.has_decoder)
        if heatmap not in HEATMAPS:
            raise _invalid(f"params: heatmap must be one of {', '.join(HEATMAPS)}; got {heatmap!r}")
        if heatmap == "mask" and not self.has_decoder:
            raise _invalid("params: heatmap 'mask' needs a model with a decoder and this one has none "
                           "(baseline, rrr-*); ask for gbp, gradcam or none")
        size = params.get("heatmap_size")
        size = self.data_config.image_size if size is None else size
        low, high = HEATMAP_SIZE_RANGE
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not low <= size <= high:
            raise _invalid(f"params: heatmap_size must be an integer from {low} to {high}; got {size!r}")
        return heatmap, int(size)

    def _decode(self, model_input: pd.DataFrame) -> np.ndarray:
        """All rows -> (B, S, S) float16, or one exception naming every bad row."""
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            got = ", ".join(map(str, model_input.columns)) if isinstance(model_input, pd.DataFrame) \
                else type(model_input).__name__
            raise _invalid(f"input: expected a table with a column {INPUT_COLUMN!r} (base64 image files); got {got}")
        if len(model_input) == 0:
            raise _invalid("input: empty batch (no rows)")
        images, errors = [], []
        for row, value in enumerate(model_input[INPUT_COLUMN].tolist()):
            try:
                images.append(preprocess(decode_base64(value, self.limits), self.data_config, self.limits))
            except InputError as exc:
                errors.append(f"row {row}: {exc}")
        if errors:
            listed = "; ".join(errors[:MAX_LISTED_ERRORS])
            if len(errors) > 1:
                listed += f" ({len(errors)} of {len(model_input)} rows are bad; nothing was predicted)"
            raise _invalid(listed)
        return np.stack(images)

    def _infer(self, x: torch.Tensor, heatmap: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Class scores (b, K; :mod:`cxrgaze.predict`) and heatmaps (b, S, S) in [0, 1] (None for ``none``) of
        grey images ``x`` (b, 1, S, S)."""
        from cxrgaze.explain.gradcam import gradcam  # here: pytorch_grad_cam loads cv2 and matplotlib (slow imports)

        maps: torch.Tensor | np.ndarray | None = None
        if heatmap == "gbp":
            x = x.requires_grad_(True)
            with torch.enable_grad(), trace(self.model) as tr:
                logits = class_logits(self.model, x)  # (b, K); one traced forward for both
                maps = generator_maps(self.model, x, logits.argmax(dim=1), "gbp", traced_forward=(tr, logits))[:, 0]
            logits = logits.detach()
        else:
            with torch.no_grad():
                if heatmap == "mask":
                    mask_logits, logits = self.model(x)
                    maps = torch.sigmoid(mask_logits)[:, 0]
                else:
                    logits = class_logits(self.model, x)
            if heatmap == "gradcam":
                maps = gradcam(self.model, x, logits.argmax(dim=1))
        probs = scores_from_logits(logits, self.cls_loss).cpu().numpy()
        if isinstance(maps, torch.Tensor):
            maps = maps.detach().float().cpu().numpy()
        return probs, maps


def _png_base64(heat: np.ndarray, size: int) -> str:
    """(S, S) map in [0, 1] -> base64 of an 8-bit grey ``size`` x ``size`` PNG."""
    picture = Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32))
    if picture.size != (size, size):
        picture = picture.resize((size, size), Image.Resampling.BILINEAR)
    grey = np.rint(np.clip(np.asarray(picture, dtype=np.float32), 0.0, 1.0) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
