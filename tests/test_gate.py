"""The gate of the served model (issue 18 item 2): only chest radiographs get a diagnosis.

Real DICOMs written with pydicom (CT, MR, US, colour, tiny, not the chest, raw detector
data...) go through a logged pyfunc loaded from an MLflow store, as a served request does.
The model is an untrained tiny U-Net: the gate decides before the network runs.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from cxrgaze import CLASSES
from cxrgaze.checkpoint import save_checkpoint
from cxrgaze.config import DataConfig, resolve_run_config
from cxrgaze.models import build_model
from cxrgaze.serving.gate import Gate, NotAdmitted, admit
from cxrgaze.serving.preprocess import InputError

from data_factory import dicom_dataset, phantom

pytestmark = pytest.mark.timeout(180)

CT = "refused: Modality (0008,0060) is 'CT', not a projection radiograph (accepted: CR, DX, DR)"


def dicom(height: int = 80, width: int = 72, drop: tuple[str, ...] = (), **tags) -> bytes:
    """A 12-bit grey single-frame DICOM, DX chest unless ``tags`` say otherwise; ``drop`` deletes tags."""
    ds = dicom_dataset(phantom(height, width), **{"BodyPartExamined": "CHEST", **tags})
    for key in drop:
        delattr(ds, key)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def rgb_dicom() -> bytes:
    """A chest DX in every respect but colour: 8-bit RGB, three samples per pixel."""
    ds = dicom_dataset(phantom(80, 72), BodyPartExamined="CHEST")
    rgb = np.zeros((80, 72, 3), np.uint8)
    rgb[..., 0] = 200
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = rgb.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def picture(array: np.ndarray, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=kind)
    return buffer.getvalue()


def grey_png(height: int = 80, width: int = 72) -> bytes:
    return picture((phantom(height, width) >> 4).astype(np.uint8))


def frame(*payloads: bytes) -> pd.DataFrame:
    return pd.DataFrame({"image": [base64.b64encode(p).decode("ascii") for p in payloads]})


@pytest.fixture(scope="module")
def logged(tmp_path_factory, _migrated_mlflow_db):
    """An untrained tiny U-Net, logged with ``log_model`` into a temporary SQLite store; its URI."""
    from cxrgaze.serving.log import log_model

    root = tmp_path_factory.mktemp("gate")
    config = resolve_run_config({"train": {"epochs": 1, "device": "cpu"},
                                 "model": {"encoder": "tu-tinynet_e", "decoder_channels": [32, 16, 16, 8, 8]}}, "unet")
    model = build_model(config.model, variant="unet")
    save_checkpoint({"model": model.state_dict(), "config": config.as_dict(), "epoch": 0, "metrics": {}},
                    root / "best.pt")
    shutil.copyfile(_migrated_mlflow_db, root / "mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("gate-test", artifact_location=str(root / "artifacts"))
        with mlflow.start_run(experiment_id=experiment):
            info = log_model(root / "best.pt", DataConfig(image_size=32))
        yield info.model_uri
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def pyfunc(logged):
    return mlflow.pyfunc.load_model(logged)


def refusal(pyfunc, table: pd.DataFrame) -> MlflowException:
    with pytest.raises(MlflowException) as caught:
        pyfunc.predict(table, params={"heatmap": "none"})
    assert "\n" not in caught.value.message and caught.value.get_http_status_code() == 400
    return caught.value


REFUSED = {
    "CT": (dict(Modality="CT"), CT),
    "MR": (dict(Modality="MR"), "refused: Modality (0008,0060) is 'MR', not a projection radiograph"),
    "US": (dict(Modality="US"), "refused: Modality (0008,0060) is 'US', not a projection radiograph"),
    "no modality": (dict(drop=("Modality",)), "refused: Modality (0008,0060) is absent (accepted: CR, DX, DR)"),
    "hand": (dict(Modality="CR", BodyPartExamined="HAND"),
             "refused: BodyPartExamined (0018,0015) is 'HAND', not the chest (accepted: CHEST, THORAX)"),
    "raw detector data": (dict(PresentationIntentType="FOR PROCESSING"),
                          "refused: PresentationIntentType (0008,0068) is 'FOR PROCESSING': raw detector data"),
    "palette": (dict(PhotometricInterpretation="PALETTE COLOR"),
                "refused: PhotometricInterpretation (0028,0004) is 'PALETTE COLOR': a colour image "
                "(accepted: MONOCHROME1, MONOCHROME2)"),
    "3 x 3": (dict(height=3, width=3),
              "refused: Rows (0028,0010) x Columns (0028,0011) is 3 x 3, under the minimum side of 64 pixels"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_dicoms_that_are_not_chest_radiographs_are_refused_naming_the_tag(pyfunc, case):
    tags, reason = REFUSED[case]
    error = refusal(pyfunc, frame(dicom(), dicom(**tags)))
    assert error.message == f"row 1: {reason}" or error.message.startswith(f"row 1: {reason}")
    assert error.error_code == "INVALID_PARAMETER_VALUE" and getattr(error, "gate_refusal", False) is True


def test_a_colour_dicom_is_refused(pyfunc):
    error = refusal(pyfunc, frame(rgb_dicom()))
    assert error.message == "row 0: refused: SamplesPerPixel (0028,0002) is 3: a colour image (accepted: 1)"
    assert error.gate_refusal is True


@pytest.mark.parametrize("tags, warning", [
    (dict(Modality="CR"), ""),
    (dict(Modality="DX", PresentationIntentType="FOR PRESENTATION"), ""),
    (dict(Modality="DR", BodyPartExamined="PORT CHEST"), ""),
    (dict(Modality="CR", BodyPartExamined="thorax"), ""),
    (dict(BodyPartExamined="CHEST_PA"), ""),
    (dict(drop=("BodyPartExamined",)), "BodyPartExamined (0018,0015) absent: body part unchecked"),
])
def test_chest_radiographs_get_a_diagnosis_and_their_warnings(pyfunc, tags, warning):
    out = pyfunc.predict(frame(dicom(**tags)), params={"heatmap": "none"})
    assert list(out.columns) == [f"prob_{c}" for c in CLASSES] + ["scoring", "label", "heatmap", "warnings"]
    assert out["label"][0] in CLASSES and out["warnings"][0] == warning
    assert refusal(pyfunc, frame(dicom(**tags), dicom(Modality="CT"))).message == f"row 1: {CT}"  # only the CT


@pytest.mark.parametrize("payload, kind", [(grey_png(), "PNG"), (picture(np.full((80, 72), 90, np.uint8), "JPEG"), "JPEG")])
def test_png_and_jpeg_are_refused_by_default(pyfunc, payload, kind):
    error = refusal(pyfunc, frame(payload))
    assert error.message == (f"row 0: refused: a {kind}, not DICOM: modality and body part cannot be checked, and "
                             "this model accepts DICOM only (configuration: CXRGAZE_GATE_ALLOW_NON_DICOM)")
    assert error.gate_refusal is True


def test_configuration_admits_png_with_a_warning_but_not_colour_or_tiny(logged, monkeypatch):
    monkeypatch.setenv("CXRGAZE_GATE_ALLOW_NON_DICOM", "yes")
    allowing = mlflow.pyfunc.load_model(logged)
    out = allowing.predict(frame(grey_png(), dicom()), params={"heatmap": "none"})
    assert list(out["warnings"]) == ["not DICOM (PNG): modality and body part unchecked", ""]
    colour = np.zeros((80, 72, 3), np.uint8)
    assert refusal(allowing, frame(picture(colour))).message == \
        "row 0: refused: PNG mode 'RGB': a colour image (accepted: L, I;16, I;16L, I;16B, I)"
    assert refusal(allowing, frame(grey_png(3, 3))).message == \
        "row 0: refused: height x width is 3 x 3, under the minimum side of 64 pixels"


def test_a_batch_with_other_bad_rows_is_a_plain_400_listing_all(pyfunc):
    table = frame(dicom(Modality="CT"), dicom())
    table.loc[1, "image"] = "@@"
    error = refusal(pyfunc, table)
    assert error.message.startswith(f"row 0: {CT}; row 1: not valid base64")
    assert not getattr(error, "gate_refusal", False)  # not only the gate: the server answers 400, not 422


def test_the_gate_is_logged_in_the_model_config_and_overridden_by_the_environment(logged, monkeypatch):
    local = Path(mlflow.artifacts.download_artifacts(logged))
    config = json.loads((local / "artifacts" / "serving_config.json").read_text())
    assert config["gate"] == {"modalities": ["CR", "DX", "DR"], "body_parts": ["CHEST", "THORAX"], "min_side": 64,
                              "allow_non_dicom": False}
    monkeypatch.setenv("CXRGAZE_GATE_MODALITIES", "ct, dx")
    monkeypatch.setenv("CXRGAZE_GATE_BODY_PARTS", "*")
    monkeypatch.setenv("CXRGAZE_GATE_MIN_SIDE", "2")
    gate = Gate.from_env(Gate(**config["gate"]))
    assert gate == Gate(modalities=("CT", "DX"), body_parts=(), min_side=2, allow_non_dicom=False)
    image, warning = admit(dicom(3, 3, Modality="CT", BodyPartExamined="HAND"), gate=gate)
    assert image.shape == (3, 3) and warning == ""
    with pytest.raises(NotAdmitted, match="Modality \\(0008,0060\\) is 'CR'"):
        admit(dicom(Modality="CR"), gate=gate)
    monkeypatch.setenv("CXRGAZE_GATE_MIN_SIDE", "big")
    with pytest.raises(ValueError, match="CXRGAZE_GATE_MIN_SIDE must be an integer, got 'big'"):
        Gate.from_env()


def test_a_damaged_dicom_that_is_no_chest_radiograph_is_still_refused_as_such():
    """The header is checked even when the file is too damaged to decode: a truncated CT is a CT."""
    with pytest.raises(NotAdmitted, match=r"^refused: Modality \(0008,0060\) is 'CT'"):
        admit(dicom(Modality="CT")[:-100])
    with pytest.raises(InputError, match="truncated") as caught:
        admit(dicom()[:-100])
    assert not isinstance(caught.value, NotAdmitted)


def test_a_damaged_rows_value_is_a_bad_input_not_a_crash():
    """Rows stored with a wrong VR and length: pydicom raises its own exception type on reading
    it; the served model names the file's problem (a 400), it does not fail the request (500)."""
    data = bytearray(dicom())
    at = data.index(b"\x28\x00\x10\x00US\x02\x00")  # Rows (0028,0010), US, 2 bytes
    data[at + 4:at + 6] = b"UL"
    with pytest.raises(InputError, match="^DICOM: "):
        admit(bytes(data))
