"""``cxrgaze predict --dicomweb URL --study UID``: a PACS round trip over DICOMweb.

1. WADO-RS: the study's images (or one series' or one instance's) are retrieved from the
   DICOMweb service at ``URL`` (e.g. Orthanc's ``http://host:8042/dicom-web``). Objects
   without pixel data (reports) and objects this command wrote earlier (manufacturer
   :data:`MANUFACTURER`) are left out.
2. Each image goes through the served model (:func:`cxrgaze.serving.predict.load_resolved`), as one
   file of ``cxrgaze predict``.
3. For each image two new DICOM objects are made, in two new series of the source study
   (its Patient and Study identifiers, new Series and SOP Instance UIDs):

   - a Secondary Capture (:data:`HEATMAP_SERIES_DESCRIPTION`): the overlay of
     ``cxrgaze predict --out`` (the image with the heatmap in the ``jet`` colour map), RGB,
     with a Source Image Sequence naming the source image; none for ``--heatmap none``;
   - a Comprehensive SR (:data:`SR_SERIES_DESCRIPTION`): one probability per class
     (``Probability of <class>``, unit ``1``), the predicted class (``Finding``), the
     model name (``Algorithm Name``), its version (``Algorithm Version``), the scoring
     rule (``sigmoid`` or ``softmax``), the model's ``warnings`` where it gives any, and
     image references to the source image and the heatmap.

4. STOW-RS: only once every image is predicted and every object is made, they are stored
   one by one. A refusal midway is one line that says which were stored.

An image the model's gate refuses (not a chest radiograph, e.g. a CT or a lateral marked
with another body part) gets no objects and an ``error`` in its JSON line; the others are
still stored (the command then exits with status 2). Any other image the model cannot
read stops the command before anything is stored.

For each image, one JSON object (printed by the CLI once everything is stored): ``study``,
``series``, ``instance`` (the source's UIDs), the model's columns but ``heatmap``
(``prob_<class>``..., ``scoring``, ``label``, ``warnings`` where the model has them),
``sr_instance`` and ``heatmap_instance`` (the SOP Instance UIDs of the stored objects), or
the source's UIDs and ``error``.

Every problem (service down, study unknown, an image the model refuses, a refused store)
is a one-line ``RuntimeError`` naming the service.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pandas as pd
import pydicom
from mlflow.exceptions import MlflowException
from PIL import Image

from cxrgaze.errors import first_line
from cxrgaze.serving.model import INPUT_COLUMN
from cxrgaze.serving.predict import load_resolved, overlay
from cxrgaze.serving.preprocess import read_image
from cxrgaze.serving.serve import DEFAULT_MODEL_URI

if TYPE_CHECKING:
    from dicomweb_client.api import DICOMwebClient
    from mlflow.pyfunc import PyFuncModel

MANUFACTURER = "cxrgaze"
SR_SERIES_DESCRIPTION = "cxrgaze AI result"
HEATMAP_SERIES_DESCRIPTION = "cxrgaze heatmap"
SR_SERIES_NUMBER = 9901
HEATMAP_SERIES_NUMBER = 9902
CODING_SCHEME = "99CXRGAZE"
"""Private coding scheme of the concepts DCM has no code for (class probabilities, scoring rule)."""
TIMEOUT_S = 60


@dataclass
class Result:
    """One source image: its identifiers, the model's row and the objects made for it."""

    source: pydicom.Dataset
    row: dict[str, Any]
    """The model's output row; ``{"error": reason}`` for an image the model's gate refused."""
    objects: list[pydicom.Dataset] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The JSON line printed for the image."""
        kinds = {SR_SERIES_DESCRIPTION: "sr_instance", HEATMAP_SERIES_DESCRIPTION: "heatmap_instance"}
        out = {"study": str(self.source.StudyInstanceUID), "series": str(self.source.SeriesInstanceUID),
               "instance": str(self.source.SOPInstanceUID)}
        out.update({k: v for k, v in self.row.items() if k != "heatmap"})
        out.update({kinds[str(o.SeriesDescription)]: str(o.SOPInstanceUID) for o in self.objects})
        return out


def model_identity(model_uri: str, info: dict[str, Any], pyfunc: "PyFuncModel") -> tuple[str, str]:
    """(name, version) of the model from :func:`~cxrgaze.serving.predict.load_resolved`'s ``info``:
    the registry's for a ``models:/`` URI; otherwise the URI and ``run <run id>`` (not registered)."""
    if info.get("version") is not None:
        return str(info["name"]), str(info["version"])
    run_id = info.get("run_id") or getattr(pyfunc.metadata, "run_id", None)
    return model_uri, f"run {run_id}" if run_id else "unregistered"


