"""The gate in front of the served model: only chest radiographs get a diagnosis.

The model was trained on frontal chest radiographs; given a CT slice, an MR, an ultrasound,
a photograph or a thumbnail it still answers, and with confidence. :func:`admit` therefore
checks each image before it is decoded for the model and refuses, with a one-line reason
naming the DICOM tag and its value, an image that is not what the model knows:

- **Modality** (0008,0060) not in :attr:`Gate.modalities` (default ``CR``, ``DX``, ``DR``:
  the projection radiograph codes; ``DR`` is no DICOM code but some systems write it), or
  absent. Compared upper-case, without surrounding spaces.
- **PresentationIntentType** (0008,0068) ``FOR PROCESSING``: raw detector data of a DX that
  is not meant to be looked at (and not what the model was trained on). ``FOR
  PRESENTATION`` and an absent tag (CR has none) pass.
- **BodyPartExamined** (0018,0015) present and not the chest: the value is split into words
  at anything that is not a letter or digit, and passes when one of the words is in
  :attr:`Gate.body_parts` (default ``CHEST``, ``THORAX``), so ``CHEST``, ``Chest``,
  ``PORT CHEST``, ``CHEST_PA`` and ``THORAX`` pass and ``HAND``, ``ABDOMEN``, ``CHESTPA``
  do not. An absent or empty tag passes with a warning (``body part unchecked``).
- **Colour**: SamplesPerPixel (0028,0002) other than 1, or PhotometricInterpretation
  (0028,0004) other than ``MONOCHROME1``/``MONOCHROME2`` (RGB, YBR_*, PALETTE COLOR).
- **Too small**: a side (Rows (0028,0010), Columns (0028,0011); for PNG/JPEG the picture's
  width and height) under :attr:`Gate.min_side` (default 64 px: real radiographs are
  ~2000-3000 px, the synthetic demo data ~104-272 px; raise it for real data).
- **PNG/JPEG** are refused unless :attr:`Gate.allow_non_dicom`; when allowed they carry no
  modality or body part, so they pass with a warning (``not DICOM (PNG): modality and body
  part unchecked``), and must still be grey (Pillow mode ``L``, ``I;16*`` or ``I``: a colour
  or palette picture is refused, even one whose channels happen to be equal) and large
  enough.

Every refusal is a :class:`NotAdmitted` (an :class:`~cxrgaze.serving.preprocess.InputError`)
whose message starts with :data:`REFUSED` (``"refused: "``), e.g. ``refused: Modality
(0008,0060) is 'CT', not a projection radiograph (accepted: CR, DX, DR)``. The pyfunc turns
a batch whose bad rows are all refusals into a :class:`GateRefusal`: an ``MlflowException``
with ``INVALID_PARAMETER_VALUE`` (HTTP 400 from ``mlflow models serve``) and the attribute
``gate_refusal = True``, by which ``cxrgaze``'s own server answers 422 instead.

Configuration, not request params: the :class:`Gate` is written into the logged model's
config (``log_model(gate=...)``) and may be overridden where the model runs with the
environment variables ``CXRGAZE_GATE_MODALITIES`` and ``CXRGAZE_GATE_BODY_PARTS`` (comma
lists; ``*`` accepts any), ``CXRGAZE_GATE_MIN_SIDE`` (pixels) and
``CXRGAZE_GATE_ALLOW_NON_DICOM`` (``1``/``true``/``yes`` or ``0``/``false``/``no``).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass, fields

import numpy as np
import pydicom
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

from cxrgaze.data.dicom import MONOCHROME
from cxrgaze.serving.preprocess import (GREY_MODES, JPEG_MAGIC, PNG_MAGIC, InputError, Limits, dicom_dataset,
                                        dicom_image, is_dicom, read_image)

REFUSED = "refused: "
"""The start of every refusal's reason (after ``row i: `` in the pyfunc's message)."""
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


class NotAdmitted(InputError):
    """One image the gate refuses: it decodes, but it is not a chest radiograph the model may diagnose."""


class GateRefusal(MlflowException):
    """A batch refused only by the gate (every bad row is a :class:`NotAdmitted`).

    ``INVALID_PARAMETER_VALUE`` like every bad input (400 from ``mlflow models serve``);
    ``gate_refusal`` is True so that a server can answer 422 (test the attribute rather
    than the class: a model loaded with its own code copy has its own class object).
    """

    gate_refusal = True

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass(frozen=True)
class Gate:
    """Which images get a diagnosis (see the module docstring). Empty ``modalities`` or
    ``body_parts`` accept any value."""

    modalities: tuple[str, ...] = ("CR", "DX", "DR")
    body_parts: tuple[str, ...] = ("CHEST", "THORAX")
    min_side: int = 64
    allow_non_dicom: bool = False

    def __post_init__(self) -> None:  # lists (from JSON) -> upper-case tuples
        for name in ("modalities", "body_parts"):
            object.__setattr__(self, name, tuple(str(v).strip().upper() for v in getattr(self, name)))
        if isinstance(self.min_side, bool) or not isinstance(self.min_side, int) or self.min_side < 1:
            raise ValueError(f"gate min_side must be a positive integer, got {self.min_side!r}")
        if not isinstance(self.allow_non_dicom, bool):
            raise ValueError(f"gate allow_non_dicom must be true or false, got {self.allow_non_dicom!r}")

    @classmethod
    def from_env(cls, base: "Gate | None" = None) -> "Gate":
        """``base`` (default: the defaults) with the ``CXRGAZE_GATE_*`` variables applied."""
        values = {f.name: getattr(base or cls(), f.name) for f in fields(cls)}
        for name in ("modalities", "body_parts"):
            text = os.environ.get(f"CXRGAZE_GATE_{name.upper()}", "").strip()
            if text:
                values[name] = () if text == "*" else tuple(v for v in text.split(",") if v.strip())
        text = os.environ.get("CXRGAZE_GATE_MIN_SIDE", "").strip()
        if text:
            try:
                values["min_side"] = int(text)
            except ValueError:
                raise ValueError(f"CXRGAZE_GATE_MIN_SIDE must be an integer, got {text!r}") from None
        text = os.environ.get("CXRGAZE_GATE_ALLOW_NON_DICOM", "").strip().lower()
        if text:
            if text not in _TRUE + _FALSE:
                raise ValueError(f"CXRGAZE_GATE_ALLOW_NON_DICOM must be 1/true/yes or 0/false/no, got {text!r}")
            values["allow_non_dicom"] = text in _TRUE
        return cls(**values)


def admit(data: bytes, limits: Limits = Limits(), gate: Gate = Gate()) -> tuple[np.ndarray, str]:
    """:func:`~cxrgaze.serving.preprocess.read_image` behind the gate: the (H, W) image and
    its warning (``""`` when none); :class:`NotAdmitted` for a refused image, ``InputError``
    for one that cannot be read."""
    if is_dicom(data):
        try:
            ds = dicom_dataset(data, limits)  # read once: the header checks and the decoding share it
        except InputError:  # damaged (e.g. truncated pixel data): what is no chest radiograph is refused as such
            header = _header_only(data)
            if header is not None:
                _check_dicom(header, gate)
            raise
        warning, tags = _check_dicom(ds, gate), "Rows (0028,0010) x Columns (0028,0011)"
        image = dicom_image(ds, limits)
    else:
        if data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC):
            warning, tags = _check_picture(data, gate), "height x width"
        else:
            warning, tags = "", ""  # read_image names what it is not
        image = read_image(data, limits)
    height, width = image.shape
    if min(height, width) < gate.min_side:
        raise NotAdmitted(f"{REFUSED}{tags} is {height} x {width}, under the minimum side of {gate.min_side} pixels")
    return image, warning


def _check_dicom(header: pydicom.Dataset, gate: Gate) -> str:
    """Refuse from the header (nothing decoded); the warning, or ``""``. A value that cannot
    be read is left to the decoding, which names the problem."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            modality, intent, part, samples, photometric = (
                _text(header, key) for key in ("Modality", "PresentationIntentType", "BodyPartExamined",
                                               "SamplesPerPixel", "PhotometricInterpretation"))
    except Exception:  # noqa: BLE001 - the decoding reports damaged files with a proper reason
        return ""
    if gate.modalities and modality.upper() not in gate.modalities:
        shown = "absent" if not modality else f"{modality!r}, not a projection radiograph"
        raise NotAdmitted(f"{REFUSED}Modality (0008,0060) is {shown} (accepted: {', '.join(gate.modalities)})")
    if intent.upper() == "FOR PROCESSING":
        raise NotAdmitted(f"{REFUSED}PresentationIntentType (0008,0068) is {intent!r}: raw detector data "
                          "(accepted: FOR PRESENTATION)")
    if samples not in ("", "1"):
        raise NotAdmitted(f"{REFUSED}SamplesPerPixel (0028,0002) is {samples}: a colour image (accepted: 1)")
    if photometric and photometric.upper() not in MONOCHROME:
        raise NotAdmitted(f"{REFUSED}PhotometricInterpretation (0028,0004) is {photometric!r}: a colour image "
                          f"(accepted: {', '.join(MONOCHROME)})")
    if not part:
        return "BodyPartExamined (0018,0015) absent: body part unchecked" if gate.body_parts else ""
    if gate.body_parts and not set(re.split(r"[^A-Z0-9]+", part.upper())) & set(gate.body_parts):
        raise NotAdmitted(f"{REFUSED}BodyPartExamined (0018,0015) is {part!r}, not the chest "
                          f"(accepted: {', '.join(gate.body_parts)})")
    return ""


