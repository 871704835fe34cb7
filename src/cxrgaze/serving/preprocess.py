"""Bytes of one image -> the model's input, by the same code as ``prepare``.

A served image goes through exactly what a training image went through in
``cxrgaze.data.prepare``: :func:`cxrgaze.data.dicom.read_dicom` (modality LUT, VOI LUT or
window, MONOCHROME1 inversion, compressed transfer syntaxes), then :func:`to_model_grid`
(``ResizeMap`` for ``DataConfig.resize`` and the float16 rounding of ``images.npy``). The
model receives that float16 grid as float32, as in training.

PNG and JPEG are accepted too: they are already display renderings, so they are only
turned into grey [0, 1] (8-bit / 255, 16-bit / 65535, colour as BT.601 luma) and are taken
as bright = dense, like a MONOCHROME2 DICOM. Whether an image may reach the model at all
(chest radiographs only; PNG/JPEG only where configured) is decided by
:mod:`cxrgaze.serving.gate`, which the served model applies to every image.

Every problem is an :class:`InputError` with a one-line message. :class:`Limits` bounds
the payload bytes and the decoded pixels of one image; the pixel count is checked from
the header before any pixel data is decoded, so a small compressed file cannot expand
into an image that exhausts memory. A DICOM is parsed once (:func:`dicom_dataset`): the
gate, the pixel limit and the decoding (:func:`dicom_image`) all use that one dataset.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image

from cxrgaze.config import DataConfig
from cxrgaze.data.dicom import LUMA, DicomError, ResizeMap, model_grid, read_dataset, read_dicom
from cxrgaze.errors import reason

GREY_MODES = ("L", "I;16", "I;16L", "I;16B", "I")
"""Pillow modes of a grey PNG/JPEG (8-bit; 16-bit and 32-bit integer)."""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


class InputError(ValueError):
    """One image that cannot be used; ``str()`` is one line saying why."""


@dataclass(frozen=True)
class Limits:
    """Size limits on one image: payload bytes (after base64 decoding) and decoded pixels.

    The defaults admit any MIMIC-CXR film (about 3000 x 2500, 15 MB uncompressed) with room
    to spare. Override them where the model runs with the environment variables
    ``CXRGAZE_MAX_IMAGE_BYTES`` and ``CXRGAZE_MAX_IMAGE_PIXELS`` (see :meth:`from_env`).
    """

    max_bytes: int = 64 * 2**20
    max_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"limits must be positive, got {self}")

    @classmethod
    def from_env(cls, base: "Limits | None" = None) -> "Limits":
        """``base`` (default: the defaults) with the ``CXRGAZE_MAX_IMAGE_*`` variables applied."""
        base = base or cls()
        values = {"max_bytes": base.max_bytes, "max_pixels": base.max_pixels}
        for field, variable in (("max_bytes", "CXRGAZE_MAX_IMAGE_BYTES"), ("max_pixels", "CXRGAZE_MAX_IMAGE_PIXELS")):
            text = os.environ.get(variable)
            if text:
                try:
                    values[field] = int(text)
                except ValueError:
                    raise ValueError(f"{variable} must be an integer, got {text!r}") from None
        return cls(**values)


def decode_base64(text: object, limits: Limits = Limits()) -> bytes:
    """The bytes of a base64 string (standard alphabet, no line breaks), within ``limits``."""
    if not isinstance(text, str):
        raise InputError(f"expected a base64 string, got {type(text).__name__}")
    if not text:
        raise InputError("empty string (no image)")
    if len(text) // 4 * 3 > limits.max_bytes:
        raise InputError(f"payload of about {len(text) // 4 * 3} bytes is over the limit of {limits.max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        if "\n" in text or "\r" in text:
            raise InputError("not valid base64: it contains line breaks; remove line breaks "
                             "(one unwrapped base64 string per image)") from None
        raise InputError(f"not valid base64 ({exc})") from None


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: the ``DICM`` marker after the 128-byte preamble."""
    return data[128:132] == b"DICM"


