"""The PACS round trip against a real Orthanc with DICOMweb: ``cxrgaze predict --dicomweb``.

A tiny U-Net (1 epoch on the 32 px synthetic dataset) is registered as ``cxrgaze`` with the
alias ``champion`` in a temporary SQLite store; a study of synthetic chest DICOMs is
uploaded to Orthanc through its REST API; the command reads it by WADO-RS and stores an
SR and a heatmap per image by STOW-RS, which are read back from Orthanc and checked.
"""

from __future__ import annotations

import importlib.util
import io
import json
from types import SimpleNamespace

import mlflow
import numpy as np
import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from cxrgaze import CLASSES
from cxrgaze.cli import main
from cxrgaze.serving import pacs

from data_factory import dicom_dataset, phantom
from orthanc_fixture import Orthanc, orthanc  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PATIENT = {"PatientID": "PACS-TEST-1", "PatientName": "Test^Pacs", "PatientBirthDate": "19600101", "PatientSex": "O"}


def chest(study: str, series: str, number: int, seed: int, **tags) -> bytes:
    """A synthetic 12-bit DX chest image of the test patient, as a DICOM file."""
    ds = dicom_dataset(phantom(96, 80, seed=seed), StudyInstanceUID=study, SeriesInstanceUID=series,
                       StudyID="1", StudyDate="20240102", StudyTime="101500", AccessionNumber="ACC1",
                       ReferringPhysicianName="", SeriesNumber=1, InstanceNumber=number,
                       PatientOrientation=["L", "F"], **PATIENT, **tags)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def registry(tiny_prepared, tmp_path_factory):
    """A tiny U-Net registered as ``cxrgaze`` v1, alias ``champion`` (the process's tracking URI for the module)."""
    from cxrgaze.config import DataConfig, from_mapping, resolve_run_config
    from cxrgaze.serving.log import log_model
    from cxrgaze.train import train

    prepared, split = tiny_prepared
    root = tmp_path_factory.mktemp("pacs")
    config = resolve_run_config({"train": {"epochs": 1, "batch_size": 16, "device": "cpu"},
                                 "model": {"encoder": "tu-tinynet_e", "decoder_channels": [32, 16, 16, 8, 8]}}, "unet")
    result = train(config, prepared, split, root / "train", progress=False)
    data_config = from_mapping(DataConfig, json.loads((prepared / "meta.json").read_text())["config"])
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("pacs-test", artifact_location=str(root / "artifacts"))
        with mlflow.start_run(experiment_id=experiment):
            info = log_model(result.best_checkpoint, data_config)
        version = mlflow.register_model(info.model_uri, "cxrgaze").version
        mlflow.MlflowClient().set_registered_model_alias("cxrgaze", "champion", version)
        yield SimpleNamespace(version=str(version), model_uri=info.model_uri)
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture
def study(orthanc: Orthanc):
    """A new study of two images in one series (plus an unrelated study), uploaded to Orthanc;
    the first image says it is the chest, the second does not (the gate warns)."""
    uid, series = generate_uid(), generate_uid()
    files = [chest(uid, series, 1, seed=1, BodyPartExamined="CHEST"), chest(uid, series, 2, seed=2)]
    for data in files:
        orthanc.upload(data)
    orthanc.upload(chest(generate_uid(), generate_uid(), 1, seed=9))
    sources = [pydicom.dcmread(io.BytesIO(data)) for data in files]
    return SimpleNamespace(uid=uid, series=series, sources=sources)


def stored(orthanc: Orthanc, study_uid: str) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(io.BytesIO(orthanc.file(i))) for i in orthanc.instances_of(study_uid)]


def sr_items(sr: pydicom.Dataset) -> dict[str, object]:
    """Concept meaning -> value (text, number or referenced SOP Instance UID) of the SR's root items."""
    items = {}
    for item in sr.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "TEXT":
            items[name] = item.TextValue
        elif item.ValueType == "NUM":
            items[name] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "IMAGE":
            items[name] = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    return items


