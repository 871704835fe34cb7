"""The served model: an MLflow pyfunc that takes image files and returns diagnosis and heatmap.

Input: a table with one string column ``image``, each row a base64-encoded DICOM (PNG and
JPEG only where the gate's configuration allows them; standard base64 alphabet, no line breaks: MIME-style line-wrapped
base64 is refused, ``row i: not valid base64: it contains line breaks; remove line breaks``,
rather than silently copied without them). :meth:`CxrGazeModel.predict_bytes` takes the
files' bytes instead (``cxrgaze serve``'s raw DICOM and multipart routes). Other columns are
ignored (MLflow's schema enforcement drops them). Params (optional): ``heatmap`` (``mask``, ``gbp``, ``gradcam`` or
``none``) and ``heatmap_size`` (side of the returned PNG, pixels, 8 to 2048; default the
model's input size). Output, one row per input row: ``prob_Normal``, ``prob_CHF``,
``prob_pneumonia`` (the class scores of the training objective, :mod:`cxrgaze.predict`:
sigmoid per class for a model trained with per-class BCE, so they need not sum to 1;
softmax for cross-entropy), ``scoring`` (``sigmoid`` or ``softmax``: which of the two),
``label`` (the class with the highest score), ``heatmap`` (base64 PNG, 8-bit grey,
``heatmap_size`` square, on the model's input grid; an empty string for ``none``) and
``warnings`` (what the gate could not check, e.g. ``BodyPartExamined (0018,0015) absent:
body part unchecked``; an empty string when none).

The gate (:mod:`cxrgaze.serving.gate`): only chest radiographs get a diagnosis. A DICOM that
is not a CR/DX/DR, not the chest, colour or too small, and PNG/JPEG unless the configuration
allows them, is refused with a reason naming the tag and its value, e.g. ``row 0: refused:
Modality (0008,0060) is 'CT', not a projection radiograph (accepted: CR, DX, DR)``. A batch
whose bad rows are all such refusals raises :class:`~cxrgaze.serving.gate.GateRefusal`, an
``INVALID_PARAMETER_VALUE`` like every bad input but with ``gate_refusal = True`` (cxrgaze's
own server answers it 422).

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
names, the image size limits and the gate. The device is ``CXRGAZE_DEVICE`` (default ``auto``:
CUDA when present); the limits and the gate may be overridden where the model runs (see
:class:`cxrgaze.serving.preprocess.Limits` and :class:`cxrgaze.serving.gate.Gate`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

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
from cxrgaze.serving.gate import Gate, GateRefusal, NotAdmitted, admit
from cxrgaze.serving.preprocess import InputError, Limits, decode_base64, to_model_grid

HEATMAPS: tuple[str, ...] = ("mask", "gbp", "gradcam", "none")
HEATMAP_SIZE_RANGE: tuple[int, int] = (8, 2048)
INPUT_COLUMN = "image"
CHUNK = 16
"""Images per forward pass."""
MAX_LISTED_ERRORS = 5
ARTIFACT_CHECKPOINT = "checkpoint"
ARTIFACT_CONFIG = "config"


def output_columns(classes: tuple[str, ...] | list[str]) -> list[str]:
    """``prob_<class>`` for each class, then ``scoring``, ``label``, ``heatmap`` and ``warnings``."""
    return [f"prob_{c}" for c in classes] + ["scoring", "label", "heatmap", "warnings"]


def default_heatmap(has_decoder: bool) -> str:
    """``mask`` for a U-Net, ``gbp`` for a model without decoder."""
    return "mask" if has_decoder else "gbp"


def write_config(path: Path, data_config: DataConfig, classes: tuple[str, ...], limits: Limits,
                 gate: Gate = Gate()) -> Path:
    """The JSON config artifact: data config (as ``prepare`` used it), class names, limits, gate."""
    path.write_text(json.dumps({"data": asdict(data_config), "classes": list(classes), "limits": asdict(limits),
                                "gate": asdict(gate)},
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
        self.gate = Gate.from_env(Gate(**config.get("gate", {})))
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
        heatmap, size = self.options(params or {})
        return self.predict_grids(*self._decode(model_input), heatmap, size)

    def predict_bytes(self, files: list[bytes], params: dict[str, Any] | None = None) -> pd.DataFrame:
        """:meth:`predict` of image files given as bytes (no base64, no table): the raw-body route of
        :mod:`cxrgaze.serving.server`. The same preprocessing, errors (``row i`` is ``files[i]``) and output;
        ``params`` are not filled from the signature here: a missing one takes the model's default.

        The same work in steps, for a caller that receives the files one by one (the server's
        multipart route decodes each part while the next is uploading): :meth:`options`, then
        :meth:`read_file` of each file, :meth:`batch` of their outcomes, :meth:`predict_grids`."""
        heatmap, size = self.options(params or {})
        return self.predict_grids(*self._decode_all(files, lambda data: data), heatmap, size)

    def read_file(self, data: bytes) -> tuple[np.ndarray, str]:
        """One image file's bytes -> its (S, S) float16 model input and gate warning, through the
        gate (:func:`~cxrgaze.serving.gate.admit`); ``InputError`` (``NotAdmitted`` for a refusal)
        saying why not. Holds no lock: files may be read while the model predicts."""
        image, note = admit(data, self.limits, self.gate)
        return to_model_grid(image, self.data_config), note

    def batch(self, outcomes: list[tuple[np.ndarray, str] | BaseException]) -> tuple[np.ndarray, list[str]]:
        """Each row's :meth:`read_file` result, or the exception it raised -> (B, S, S) float16 and
        the warnings, or one exception naming every bad row (the module docstring). An exception
        other than ``InputError`` is not about the input: the first is raised as it is."""
        if len(outcomes) == 0:
            raise _invalid("input: empty batch (no rows)")
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, InputError):
                raise outcome
        errors = [(row, exc) for row, exc in enumerate(outcomes) if isinstance(exc, InputError)]
        if errors:
            listed = "; ".join(f"row {row}: {exc}" for row, exc in errors[:MAX_LISTED_ERRORS])
            if len(errors) > 1:
                listed += f" ({len(errors)} of {len(outcomes)} rows are bad; nothing was predicted)"
            refused = all(isinstance(exc, NotAdmitted) for _, exc in errors)
            raise GateRefusal(listed) if refused else _invalid(listed)
        return np.stack([grid for grid, _ in outcomes]), [note for _, note in outcomes]

    def predict_grids(self, images: np.ndarray, notes: list[str], heatmap: str, size: int) -> pd.DataFrame:
        """(B, S, S) float16 model inputs and their gate warnings -> the output table, for the
        ``heatmap`` and ``size`` of :meth:`options`."""
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
        table["warnings"] = notes
        return table

    def options(self, params: dict[str, Any]) -> tuple[str, int]:
        """``(heatmap, heatmap_size)`` from the request's params, the model's defaults where absent;
        an ``INVALID_PARAMETER_VALUE`` naming a bad one."""
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

    def _decode(self, model_input: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
        """All rows -> (B, S, S) float16, or one exception naming every bad row."""
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            got = ", ".join(map(str, model_input.columns)) if isinstance(model_input, pd.DataFrame) \
                else type(model_input).__name__
            raise _invalid(f"input: expected a table with a column {INPUT_COLUMN!r} (base64 image files); got {got}")
        return self._decode_all(model_input[INPUT_COLUMN].tolist(), lambda text: decode_base64(text, self.limits))

    def _decode_all(self, values: list[Any], to_bytes: Callable[[Any], bytes]) -> tuple[np.ndarray, list[str]]:
        """Each value -> bytes (``to_bytes``) -> :meth:`read_file`, one at a time -> :meth:`batch`."""
        outcomes: list[tuple[np.ndarray, str] | InputError] = []
        for value in values:
            try:
                outcomes.append(self.read_file(to_bytes(value)))
            except InputError as exc:
                outcomes.append(exc)
        return self.batch(outcomes)

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
    Image.fromarray(grey).save(buffer, format="PNG", compress_level=1)  # 0.8 ms, not level 6's 3.7 ms; ~20 % larger
    return base64.b64encode(buffer.getvalue()).decode("ascii")
