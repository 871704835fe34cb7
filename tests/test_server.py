"""cxrgaze's own scoring server (``cxrgaze serve``, :mod:`cxrgaze.serving.server`), started for real:
raw DICOM and multipart bodies, readable errors, 415 for a missing Content-Type, the model
version in each answer; and ``mlflow models serve`` of the same registered model still
answering the JSON protocol.

The model, registry and ``cxrgaze serve`` process are :mod:`test_serving`'s fixtures.
"""

from __future__ import annotations

import base64

import pandas as pd
import pytest
import requests

from cxrgaze import CLASSES
from cxrgaze.serving.serve import serve_command, serve_env
from cxrgaze.serving.server import MultipartReader, RequestError, readable, split_multipart

from conftest import VENV_BIN, free_port, tool_env
from test_serving import (SERVER_MAX_BYTES, b64, dataset, pyfunc, registry, samples, server,  # noqa: F401
                          started)

pytestmark = pytest.mark.timeout(180)
PROBS = [f"prob_{c}" for c in CLASSES]


def post(url: str, data: bytes | str, content_type: str | None, query: str = "") -> requests.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    request = requests.Request("POST", f"{url}/invocations{query}", data=data, headers=headers).prepare()
    if content_type is None:
        request.headers.pop("Content-Type", None)
    with requests.Session() as session:
        return session.send(request, timeout=60)


def json_route(url: str, files: list[bytes], params: dict | None = None) -> requests.Response:
    body = {"dataframe_split": {"columns": ["image"], "data": [[b64(f)] for f in files]}}
    if params:
        body["params"] = params
    return requests.post(f"{url}/invocations", json=body, timeout=60)


def multipart(files: list[bytes], boundary: str = "cxrgaze-test-boundary") -> tuple[bytes, str]:
    body = b"preamble, ignored\r\n"
    for data in files:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\nepilogue, ignored".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_raw_dicom_body_gives_the_json_routes_answer_and_the_model_version(server, samples):
    dicom = samples["monochrome1"].read_bytes()
    raw = post(server, dicom, "application/dicom", "?heatmap=gbp&heatmap_size=24")
    assert raw.status_code == 200, raw.text[:2000]
    via_json = json_route(server, [dicom], {"heatmap": "gbp", "heatmap_size": 24})
    assert via_json.status_code == 200, via_json.text[:2000]
    a, b = pd.DataFrame(raw.json()["predictions"]), pd.DataFrame(via_json.json()["predictions"])
    assert len(a) == 1 and list(a.columns)[:6] == PROBS + ["scoring", "label", "heatmap"]
    pd.testing.assert_frame_equal(a, b)  # same probabilities, label, scoring and heatmap PNG
    for answer in (raw, via_json):
        assert answer.json()["model"] == {"uri": "models:/cxrgaze@champion", "name": "cxrgaze", "version": "1",
                                          "run_id": answer.json()["model"]["run_id"]}
        assert answer.json()["model"]["run_id"]


def test_multipart_related_with_two_dicoms_gives_two_predictions(server, samples):
    files = [samples["jpeg2000"].read_bytes(), samples["rle"].read_bytes()]
    body, content_type = multipart(files)
    answer = post(server, body, content_type, "?heatmap=none")
    assert answer.status_code == 200, answer.text[:2000]
    rows = pd.DataFrame(answer.json()["predictions"])
    expected = pd.DataFrame(json_route(server, files, {"heatmap": "none"}).json()["predictions"])
    assert len(rows) == 2 and set(rows["heatmap"]) == {""}
    pd.testing.assert_frame_equal(rows, expected)


def test_multipart_split_keeps_binary_parts_intact():
    from email.message import Message

    parts = [b"\r\n--not-the-boundary\r\n\x00\xff", bytes(range(256)) * 3]
    body, content_type = multipart(parts, "b0undary")
    parsed = Message()
    parsed["content-type"] = content_type
    assert split_multipart(body, parsed) == parts
    no_preamble = body[body.index(b"--b0undary"):]
    assert split_multipart(no_preamble, parsed) == parts
    no_headers = b"--b0undary\r\n\r\nfile one\r\n--b0undary\r\n\r\n\r\n\r\nfile two\r\n--b0undary--"
    assert split_multipart(no_headers, parsed) == [b"file one", b"\r\n\r\nfile two"]
    for cut in (body[:-len(b"--\r\nepilogue, ignored") - 12], b"no delimiter at all"):
        with pytest.raises(RequestError, match="no close delimiter"):
            split_multipart(cut, parsed)