def _header_only(data: bytes) -> pydicom.Dataset | None:
    """The header of a DICOM whose whole read failed (None when that fails too)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - the caller reports the damage
        return None


def _check_picture(data: bytes, gate: Gate) -> str:
    """Refuse a PNG/JPEG unless allowed, and a colour one; the warning. Only the header is read."""
    kind = "PNG" if data.startswith(PNG_MAGIC) else "JPEG"
    if not gate.allow_non_dicom:
        raise NotAdmitted(f"{REFUSED}a {kind}, not DICOM: modality and body part cannot be checked, and this model "
                          "accepts DICOM only (configuration: CXRGAZE_GATE_ALLOW_NON_DICOM)")
    try:
        with Image.open(io.BytesIO(data)) as picture:
            mode = picture.mode
    except Exception:  # noqa: BLE001 - read_image reports damaged files with a proper reason
        return ""
    if mode not in GREY_MODES:
        raise NotAdmitted(f"{REFUSED}{kind} mode {mode!r}: a colour image (accepted: {', '.join(GREY_MODES)})")
    return f"not DICOM ({kind}): modality and body part unchecked"


def _text(header: pydicom.Dataset, key: str) -> str:
    """A tag's value as one short line (``""`` when absent or empty)."""
    value = header.get(key)
    text = "" if value is None else " ".join(str(value).split()).strip()
    return text if len(text) <= 64 else text[:61] + "..."