def read_image(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """A DICOM (Part 10), PNG or JPEG file's bytes -> (H, W) float32 in [0, 1], bright = dense."""
    if is_dicom(data):
        return dicom_image(dicom_dataset(data, limits), limits)
    _check_bytes(data, limits)
    if data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC):
        return _read_picture(data, limits)
    raise InputError("not an image: neither a DICOM file (no 'DICM' marker at byte 128) nor a PNG or JPEG")


def dicom_dataset(data: bytes, limits: Limits = Limits()) -> pydicom.Dataset:
    """A DICOM file's bytes, within ``limits.max_bytes``, read once (pixels not decoded): the
    gate reads its header from this dataset and :func:`dicom_image` decodes it."""
    _check_bytes(data, limits)
    try:
        return read_dataset(data, name="DICOM")
    except DicomError as exc:
        raise InputError(str(exc)) from None


def dicom_image(ds: pydicom.Dataset, limits: Limits = Limits()) -> np.ndarray:
    """The (H, W) [0, 1] image of a read DICOM dataset; Rows x Columns are checked against
    ``limits.max_pixels`` before anything is decoded."""
    try:
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except Exception:  # noqa: BLE001 - a damaged value (pydicom raises many types): read_dicom names the problem
        rows = columns = 0
    _check_pixels(rows, columns, limits)
    try:
        image, _ = read_dicom(ds, name="DICOM")
    except DicomError as exc:
        raise InputError(str(exc)) from None
    return image


def to_model_grid(image: np.ndarray, config: DataConfig) -> np.ndarray:
    """(H, W) [0, 1] image -> the (S, S) float16 grid the model sees.

    The same call as ``prepare`` (:func:`cxrgaze.data.dicom.model_grid`) with the
    ``ResizeMap`` of ``config.resize`` and ``config.image_size``.
    """
    return model_grid(image, ResizeMap.create(image.shape, config.image_size, config.resize))


def preprocess(data: bytes, config: DataConfig, limits: Limits = Limits()) -> np.ndarray:
    """One image file's bytes -> (S, S) float16 model input (:func:`read_image` + :func:`to_model_grid`)."""
    return to_model_grid(read_image(data, limits), config)


def _check_pixels(height: int, width: int, limits: Limits) -> None:
    if height * width > limits.max_pixels:
        raise InputError(f"image of {width} x {height} pixels is over the limit of {limits.max_pixels} pixels")


def _check_bytes(data: bytes, limits: Limits) -> None:
    if len(data) > limits.max_bytes:
        raise InputError(f"payload of {len(data)} bytes is over the limit of {limits.max_bytes} bytes")


def _read_picture(data: bytes, limits: Limits) -> np.ndarray:
    """PNG or JPEG -> (H, W) float32 in [0, 1]."""
    kind = "PNG" if data.startswith(PNG_MAGIC) else "JPEG"
    try:
        with Image.open(io.BytesIO(data)) as picture:
            _check_pixels(picture.height, picture.width, limits)  # from the header; nothing decoded yet
            picture.load()
            if picture.mode in GREY_MODES and picture.mode != "L":  # 16-bit (and 32-bit integer) grey
                grey = np.asarray(picture, dtype=np.float32) / np.float32(65535.0)  # 16-bit grey
            elif picture.mode == "L":
                grey = np.asarray(picture, dtype=np.float32) / np.float32(255.0)
            else:
                rgb = np.asarray(picture.convert("RGB"), dtype=np.float32)  # (H, W, 3)
                grey = (rgb @ LUMA) / np.float32(255.0)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on damaged files
        raise InputError(f"cannot decode the {kind} image ({reason(exc)})") from None
    return np.ascontiguousarray(np.clip(grey, 0.0, 1.0), dtype=np.float32)