def connect(url: str) -> "DICOMwebClient":
    """A DICOMweb client of ``url`` that fails at once (no retries) when the service is down."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url.rstrip("/"), timeout=TIMEOUT_S)
    client.set_http_retry_params(retry=False)
    return client


def _service_error(url: str, what: str, exc: Exception) -> RuntimeError:
    import requests

    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        reason = "not found" if status == 404 else f"HTTP {status} {exc.response.reason}"
        return RuntimeError(f"{url}: {what}: {reason}")
    if isinstance(exc, requests.exceptions.ConnectionError):
        return RuntimeError(f"{url}: {what}: cannot connect to the DICOMweb service (is the PACS running?)")
    return RuntimeError(f"{url}: {what}: {first_line(exc, 300)}")


def retrieve(client: "DICOMwebClient", study: str, series: str | None = None,
             instance: str | None = None) -> list[pydicom.Dataset]:
    """WADO-RS: the images of a study, series or instance (see the module docstring)."""
    import requests

    if instance is not None and series is None:
        raise ValueError("--instance needs --series (WADO-RS addresses an instance by study, series and instance)")
    what = f"study {study}" + (f" series {series}" if series else "") + (f" instance {instance}" if instance else "")
    try:
        if instance is not None:
            datasets = [client.retrieve_instance(study, series, instance)]
        elif series is not None:
            datasets = client.retrieve_series(study, series)
        else:
            datasets = client.retrieve_study(study)
    except (requests.exceptions.RequestException, OSError) as exc:
        raise _service_error(client.base_url, f"retrieving {what}", exc) from None
    images = [ds for ds in datasets if "PixelData" in ds and ds.get("Manufacturer") != MANUFACTURER]
    if not images:
        raise RuntimeError(f"{client.base_url}: {what} holds no images to diagnose ({len(datasets)} objects, "
                           "none with pixel data that cxrgaze did not write)")
    return sorted(images, key=lambda ds: (str(ds.get("SeriesInstanceUID", "")), int(ds.get("InstanceNumber") or 0)))


def part10(ds: pydicom.Dataset) -> bytes:
    """The DICOM file (Part 10) bytes of a retrieved dataset."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def predict_images(pyfunc: "PyFuncModel", images: list[pydicom.Dataset], params: dict[str, Any]) -> Iterator[Result]:
    """One :class:`Result` per image. An image the model's gate refuses (not a chest
    radiograph: ``gate_refusal`` on the exception) is a result with an ``error``; any other
    image the model cannot read is a one-line ``RuntimeError`` (and nothing is stored)."""
    for ds in images:
        frame = pd.DataFrame({INPUT_COLUMN: [base64.b64encode(part10(ds)).decode("ascii")]})
        try:
            row = pyfunc.predict(frame, params=params or None).iloc[0].to_dict()
        except MlflowException as exc:
            message = exc.message.removeprefix("row 0: ")
            if getattr(exc, "gate_refusal", False):
                yield Result(ds, {"error": message})
                continue
            raise RuntimeError(f"instance {ds.SOPInstanceUID}: {message}; nothing was stored") from None
        yield Result(ds, row)


def heatmap_image(result: Result, served: Any, series_uid: str, number: int) -> pydicom.Dataset:
    """The Secondary Capture of one image's overlay (see the module docstring)."""
    from highdicom import UID
    from highdicom.sc import SCImage

    source = result.source
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.row["heatmap"]))), dtype=np.float32) / 255.0
    picture = np.asarray(overlay(read_image(part10(source), served.limits), heat, served.data_config.resize))
    sc = SCImage.from_ref_dataset(
        source, picture, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        patient_orientation=_orientation(source),
        series_instance_uid=series_uid, series_number=HEATMAP_SERIES_NUMBER, sop_instance_uid=UID(),
        instance_number=number, manufacturer=MANUFACTURER, transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian)
    sc.SeriesDescription = HEATMAP_SERIES_DESCRIPTION
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = (f"cxrgaze heatmap ({served.data_config.image_size} px model grid) "
                                "in the jet colour map over the source image")
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc


def _orientation(source: pydicom.Dataset) -> tuple[str, str]:
    """The source's Patient Orientation when it is one letter per axis, else ``L``, ``F`` (a PA chest film)."""
    given = [str(v) for v in source.get("PatientOrientation") or []]
    return (given[0], given[1]) if len(given) == 2 and all(v in {*"APLRHF"} for v in given) else ("L", "F")


