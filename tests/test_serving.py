"""Serving tests: preprocessing equals ``prepare``, the pyfunc in process, the real server
started from a registry, and ``cxrgaze predict`` on files.

One tiny U-Net is trained (1 epoch on the 32 px synthetic dataset) and logged, registered
and aliased ``champion`` in a temporary SQLite store, once for the module.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from mlflow.exceptions import MlflowException
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML

from cxrgaze import CLASSES
from cxrgaze.cli import main
from cxrgaze.config import DataConfig, from_mapping
from cxrgaze.models import class_logits
from cxrgaze.serving.model import CxrGazeModel
from cxrgaze.serving.preprocess import InputError, Limits, decode_base64, preprocess, read_image
from cxrgaze.serving.serve import serve_command, serve_env

from conftest import VENV_BIN, free_port, tool_env
from data_factory import dicom_dataset, phantom

pytestmark = pytest.mark.timeout(180)

J2K, RLE = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"
SERVER_MAX_BYTES = 200_000
"""``CXRGAZE_MAX_IMAGE_BYTES`` of the test server: above the 32 KB test DICOMs, below :func:`big_dicom`."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def dicom_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def no_pixels_dicom() -> bytes:
    ds = dicom_dataset(phantom(16, 16))
    del ds.PixelData
    return dicom_bytes(ds)


def mpeg_dicom() -> bytes:
    """A DICOM in a transfer syntax without a decoder (MPEG-2)."""
    ds = dicom_dataset(phantom(16, 16))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    return dicom_bytes(ds)


def huge_header_dicom() -> bytes:
    """A small file whose header claims 8000 x 8000 pixels (over the default pixel limit)."""
    ds = dicom_dataset(phantom(16, 16))
    ds.Rows = ds.Columns = 8000
    return dicom_bytes(ds)


def big_dicom() -> bytes:
    """A 400 x 400 16-bit DICOM (320 KB, over :data:`SERVER_MAX_BYTES`)."""
    return dicom_bytes(dicom_dataset(phantom(400, 400)))


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dataset(tiny_prepared):
    """The tiny dataset: data config, prepared images and the DICOM bytes of each manifest row."""
    prepared, split = tiny_prepared
    manifest = pd.read_csv(prepared / "manifest.csv")
    root = prepared.parent / "data" / "mimic-cxr"
    meta = json.loads((prepared / "meta.json").read_text())
    return SimpleNamespace(
        prepared=prepared, split=split, manifest=manifest, images=np.load(prepared / "images.npy"),
        config=from_mapping(DataConfig, meta["config"]), paths=[root / p for p in manifest["path"]])


@pytest.fixture(scope="module")
def samples(dataset):
    """Paths of real DICOMs of the dataset: MONOCHROME1, JPEG 2000, RLE, uncompressed MONOCHROME2."""
    m = dataset.manifest
    picks = {
        "monochrome1": m.index[(m.photometric == "MONOCHROME1") & (m.transfer_syntax == "1.2.840.10008.1.2.1")][0],
        "jpeg2000": m.index[m.transfer_syntax == J2K][0],
        "rle": m.index[m.transfer_syntax == RLE][0],
        "monochrome2": m.index[(m.photometric == "MONOCHROME2") & (m.transfer_syntax == "1.2.840.10008.1.2.1")][0],
    }
    return {kind: dataset.paths[i] for kind, i in picks.items()}


@pytest.fixture(scope="module")
def registry(dataset, samples, tmp_path_factory):
    """A tiny trained U-Net logged, registered as ``cxrgaze`` and aliased ``champion`` in a
    temporary SQLite store (the process's tracking URI for the module)."""
    from cxrgaze.config import resolve_run_config
    from cxrgaze.serving.log import log_model
    from cxrgaze.train import train

    root = tmp_path_factory.mktemp("serving")
    config = resolve_run_config({"train": {"epochs": 1, "batch_size": 16, "device": "cpu"},
                                 "model": {"encoder": "tu-tinynet_e", "decoder_channels": [32, 16, 16, 8, 8]}}, "unet")
    result = train(config, dataset.prepared, dataset.split, root / "train", progress=False)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("serving-test", artifact_location=str(root / "artifacts"))
        with mlflow.start_run(experiment_id=experiment):
            info = log_model(result.best_checkpoint, dataset.config, samples["monochrome1"].read_bytes())
        version = mlflow.register_model(info.model_uri, "cxrgaze").version
        mlflow.MlflowClient().set_registered_model_alias("cxrgaze", "champion", version)
        yield SimpleNamespace(tracking_uri=uri, model_uri=info.model_uri, root=root)
    finally:
        mlflow.set_tracking_uri(None)  # back to following MLFLOW_TRACKING_URI / the default


@pytest.fixture(scope="module")
def pyfunc(registry):
    return mlflow.pyfunc.load_model("models:/cxrgaze@champion")


