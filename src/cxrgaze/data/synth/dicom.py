"""DICOM files of the synthetic dataset (see :mod:`cxrgaze.data.synth`).

Every file is a PA chest radiograph of the DX IOD with 12-bit stored values
(``BitsAllocated 16``, ``BitsStored 12``, unsigned), varied the way MIMIC-CXR varies:
MONOCHROME2 or MONOCHROME1 (stored inverted: the bright marker is then the lowest value),
with or without Rescale Slope/Intercept, with or without Window Center/Width (covering
the stored range), and one of four transfer syntaxes: Explicit VR Little Endian,
Implicit VR Little Endian, RLE Lossless and JPEG 2000 Lossless (``Dataset.compress``:
pylibjpeg-rle and pylibjpeg-openjpeg, named so that
the bytes do not depend on which encoders happen to be installed).

The bytes depend only on the inputs: UIDs are ``2.25.<128 bits of a SHA-256>`` of the
DICOM id (itself drawn from the seed), the implementation UID and version name are fixed,
no dates or times come from the clock.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "j2k": JPEG2000Lossless,
}
DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
IMPLEMENTATION_UID = UID("2.25.235497394335493476211342426917355396434")
IMPLEMENTATION_NAME = "CXRGAZE_SYNTH1"
RESCALES: tuple[tuple[str, str], ...] = (("1", "0"), ("1", "-1024"), ("0.5", "0"))
"""Rescale Slope/Intercept pairs used, as DS text."""
MAX_STORED = 4095


def uid(*parts: object) -> UID:
    """A stable UID under the UUID root ``2.25`` derived from ``parts``."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return UID(f"2.25.{int.from_bytes(digest[:16], 'big') or 1}")


@dataclass(frozen=True)
class Acquisition:
    """How one image is stored."""

    syntax: str  # a key of SYNTAXES
    monochrome1: bool
    rescale: tuple[str, str] | None  # (slope, intercept) as DS text
    window: bool
    low: int  # stored value of display 0 (before MONOCHROME1 inversion)
    high: int  # stored value of display 1


def stored_pixels(display: np.ndarray, acq: Acquisition) -> np.ndarray:
    """Display values in [0, 1] as 12-bit stored values (inverted for MONOCHROME1)."""
    stored = np.rint(acq.low + np.clip(display, 0.0, 1.0) * (acq.high - acq.low)).astype(np.uint16)
    return MAX_STORED - stored if acq.monochrome1 else stored


def encode(
    pixels: np.ndarray | None,
    acq: Acquisition,
    *,
    dicom_id: str,
    patient_id: str,
    study_id: str,
    sex: str,
    study_date: str,
    spacing_mm: float,
    burned_in: bool,
    shape: tuple[int, int],
) -> bytes:
    """The bytes of one DICOM file; ``pixels`` None writes a file without Pixel Data."""
    ds = Dataset()
    ds.file_meta = _file_meta(dicom_id)
    _set_study(ds, dicom_id, patient_id, study_id, sex, study_date)
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [f"{spacing_mm:.4f}", f"{spacing_mm:.4f}"]
    ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    _set_pixel_format(ds, acq, shape)
    _set_value_transforms(ds, acq)
    syntax = SYNTAXES[acq.syntax]
    if pixels is not None:
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
        if syntax.is_compressed:
            ds.compress(syntax, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    if not syntax.is_compressed:
        ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _file_meta(dicom_id: str) -> FileMetaDataset:
    """File meta information: DX for presentation, fixed implementation, Explicit VR LE until encoded."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = uid("sop", dicom_id)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_NAME
    return meta


def _set_study(ds: Dataset, dicom_id: str, patient_id: str, study_id: str, sex: str, study_date: str) -> None:
    """SOP, patient, study and series tags of a PA chest DX (UIDs derived from the ids)."""
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyDate = study_date
    ds.Modality = "DX"
    ds.PatientName = ""
    ds.PatientID = patient_id
    ds.PatientSex = sex
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyInstanceUID = uid("study", patient_id, study_id)
    ds.SeriesInstanceUID = uid("series", dicom_id)
    ds.StudyID = study_id
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1


def _set_pixel_format(ds: Dataset, acq: Acquisition, shape: tuple[int, int]) -> None:
    """Image pixel tags: one 12-bit unsigned sample per pixel, MONOCHROME1 or 2, ``shape`` (rows, columns)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if acq.monochrome1 else "MONOCHROME2"
    ds.PresentationLUTShape = "INVERSE" if acq.monochrome1 else "IDENTITY"
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"


def _set_value_transforms(ds: Dataset, acq: Acquisition) -> None:
    """Rescale Slope/Intercept and a linear VOI window covering the stored range, when ``acq`` has them."""
    slope, intercept = 1.0, 0.0
    if acq.rescale is not None:
        ds.RescaleIntercept, ds.RescaleSlope = acq.rescale[1], acq.rescale[0]
        ds.RescaleType = "US"
        slope, intercept = float(acq.rescale[0]), float(acq.rescale[1])
    if acq.window:
        lo, hi = (MAX_STORED - acq.high, MAX_STORED - acq.low) if acq.monochrome1 else (acq.low, acq.high)
        ds.WindowCenter = f"{slope * (lo + hi) / 2 + intercept:.0f}"
        ds.WindowWidth = f"{slope * (hi - lo) * 1.05:.0f}"
        ds.VOILUTFunction = "LINEAR"