def _code(value: str, meaning: str, scheme: str = "DCM") -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value, scheme, meaning)


def report(result: Result, model: tuple[str, str], series_uid: str, number: int) -> pydicom.Dataset:
    """The Comprehensive SR of one image (see the module docstring); ``result.objects`` is
    the heatmap (or nothing)."""
    from highdicom import UID
    from highdicom.sr import (ComprehensiveSR, ContainerContentItem, ImageContentItem, NumContentItem,
                              RelationshipTypeValues, TextContentItem)

    contains = RelationshipTypeValues.CONTAINS
    source, row = result.source, result.row
    items = [ImageContentItem(_code("121112", "Source of Measurement"), source.SOPClassUID, source.SOPInstanceUID,
                              relationship_type=contains),
             TextContentItem(_code("111001", "Algorithm Name"), model[0], relationship_type=contains),
             TextContentItem(_code("111003", "Algorithm Version"), model[1], relationship_type=contains),
             TextContentItem(_code("scoring", "Scoring rule", CODING_SCHEME), str(row["scoring"]),
                             relationship_type=contains),
             TextContentItem(_code("121071", "Finding"), str(row["label"]), relationship_type=contains)]
    warnings = row.get("warnings")  # the model's notes on the input, where it gives any
    if warnings is not None and len(warnings):
        text = warnings if isinstance(warnings, str) else "; ".join(map(str, warnings))
        items.append(TextContentItem(_code("warnings", "Warnings", CODING_SCHEME), text, relationship_type=contains))
    for key, value in row.items():
        if key.startswith("prob_"):
            cls = key.removeprefix("prob_")
            items.append(NumContentItem(_code(f"prob-{cls}", f"Probability of {cls}", CODING_SCHEME), float(value),
                                        _code("1", "no units", "UCUM"), relationship_type=contains))
    for heatmap in result.objects:
        items.append(ImageContentItem(_code("heatmap", "Heatmap", CODING_SCHEME), heatmap.SOPClassUID,
                                      heatmap.SOPInstanceUID, relationship_type=contains))
    root = ContainerContentItem(_code("18748-4", "Diagnostic imaging report", "LN"))
    root.ContentSequence = items
    sr = ComprehensiveSR(
        evidence=[source, *result.objects], content=root, series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER, sop_instance_uid=UID(), instance_number=number, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False)
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
    return sr


def store(client: "DICOMwebClient", study: str, objects: list[pydicom.Dataset]) -> None:
    """STOW-RS, one object at a time; a failure says which objects were stored before it."""
    import requests

    for k, ds in enumerate(objects):
        try:
            client.store_instances([ds], study_instance_uid=study)
        except (requests.exceptions.RequestException, OSError) as exc:
            stored = ", ".join(str(o.SOPInstanceUID) for o in objects[:k]) or "none"
            message = str(_service_error(client.base_url, f"storing object {k + 1} of {len(objects)}", exc))
            raise RuntimeError(f"{message}; stored before it: {stored}") from None


def predict_study(url: str, study: str, series: str | None = None, instance: str | None = None,
                  model_uri: str = DEFAULT_MODEL_URI, heatmap: str | None = None,
                  heatmap_size: int | None = None) -> list[dict[str, Any]]:
    """The round trip of the module docstring; one summary per image (as printed by the CLI)."""
    from highdicom import UID

    client = connect(url)
    images = retrieve(client, study, series, instance)
    pyfunc, info = load_resolved(model_uri)
    served = pyfunc.unwrap_python_model()
    model = model_identity(model_uri, info, pyfunc)
    params = {k: v for k, v in (("heatmap", heatmap), ("heatmap_size", heatmap_size)) if v is not None}
    results = list(predict_images(pyfunc, images, params))
    sr_series, sc_series = UID(), UID()
    objects: list[pydicom.Dataset] = []
    admitted = [result for result in results if "error" not in result.row]
    if not admitted:
        raise RuntimeError(f"{url}: the model refused every image ({len(results)}), nothing was stored: "
                           f"{results[0].row['error']}")
    for number, result in enumerate(admitted, start=1):
        if result.row.get("heatmap"):
            result.objects.append(heatmap_image(result, served, sc_series, number))
        result.objects.append(report(result, model, sr_series, number))
        objects.extend(result.objects)
    store(client, study, objects)
    return [result.summary() for result in results]