@pytest.mark.parametrize("size", [1, 2, 7, 11, 4096])
def test_multipart_read_as_it_arrives_gives_the_same_parts(size):
    """The server feeds the body as uploaded; delimiters split across chunks still split the parts."""
    from email.message import Message

    parts = [b"\r\n--b0undar\r\n\x00\xff--", bytes(range(256)) * 3, b"-"]
    body, content_type = multipart(parts, "b0undary")
    parsed = Message()
    parsed["content-type"] = content_type
    for start in (0, body.index(b"--b0undary")):  # with a preamble and without
        reader, got = MultipartReader(parsed), []
        for i in range(start, len(body), size):
            got += reader.feed(body[i:i + size])
        reader.close()
        assert got == parts
    reader = MultipartReader(parsed)
    reader.feed(body[:-30])
    with pytest.raises(RequestError, match="no close delimiter"):
        reader.close()


def test_a_multipart_part_over_the_size_limit_is_refused_before_it_has_all_arrived():
    from email.message import Message

    body, content_type = multipart([b"small", b"x" * 200_000], "b0undary")
    parsed = Message()
    parsed["content-type"] = content_type
    reader = MultipartReader(parsed, max_part=1000)
    assert reader.feed(body[:10_000]) == [b"small"]  # row 1 has begun: under the limit and its header allowance
    with pytest.raises(RequestError, match=r"^row 1: payload of more than 1000 bytes is over the limit"):
        reader.feed(body[10_000:100_000])  # not yet the whole part (200 kB)


@pytest.mark.parametrize("content_type", [None, "text/plain"])
def test_missing_or_unsupported_content_type_is_415_naming_the_accepted_types(server, samples, content_type):
    answer = post(server, samples["rle"].read_bytes(), content_type)
    assert answer.status_code == 415, answer.text[:2000]
    message = answer.json()["message"]
    assert message.startswith("unsupported Content-Type: ")
    for accepted in ("application/dicom", 'multipart/related; type="application/dicom"', "application/json"):
        assert accepted in message


@pytest.mark.parametrize("send, message", [
    (lambda url, s: requests.post(f"{url}/invocations", json={"dataframe_records": [{"image": "not base64!"}]},
                                  timeout=60), "row 0: not valid base64"),
    (lambda url, s: post(url, b"plain text, not a picture" * 10, "application/dicom"), "row 0: not an image"),
    (lambda url, s: post(url, *multipart([s["rle"].read_bytes(), b"junk" * 50])), "row 1: not an image"),
    (lambda url, s: post(url, s["rle"].read_bytes(), "application/dicom", "?heatmap=saliency"),
     "params: heatmap must be one of"),
    (lambda url, s: post(url, s["rle"].read_bytes(), "application/dicom", "?colour=red"),
     "params: unknown query parameter(s) colour"),
    (lambda url, s: post(url, s["rle"].read_bytes(), "application/dicom", "?heatmap_size=%C2%B2"),  # a digit to isdigit()
     "params: heatmap_size must be an integer from 8 to 2048; got '²'"),
])
def test_errors_start_with_the_reason(server, samples, send, message):
    answer = send(server, samples)
    assert answer.status_code == 400, answer.text[:2000]
    assert answer.json()["message"].startswith(message), answer.json()["message"][:500]
    assert "Failed to predict data" not in answer.text


def test_a_multipart_part_over_the_limit_is_refused_while_uploading_and_answered(server, samples):
    """The server refuses a 30 MB part once the limit is passed (not after holding it all: the
    message says "more than"), and the client, which sends the whole body first, gets the answer."""
    answer = post(server, *multipart([samples["rle"].read_bytes(), b"\0" * 30_000_000]))
    assert answer.status_code == 400, answer.text[:2000]
    assert answer.json()["message"].startswith(f"row 1: payload of more than {SERVER_MAX_BYTES} bytes is over the "
                                               f"limit of {SERVER_MAX_BYTES} bytes"), answer.json()["message"][:500]