def test_round_trip_stores_a_report_and_a_heatmap_per_image(orthanc, registry, study, capsys):
    code = main(["predict", "--dicomweb", orthanc.dicomweb, "--study", study.uid])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [json.loads(line) for line in captured.out.splitlines()]
    source_uids = {str(ds.SOPInstanceUID) for ds in study.sources}
    if "warnings" in lines[0]:  # a model with the X-ray gate: the image without BodyPartExamined has a note
        assert [bool(line["warnings"]) for line in lines] == [False, True]
    assert {line["instance"] for line in lines} == source_uids

    new = [ds for ds in stored(orthanc, study.uid) if str(ds.SOPInstanceUID) not in source_uids]
    srs = {str(ds.SOPInstanceUID): ds for ds in new if ds.Modality == "SR"}
    scs = {str(ds.SOPInstanceUID): ds for ds in new if ds.Modality != "SR"}
    assert len(srs) == len(scs) == 2 and len(new) == 4
    for ds in new:  # the source's patient and study; new series
        assert (ds.StudyInstanceUID, ds.PatientID, ds.PatientName) == (study.uid, PATIENT["PatientID"],
                                                                       PATIENT["PatientName"])
        assert ds.SeriesInstanceUID != study.series and ds.Manufacturer == "cxrgaze"
    assert len({ds.SeriesInstanceUID for ds in srs.values()}) == len({ds.SeriesInstanceUID for ds in scs.values()}) == 1
    assert next(iter(srs.values())).SeriesInstanceUID != next(iter(scs.values())).SeriesInstanceUID

    for line in lines:
        sr, sc = srs[line["sr_instance"]], scs[line["heatmap_instance"]]
        assert sr.SOPClassUID == pydicom.uid.ComprehensiveSRStorage and sr.SeriesDescription == "cxrgaze AI result"
        items = sr_items(sr)
        assert items["Algorithm Name"] == "cxrgaze" and items["Algorithm Version"] == registry.version
        assert items["Scoring rule"] == line["scoring"] == "sigmoid"
        assert items["Finding"] == line["label"] == max(CLASSES, key=lambda c: line[f"prob_{c}"])
        for c in CLASSES:
            assert items[f"Probability of {c}"] == pytest.approx(line[f"prob_{c}"], abs=1e-6)
        assert items["Source of Measurement"] == line["instance"] and items["Heatmap"] == line["heatmap_instance"]
        assert items.get("Warnings") == (line.get("warnings") or None)  # the gate's note, where the model has one
        evidence = {ref.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                    for series in s.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
        assert evidence == {line["instance"], line["heatmap_instance"]}

        assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == line["instance"]
        source = next(ds for ds in study.sources if ds.SOPInstanceUID == line["instance"])
        picture = sc.pixel_array
        assert sc.PhotometricInterpretation == "RGB" and picture.shape == (source.Rows, source.Columns, 3)
        assert picture.dtype == np.uint8 and picture.std() > 0


def test_series_and_instance_select_one_image_and_skip_earlier_results(orthanc, registry, study, capsys):
    assert main(["predict", "--dicomweb", orthanc.dicomweb, "--study", study.uid, "--heatmap", "none"]) == 0
    capsys.readouterr()
    before = len(orthanc.instances_of(study.uid))
    target = study.sources[1]
    code = main(["predict", "--dicomweb", orthanc.dicomweb, "--study", study.uid, "--series", study.series,
                 "--instance", str(target.SOPInstanceUID), "--model", "models:/cxrgaze/1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and [line["instance"] for line in lines] == [target.SOPInstanceUID]
    assert len(orthanc.instances_of(study.uid)) == before + 2
    # the whole study again: the SRs stored above are not diagnosed (4 sources + 2 results -> 2 images)
    assert main(["predict", "--dicomweb", orthanc.dicomweb, "--study", study.uid, "--heatmap", "none"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_images_the_gate_refuses_get_no_objects_and_the_others_are_stored(orthanc, registry, study, capsys):
    if importlib.util.find_spec("cxrgaze.serving.gate") is None:
        pytest.skip("this model has no X-ray gate (cxrgaze.serving.gate)")
    ct = pydicom.dcmread(io.BytesIO(chest(study.uid, generate_uid(), 1, seed=3, Modality="CT")))
    buffer = io.BytesIO()
    ct.save_as(buffer, enforce_file_format=True)
    orthanc.upload(buffer.getvalue())
    code = main(["predict", "--dicomweb", orthanc.dicomweb, "--study", study.uid, "--heatmap", "none"])
    captured = capsys.readouterr()
    lines = {line["instance"]: line for line in map(json.loads, captured.out.splitlines())}
    assert code == 2 and "1 of 3 images were refused" in captured.err and len(captured.err.strip().splitlines()) == 1
    refused = lines[ct.SOPInstanceUID]
    assert refused["error"].startswith("refused: Modality") and "sr_instance" not in refused
    assert all("sr_instance" in lines[str(ds.SOPInstanceUID)] for ds in study.sources)
    assert len(orthanc.instances_of(study.uid)) == 3 + 2


def test_orthanc_down_or_unknown_study_is_one_line_and_stores_nothing(orthanc, registry, study, capsys):
    from conftest import free_port

    before = len(orthanc.instances_of(study.uid))
    code = main(["predict", "--dicomweb", f"http://127.0.0.1:{free_port()}/dicom-web", "--study", study.uid])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot connect" in err, err
    code = main(["predict", "--dicomweb", orthanc.dicomweb, "--study", generate_uid()])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not found" in err, err
    assert len(orthanc.instances_of(study.uid)) == before


def test_a_store_refused_midway_says_what_was_stored(orthanc, registry, study, capsys, monkeypatch):
    """The PACS accepts the first object and refuses the second (a real Orthanc answers the first)."""
    from dicomweb_client.api import DICOMwebClient

    real, calls = DICOMwebClient.store_instances, []

    def refuse_second(self, datasets, study_instance_uid=None, additional_params=None):
        calls.append(datasets[0].SOPInstanceUID)
        if len(calls) == 2:
            response = requests.Response()
            response.status_code, response.reason = 409, "Conflict"
            raise requests.exceptions.HTTPError("409 Conflict", response=response)
        return real(self, datasets, study_instance_uid, additional_params)

    monkeypatch.setattr(DICOMwebClient, "store_instances", refuse_second)
    before = len(orthanc.instances_of(study.uid))
    code = main(["predict", "--dicomweb", orthanc.dicomweb, "--study", study.uid])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "storing object 2 of 4: HTTP 409 Conflict" in captured.err and f"stored before it: {calls[0]}" in captured.err
    assert len(orthanc.instances_of(study.uid)) == before + 1


def test_cli_refuses_mixed_or_incomplete_arguments(capsys):
    for argv in (["predict"], ["predict", "--dicomweb", "http://x"], ["predict", "--study", "1.2"],
                 ["predict", "a.dcm", "--dicomweb", "http://x", "--study", "1.2"], ["predict", "a.dcm", "--series", "1"]):
        assert main(argv) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_instance_without_series_is_refused():
    with pytest.raises(ValueError, match="--instance needs --series"):
        pacs.retrieve(pacs.connect("http://127.0.0.1:1/dicom-web"), "1.2", None, "1.2.3")