def frame(*payloads: bytes | str) -> pd.DataFrame:
    return pd.DataFrame({"image": [p if isinstance(p, str) else b64(p) for p in payloads]})


# --- preprocessing ----------------------------------------------------------------------
def test_preprocess_equals_prepare_for_every_dicom(dataset):
    """Every prepared image, from its DICOM's bytes through the serving code: bit-identical."""
    kinds = set(zip(dataset.manifest.photometric, dataset.manifest.transfer_syntax))
    assert {("MONOCHROME1", J2K), ("MONOCHROME1", RLE), ("MONOCHROME2", J2K)} <= kinds
    for i, path in enumerate(dataset.paths):
        served = preprocess(path.read_bytes(), dataset.config)
        assert served.dtype == np.float16 and served.shape == dataset.images[i].shape
        np.testing.assert_array_equal(served, dataset.images[i], err_msg=str(path))


def test_png_and_jpeg_become_grey_unit_range():
    grey8 = (np.arange(40 * 30) % 256).astype(np.uint8).reshape(40, 30)
    np.testing.assert_allclose(read_image(png_bytes(grey8)), grey8 / 255.0, atol=1e-6)
    grey16 = (np.arange(40 * 30) * 50).astype(np.uint16).reshape(40, 30)
    np.testing.assert_allclose(read_image(png_bytes(grey16)), grey16 / 65535.0, atol=1e-6)
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[..., 1] = 255
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    np.testing.assert_allclose(read_image(buffer.getvalue()), 0.587, atol=0.02)  # BT.601 luma of green


@pytest.mark.parametrize("make, limits, message", [
    (lambda: "%%%", Limits(), "not valid base64"),
    (lambda: b64(b"x" * 2000), Limits(max_bytes=1000), "over the limit of 1000 bytes"),
    (lambda: b64(png_bytes(np.zeros((100, 100), np.uint8))), Limits(max_pixels=5000), "100 x 100 pixels is over"),
    (lambda: b64(huge_header_dicom()), Limits(), "8000 x 8000 pixels is over the limit"),
    (lambda: b64(b"GIF89a" + bytes(200)), Limits(), "not an image"),
    (lambda: b64(png_bytes(np.zeros((9, 9), np.uint8))[:40]), Limits(), "cannot decode the PNG"),
])
def test_bad_images_give_one_line_reasons(make, limits, message):
    with pytest.raises(InputError, match=message) as caught:
        read_image(decode_base64(make(), limits), limits)
    assert "\n" not in str(caught.value)


# --- the pyfunc in process ----------------------------------------------------------------
@pytest.mark.parametrize("heatmap", ["mask", "gbp", "gradcam", "none"])
def test_pyfunc_outputs(pyfunc, samples, heatmap):
    files = [p.read_bytes() for p in samples.values()]
    out = pyfunc.predict(frame(*files), params={"heatmap": heatmap, "heatmap_size": 48})
    assert list(out.columns) == [f"prob_{c}" for c in CLASSES] + ["scoring", "label", "heatmap", "warnings"]
    assert set(out["warnings"]) == {""}  # synthetic DX chest DICOMs: nothing left unchecked by the gate
    assert len(out) == len(files)
    probs = out[[f"prob_{c}" for c in CLASSES]].to_numpy()
    # The model was trained with per-class BCE: its scores are per-class sigmoids of the logits.
    assert set(out["scoring"]) == {"sigmoid"}
    served = pyfunc.unwrap_python_model()
    x = torch.from_numpy(served._decode(frame(*files))[0]).float().unsqueeze(1)
    with torch.no_grad():
        logits = class_logits(served.model, x)
    np.testing.assert_allclose(probs, torch.sigmoid(logits).numpy(), atol=1e-6)
    assert set(out["label"]) <= set(CLASSES)
    assert list(out["label"]) == [CLASSES[k] for k in probs.argmax(axis=1)]
    for encoded in out["heatmap"]:
        if heatmap == "none":
            assert encoded == ""
            continue
        picture = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert picture.format == "PNG" and picture.size == (48, 48) and picture.mode == "L"


def test_pyfunc_defaults_to_mask_at_the_model_size(pyfunc, samples, dataset):
    out = pyfunc.predict(frame(samples["rle"].read_bytes()))
    assert Image.open(io.BytesIO(base64.b64decode(out["heatmap"][0]))).size == (dataset.config.image_size,) * 2
    mask = pyfunc.predict(frame(samples["rle"].read_bytes()), params={"heatmap": "mask"})
    assert mask["heatmap"][0] == out["heatmap"][0]


