"""Decoding chest X-ray DICOMs into [0, 1] greyscale, and the original -> target pixel mapping.

``read_dicom`` follows the DICOM grayscale pipeline: stored values -> modality LUT
(Rescale Slope/Intercept or a Modality LUT Sequence) -> VOI LUT (a VOI LUT Sequence, else
Window Center/Width with its VOI LUT Function) -> presentation polarity (MONOCHROME1 is
inverted so that bright always means dense, as MONOCHROME2). Compressed transfer syntaxes
go through pydicom's pixel-data plugins (pylibjpeg with openjpeg, libjpeg and rle; pillow).

``ResizeMap`` is the one description of how an original (H, W) image lands on the square
(S, S) grid, for both ``DataConfig.resize`` modes; it resizes the image and maps gaze
points, boxes and sigmas with the same numbers, so they cannot disagree.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
"""ITU-R BT.601 weights used to turn a (rare) colour radiograph into grey."""


class DicomError(ValueError):
    """A DICOM that cannot be used; ``str()`` is one line ``<name>: <problem>``.

    ``kind`` is a short machine-readable category for counting: ``missing_file``,
    ``not_dicom``, ``truncated``, ``no_pixel_data``, ``no_transfer_syntax``, ``no_decoder``,
    ``unsupported`` or ``decode_failed``.
    """

    def __init__(self, name: str, problem: str, kind: str = "decode_failed") -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem
        self.kind = kind


@dataclass(frozen=True)
class DicomInfo:
    """What ``read_dicom`` learnt about a file besides its pixels (goes to the manifest)."""

    photometric: str
    """Photometric Interpretation as stored (MONOCHROME1 is inverted on reading)."""
    transfer_syntax: str
    """Transfer Syntax UID."""
    transfer_syntax_name: str
    original_height: int
    original_width: int
    bits_stored: int
    voi: str
    """Which VOI step produced [0, 1]: ``lut`` (VOI LUT Sequence), ``window``
    (Window Center/Width) or ``minmax`` (none present: the image's own min-max)."""


def read_dicom(source: str | Path | bytes | BinaryIO | pydicom.Dataset,
               name: str | None = None) -> tuple[np.ndarray, DicomInfo]:
    """Decode a single-frame radiograph to float32 (H, W) in [0, 1], bright = dense.

    ``source`` is a path, the file's bytes, a binary file object, or a dataset that
    :func:`read_dataset` already read (so that a caller that checks the header first reads
    the file once); ``name`` is what error messages call it (default: the path). Scaling to [0, 1]: by the VOI output range when a
    VOI LUT or window is present (values outside the window clip), otherwise by the image's
    own min and max (the reference divided by the max; min-max also removes the offset of
    12-bit data in 16-bit words). Colour images become BT.601 luma.

    Raises ``DicomError`` (one line naming the file) for a missing or non-DICOM file, a
    truncated file, no pixel data, a transfer syntax without an installed decoder, a
    multi-frame or unsupported photometric image, or a decoder failure.
    """
    if name is None:
        name = str(source) if isinstance(source, (str, Path)) else "<bytes>"
    ds = source if isinstance(source, pydicom.Dataset) else read_dataset(source, name)
    return _pixels(ds, name)


def read_dataset(source: str | Path | bytes | BinaryIO, name: str) -> pydicom.Dataset:
    """``dcmread`` of the whole file, pixels not decoded, with pydicom's silent truncation
    handling turned into ``DicomError``."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)) and not os.path.isfile(source):
        raise DicomError(name, "missing file", "missing_file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(source)
        except InvalidDicomError:
            raise DicomError(name, "not a DICOM file (no 'DICM' file meta header)", "not_dicom") from None
        except (EOFError, struct.error):
            raise DicomError(name, "truncated DICOM (file ends inside the header)", "truncated") from None
        except OSError as exc:
            raise DicomError(name, f"unreadable file ({exc.strerror or exc})", "unreadable") from None
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged files
            raise DicomError(name, f"unreadable DICOM ({_first_line(exc)})", "unreadable") from None
    if any("end of file" in str(w.message).lower() for w in caught):
        raise DicomError(name, "truncated DICOM (file ends inside an element, e.g. compressed pixel data)", "truncated")
    short = _short_last_element(ds)
    if short == "PixelData":
        raise DicomError(name, "truncated DICOM (pixel data shorter than expected)", "truncated")
    if short:
        raise DicomError(name, "truncated DICOM (file ends inside the header)", "truncated")
    return ds


def _short_last_element(ds: pydicom.Dataset) -> str | None:
    """The keyword of the last element when the file ended inside its value (pydicom reads
    such files without complaint), ``"(empty)"`` when nothing follows the file meta."""
    tags = list(ds.keys())
    if not tags:
        return "(empty)"
    raw = ds.get_item(tags[-1])
    length = getattr(raw, "length", None)
    value = getattr(raw, "value", None)
    if isinstance(value, bytes) and length is not None and length != 0xFFFFFFFF and len(value) < length:
        return pydicom.datadict.keyword_for_tag(tags[-1]) or str(tags[-1])
    return None


def _pixels(ds: pydicom.Dataset, name: str) -> tuple[np.ndarray, DicomInfo]:
    """Decode the pixel data of a read dataset and run the grayscale pipeline."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomError(name, "no pixel data", "no_pixel_data")
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is None:
        raise DicomError(name, "no Transfer Syntax UID in the file meta", "no_transfer_syntax")
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise DicomError(name, f"no decoder for transfer syntax {tsyntax.name} ({tsyntax})", "no_decoder") from None
    if not decoder.is_available:
        missing = "; ".join(f"{k}: {', '.join(v)}" for k, v in decoder.missing_dependencies.items()) \
            if isinstance(decoder.missing_dependencies, dict) else str(decoder.missing_dependencies)
        raise DicomError(name, f"no installed decoder for transfer syntax {tsyntax.name} ({tsyntax}); {missing}",
                         "no_decoder")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(name, f"multi-frame DICOM ({frames} frames); a single radiograph is expected", "unsupported")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in MONOCHROME + COLOUR:
        raise DicomError(name, f"unsupported Photometric Interpretation {photometric or '(missing)'!r}", "unsupported")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = ds.pixel_array  # (H, W) or (H, W, 3)
    except ValueError as exc:
        if "less than expected" in str(exc):
            raise DicomError(name, "truncated DICOM (pixel data shorter than expected)", "truncated") from None
        raise DicomError(name, f"cannot decode pixel data ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise their own types
        raise DicomError(name, f"cannot decode pixel data ({_first_line(exc)})") from None

    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if photometric in COLOUR:
        grey = stored.astype(np.float32) @ LUMA  # (H, W)
        image, voi = np.clip(grey / float(2**bits - 1), 0.0, 1.0), "minmax"
    else:
        image, voi = _grayscale(stored, ds)
        if photometric == "MONOCHROME1":
            image = 1.0 - image
    info = DicomInfo(
        photometric=photometric,
        transfer_syntax=str(tsyntax),
        transfer_syntax_name=tsyntax.name,
        original_height=int(image.shape[0]),
        original_width=int(image.shape[1]),
        bits_stored=bits,
        voi=voi,
    )
    return np.ascontiguousarray(image, dtype=np.float32), info


def _grayscale(stored: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, str]:
    """Modality LUT then VOI LUT/window of monochrome stored values -> (H, W) float32 in [0, 1]."""
    if ds.get("ModalityLUTSequence"):
        values = apply_modality_lut(stored, ds).astype(np.float32)
    else:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        values = stored.astype(np.float32)
        if slope != 1.0 or intercept != 0.0:
            values = values * np.float32(slope) + np.float32(intercept)

    voi_seq = ds.get("VOILUTSequence")
    if voi_seq and voi_seq[0].get("LUTDescriptor") is not None and voi_seq[0].get("LUTData") is not None:
        lut, first = _voi_table(voi_seq[0], ds)  # (entries,)
        index = np.clip(np.rint(values) - first, 0, len(lut) - 1).astype(np.int64)  # (H, W)
        return _scale(lut[index], float(lut.min()), float(lut.max())), "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        center = _first_value(ds.WindowCenter)
        width = _first_value(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if width > 0:
            return window(values, center, width, function), "window"
    return _scale(values, float(values.min()), float(values.max())), "minmax"


def _voi_table(item: pydicom.Dataset, ds: pydicom.Dataset) -> tuple[np.ndarray, int]:
    """The first VOI LUT as float32 (entries,) and its first mapped input value.

    Done here rather than with ``pydicom.pixels.apply_voi``, which (pydicom 3.0.2) indexes
    an 8-bit table through a uint8 array and so wraps inputs above 255.
    """
    entries, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
    data = item["LUTData"]
    if isinstance(data.value, bytes):  # OW: 16-bit words in the data set's byte order
        little = ds.file_meta.TransferSyntaxUID.is_little_endian
        table = np.frombuffer(data.value, dtype="<u2" if little else ">u2", count=entries)
    else:
        table = np.asarray(data.value if data.VM > 1 else [data.value])
    return table.astype(np.float32), first


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI window (PS3.3 C.11.2.1.2) with output range [0, 1], float32.

    ``function`` is the VOI LUT Function: ``LINEAR`` (default; the standard's
    ``c - 0.5``/``w - 1`` form), ``LINEAR_EXACT`` or ``SIGMOID``.
    """
    x = values.astype(np.float32, copy=False)
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        out = (x - center) / np.float32(width) + 0.5
    else:
        c, w = center - 0.5, max(width - 1.0, 1e-6)
        out = (x - c) / np.float32(w) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] to [0, 1] (all zeros for a constant image)."""
    if not high > low:
        return np.zeros(values.shape, np.float32)
    out = (values - np.float32(low)) * np.float32(1.0 / (high - low))
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _first_value(value) -> float:
    """First value of a possibly multi-valued DS element."""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0]
    return float(value)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The exception as one line (pydicom lists each plugin's failure on its own line)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class ResizeMap:
    """How an original (H, W) image lands on the square (S, S) grid.

    ``stretch`` scales each axis to S (the reference code; aspect ratio not kept).
    ``pad`` scales the long side to S (aspect kept) and centres the image on a black
    square. Coordinates follow the pixel-centre convention of the resampler: original
    pixel index ``x`` maps to ``(x + 0.5) * scale_x - 0.5 + offset_x``.

    >>> m = ResizeMap.create((3000, 2000), 300, "pad")
    >>> m.inner_shape, (m.offset_y, m.offset_x)
    ((300, 200), (0, 50))
    """

    original_shape: tuple[int, int]
    """(H, W) of the original image."""
    size: int
    mode: str
    inner_shape: tuple[int, int]
    """(h, w) of the resized image inside the square (== (S, S) when stretching)."""
    offset_y: int
    offset_x: int

    @classmethod
    def create(cls, original_shape: tuple[int, int], size: int, mode: str = "stretch") -> "ResizeMap":
        """The mapping of an (H, W) image to an (S, S) grid for ``mode`` ``stretch`` or ``pad``."""
        height, width = int(original_shape[0]), int(original_shape[1])
        if height < 1 or width < 1:
            raise ValueError(f"image shape must be positive, got {original_shape}")
        if mode == "stretch":
            return cls((height, width), size, mode, (size, size), 0, 0)
        if mode == "pad":
            scale = size / max(height, width)
            inner = (max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale))))
            return cls((height, width), size, mode, inner, (size - inner[0]) // 2, (size - inner[1]) // 2)
        raise ValueError(f"resize mode must be 'stretch' or 'pad', got {mode!r}")

    @property
    def scale_y(self) -> float:
        """Target pixels per original pixel, vertically."""
        return self.inner_shape[0] / self.original_shape[0]

    @property
    def scale_x(self) -> float:
        """Target pixels per original pixel, horizontally."""
        return self.inner_shape[1] / self.original_shape[1]

    def resize(self, image: np.ndarray) -> np.ndarray:
        """(H, W) float image -> (S, S) float32, antialiased bilinear (PIL, mode ``F``).

        PIL's resampler widens its triangle filter by the reduction factor, so a
        3000 -> 224 reduction averages every source pixel instead of aliasing; it is
        single-threaded and deterministic, keeps float32 precision, and spares the
        decoding processes a torch import. ``torch.nn.functional.interpolate(...,
        mode="bilinear", antialias=True)`` computes the same filter (tested).
        """
        if image.shape != self.original_shape:
            raise ValueError(f"image shape {image.shape} does not match the map's {self.original_shape}")
        h, w = self.inner_shape
        inner = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize((w, h), Image.Resampling.BILINEAR)
        out = np.zeros((self.size, self.size), np.float32)  # (S, S); black padding
        out[self.offset_y:self.offset_y + h, self.offset_x:self.offset_x + w] = np.asarray(inner, dtype=np.float32)
        return out

    def map_points(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Original pixel coordinates (x = column, y = row) -> target pixel coordinates."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        return (x + 0.5) * self.scale_x - 0.5 + self.offset_x, (y + 0.5) * self.scale_y - 0.5 + self.offset_y

    def map_boxes(self, x1, x2, y1, y2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Boxes given by their corner pixels (``bounding_boxes.csv`` order) -> target pixels."""
        tx1, ty1 = self.map_points(x1, y1)
        tx2, ty2 = self.map_points(x2, y2)
        return tx1, tx2, ty1, ty2

    def map_sigma(self, sigma: float) -> tuple[float, float]:
        """A Gaussian sigma in original pixels -> (sigma_y, sigma_x) in target pixels."""
        return sigma * self.scale_y, sigma * self.scale_x


def model_grid(image: np.ndarray, resize_map: ResizeMap) -> np.ndarray:
    """The array a model sees: ``image`` (H, W) in [0, 1] resized by ``resize_map`` and rounded
    to float16, exactly as stored in ``images.npy``. ``prepare`` and the served model both
    call this, so a served DICOM gets the evaluation's input bit for bit."""
    return resize_map.resize(image).astype(np.float16)  # (S, S)