def test_a_ct_is_refused_with_422_on_every_route_and_a_batch_with_other_bad_rows_with_400(server, samples):
    """The X-ray gate's refusal through the running server: the raw body, the multipart body
    read as it arrives, and the JSON route; a batch with a non-gate error too is a plain 400."""
    from test_gate import CT, dicom

    ct, chest = dicom(Modality="CT"), samples["rle"].read_bytes()
    for answer, message in ((post(server, ct, "application/dicom"), f"row 0: {CT}"),
                            (post(server, *multipart([chest, ct, ct])),
                             f"row 1: {CT}; row 2: {CT} (2 of 3 rows are bad; nothing was predicted)"),
                            (json_route(server, [ct]), f"row 0: {CT}")):
        assert answer.status_code == 422, answer.text[:2000]
        assert answer.json()["message"].startswith(message), answer.json()["message"][:500]
    answer = post(server, *multipart([ct, b"junk" * 50]))
    assert answer.status_code == 400, answer.text[:2000]
    assert answer.json()["message"].startswith(f"row 0: {CT}; row 1: not an image")


def test_line_wrapped_base64_is_refused_with_remove_line_breaks(server, samples):
    wrapped = base64.encodebytes(samples["rle"].read_bytes()).decode("ascii")  # MIME style, 76 columns
    assert "\n" in wrapped.strip()
    answer = requests.post(f"{server}/invocations", json={"dataframe_records": [{"image": wrapped}]}, timeout=60)
    assert answer.status_code == 400, answer.text[:2000]
    assert answer.json()["message"].startswith("row 0: not valid base64: it contains line breaks; remove line breaks")


def test_readable_strips_mlflows_prefix_and_the_echoed_body():
    assert readable("Failed to predict data '   image\n0  AAAA'. \nError: row 0: bad") == "row 0: bad"
    assert readable("Failed to predict data 'x'. \nError: Failed to enforce schema of data '  picture\n0  AAAA' with "
                    "schema '['image': string (required)]'. Error: Model is missing inputs ['image'].") == \
        "input: Model is missing inputs ['image']."
    assert readable("Ensure that input is a valid JSON formatted string. Error: 'x'\nInput: \n{huge") == \
        "Ensure that input is a valid JSON formatted string. Error: 'x'"


@pytest.mark.slow
def test_mlflow_models_serve_still_answers_the_json_route(registry, samples, pyfunc):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = serve_env({**tool_env(), "MLFLOW_TRACKING_URI": registry.tracking_uri})
    with started(serve_command(port=port), env, registry.root / "mlflow-serve.log", url):
        dicom = samples["monochrome2"].read_bytes()
        answer = json_route(url, [dicom], {"heatmap": "none"})
        assert answer.status_code == 200, answer.text[:2000]
        assert set(answer.json()) == {"predictions"}  # MLflow's protocol, untouched
        local = pyfunc.predict(pd.DataFrame({"image": [b64(dicom)]}), params={"heatmap": "none"})
        pd.testing.assert_frame_equal(pd.DataFrame(answer.json()["predictions"]), local, check_dtype=False)
        bad = requests.post(f"{url}/invocations", json={"dataframe_records": [{"image": "@@"}]}, timeout=60)
        assert bad.status_code == 400 and "row 0: not valid base64" in bad.json()["message"]


@pytest.mark.slow
def test_a_client_that_stops_sending_gets_a_504_after_the_request_timeout(registry, samples):
    """The request timeout of ``mlflow models serve`` (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``)
    holds on cxrgaze's own route too, upload included: a stalled upload does not hold the
    request open, and the server goes on answering."""
    import socket
    import time

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    timeout = 10  # long enough for a whole request on a loaded CI machine (2 s was not, once)
    env = {**tool_env(), "MLFLOW_TRACKING_URI": registry.tracking_uri,
           "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(timeout)}
    with started([str(VENV_BIN / "cxrgaze"), "serve", "--port", str(port)], env, registry.root / "server-504.log",
                 url, cwd=registry.root):
        dicom = samples["rle"].read_bytes()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as stalled:
            stalled.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(dicom) + dicom[:1000])
            start = time.monotonic()
            head, _, body = stalled.recv(65536).partition(b"\r\n\r\n")
            waited = time.monotonic() - start
        assert head.startswith(b"HTTP/1.1 504"), head
        assert timeout - 0.5 < waited < timeout + 20
        assert b'"error_code": "DEADLINE_EXCEEDED"' in body and b"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT" in body
        answer = post(url, dicom, "application/dicom", "?heatmap=none")  # a whole request is still answered
        assert answer.status_code == 200, answer.text[:2000]