BAD_ROWS = {
    "not base64": ("definitely not base64!", "row 1: not valid base64"),
    "not an image": (b"hello, this is text" * 20, "row 1: not an image"),
    "no pixels": (no_pixels_dicom(), "row 1: DICOM: no pixel data"),
    "unsupported syntax": (mpeg_dicom(), "row 1: DICOM: no decoder for transfer syntax MPEG2"),
    "over the pixel limit": (huge_header_dicom(), "row 1: image of 8000 x 8000 pixels is over the limit"),
    "not a string": (None, "row 1: expected a base64 string"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_pyfunc_refuses_a_batch_with_a_bad_row_naming_it(pyfunc, samples, case):
    payload, message = BAD_ROWS[case]
    good = b64(samples["jpeg2000"].read_bytes())
    table = pd.DataFrame({"image": [good, payload if isinstance(payload, str) or payload is None else b64(payload)]})
    with pytest.raises(MlflowException, match=message) as caught:
        pyfunc.predict(table)
    assert caught.value.get_http_status_code() == 400


def test_every_bad_row_is_listed(pyfunc, samples):
    good = b64(samples["rle"].read_bytes())
    with pytest.raises(MlflowException) as caught:
        pyfunc.predict(frame(good, "@@", good, "##"))
    assert "row 1: not valid base64" in caught.value.message and "row 3: not valid base64" in caught.value.message
    assert "2 of 4 rows are bad; nothing was predicted" in caught.value.message


@pytest.mark.parametrize("table, params, message", [
    (pd.DataFrame({"image": []}, dtype=object), None, "empty batch"),
    (pd.DataFrame({"picture": ["abc"]}), None, "missing inputs \\['image'\\]"),
    (None, {"heatmap": "saliency"}, "heatmap must be one of mask, gbp, gradcam, none"),
    (None, {"heatmap_size": 4}, "heatmap_size must be an integer from 8 to 2048"),
])
def test_pyfunc_refuses_bad_tables_and_params(pyfunc, samples, table, params, message):
    table = frame(samples["rle"].read_bytes()) if table is None else table
    with pytest.raises(MlflowException, match=message) as caught:
        pyfunc.predict(table, params=params)
    assert caught.value.get_http_status_code() == 400


def test_a_model_without_decoder_refuses_mask():
    model = CxrGazeModel()
    model.has_decoder, model.data_config = False, DataConfig(image_size=32)
    with pytest.raises(MlflowException, match="heatmap 'mask' needs a model with a decoder"):
        model.predict(None, frame("AAAA"), params={"heatmap": "mask"})


def test_logged_model_carries_code_config_signature_and_example(registry, pyfunc):
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(registry.model_uri))
    assert (local / "code" / "cxrgaze" / "serving" / "preprocess.py").is_file()
    config = json.loads((local / "artifacts" / "serving_config.json").read_text())
    assert config["classes"] == list(CLASSES) and config["data"]["image_size"] == 32
    requirements = (local / "requirements.txt").read_text().split()
    assert "mlflow==3.17.2" in requirements and all("==" in r for r in requirements)
    model = Model.load(local)
    assert model.signature.inputs.input_names() == ["image"]
    assert {p.name: p.default for p in model.signature.params.params} == {"heatmap": "mask", "heatmap_size": 32}
    example = json.loads((local / "input_example.json").read_text())
    assert read_image(base64.b64decode(example["data"][0][0])).ndim == 2  # a real DICOM


# --- the real server ------------------------------------------------------------------------
@contextmanager
def started(command: list[str], env: dict[str, str], log_path, url: str, cwd=None):
    """A server process (its own process group) once ``url``/ping answers; stopped with its group."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 150
            while True:
                try:
                    if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"server did not start (exit {proc.poll()}):\n{log_path.read_text()[-3000:]}")
                time.sleep(0.25)
            yield proc
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def server(registry):
    """``cxrgaze serve`` on a free loopback port, from the registry; stopped afterwards."""
    port = free_port()
    env = {**tool_env(), "MLFLOW_TRACKING_URI": registry.tracking_uri, "CXRGAZE_MAX_IMAGE_BYTES": str(SERVER_MAX_BYTES)}
    url = f"http://127.0.0.1:{port}"
    with started([str(VENV_BIN / "cxrgaze"), "serve", "--port", str(port)], env, registry.root / "server.log", url,
                 cwd=registry.root):
        yield url


def invoke(url: str, body: dict | str) -> requests.Response:
    if isinstance(body, str):
        return requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    return requests.post(f"{url}/invocations", json=body, timeout=60)


def test_server_diagnoses_real_dicoms(server, pyfunc, samples):
    files = [p.read_bytes() for p in samples.values()]  # PNG is refused by the default gate (test_gate.py)
    body = {"dataframe_split": {"columns": ["image"], "data": [[b64(f)] for f in files]},
            "params": {"heatmap": "gbp", "heatmap_size": 24}}
    answer = invoke(server, body)
    assert answer.status_code == 200, answer.text[:2000]
    rows = pd.DataFrame(answer.json()["predictions"])
    local = pyfunc.predict(frame(*files), params={"heatmap": "gbp", "heatmap_size": 24})
    columns = [f"prob_{c}" for c in CLASSES]
    np.testing.assert_allclose(rows[columns].to_numpy(), local[columns].to_numpy(), atol=1e-6)
    assert list(rows["label"]) == list(local["label"])
    assert all(Image.open(io.BytesIO(base64.b64decode(h))).size == (24, 24) for h in rows["heatmap"])
    records = invoke(server, {"dataframe_records": [{"image": b64(files[0])}]})  # the default heatmap: mask
    assert records.status_code == 200 and records.json()["predictions"][0]["heatmap"]


@pytest.mark.parametrize("body, message", [
    ({"dataframe_records": [{"image": "AAAA"}, {"image": "not base64!"}]}, "row 1: not valid base64"),
    ({"dataframe_records": [{"image": b64(b"plain text, not a picture" * 10)}]}, "row 0: not an image"),
    ({"dataframe_records": [{"image": b64(no_pixels_dicom())}]}, "row 0: DICOM: no pixel data"),
    ({"dataframe_records": [{"image": b64(mpeg_dicom())}]}, "row 0: DICOM: no decoder for transfer syntax MPEG2"),
    ({"dataframe_records": [{"image": b64(big_dicom())}]}, f"row 0: payload of about \\d+ bytes is over the limit of {SERVER_MAX_BYTES}"),
    ({"dataframe_records": [{"image": b64(huge_header_dicom())}]}, "row 0: image of 8000 x 8000 pixels is over the limit"),
    ({"dataframe_split": {"columns": ["image"], "data": []}}, "empty batch"),
    ({"dataframe_records": [{"picture": "AAAA"}]}, "missing inputs \\['image'\\]"),
    ({"dataframe_records": [{"image": "AAAA"}], "params": {"heatmap": "saliency"}}, "heatmap must be one of"),
    ("{not json", "valid JSON"),
])
def test_server_answers_400_to_bad_payloads_and_keeps_serving(server, samples, body, message):
    answer = invoke(server, body)
    assert answer.status_code == 400, answer.text[:2000]
    assert answer.json()["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
    assert re.search(message, answer.json()["message"]), answer.json()["message"][-500:]
    assert requests.get(f"{server}/ping", timeout=5).status_code == 200
    good = invoke(server, {"dataframe_records": [{"image": b64(samples["jpeg2000"].read_bytes())}], "params": {"heatmap": "none"}})
    assert good.status_code == 200 and good.json()["predictions"][0]["label"] in CLASSES


# --- the command line ---------------------------------------------------------------------
def test_predict_cli_writes_json_lines_and_overlays(registry, samples, tmp_path, capsys):
    bad = tmp_path / "bad.dcm"
    bad.write_text("not an image")
    files = [str(p) for p in samples.values()]
    code = main(["predict", *files, str(bad), "--model", registry.model_uri, "--out", str(tmp_path / "out")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 2  # one file failed; the others were still predicted
    assert [line["file"] for line in lines] == files + [str(bad)]
    for line, path in zip(lines, samples.values()):
        assert line["label"] in CLASSES and line["scoring"] == "sigmoid"
        assert line["label"] == max(CLASSES, key=lambda c: line[f"prob_{c}"])
        with Image.open(line["overlay"]) as overlay:
            assert overlay.mode == "RGB" and overlay.size == read_image(path.read_bytes()).shape[::-1]
    assert lines[-1]["error"].startswith("not an image")


def test_overlay_cuts_the_padding_off_the_heatmap():
    """With ``pad``, a map that is hot exactly on the image region colours the whole overlay."""
    from cxrgaze.serving.predict import overlay

    heat = np.zeros((32, 32), np.float32)
    heat[:, 8:24] = 1.0  # a 40 x 20 (H x W) image lands on columns 8-23 of the padded 32 px grid
    rgb = np.asarray(overlay(np.zeros((40, 20), np.float32), heat, "pad"))
    assert rgb.shape == (40, 20, 3)
    assert (rgb[..., 0] > 60).all() and (rgb[..., 1:] < 5).all()  # jet(1) = dark red everywhere
    stretched = np.asarray(overlay(np.zeros((40, 20), np.float32), heat, "stretch"))
    assert (stretched[:, :3, 0] < 5).all()  # stretch keeps the cold borders


def test_serve_command_binds_loopback_and_finds_the_venv():
    command = serve_command()
    assert command[1:] == ["-m", "mlflow", "models", "serve", "-m", "models:/cxrgaze@champion", "--env-manager", "local",
                           "-h", "127.0.0.1", "-p", "5000"]
    assert serve_env({"PATH": "/usr/bin"})["PATH"].split(os.pathsep) == [str(VENV_BIN), "/usr/bin"]
