"""cxrgaze's scoring server: MLflow's own FastAPI scoring app with cxrgaze's ``/invocations`` in front.

``cxrgaze serve`` runs this app (:class:`ScoringApp`) under uvicorn. ``/ping``, ``/health`` and
``/version`` are MLflow's (``mlflow.pyfunc.scoring_server.init``); ``POST /invocations`` is
cxrgaze's, answered in front of MLflow's app, and takes:

- ``application/json`` (also ``text/csv``, ``application/vnd.apache.parquet``): MLflow's
  protocol, parsed by MLflow's own code (``dataframe_split``, ``dataframe_records``,
  ``params``...), exactly as ``mlflow models serve`` parses it;
- ``application/dicom``: the DICOM file itself as the body (PNG and JPEG bodies are read too,
  as ``image/png`` and ``image/jpeg``);
- ``multipart/related; type="application/dicom"`` (as DICOMweb STOW-RS sends files): each
  part one file, ``row i`` is part ``i``.

The raw routes skip base64, JSON and pandas parsing: the bytes go to the model's
``predict_bytes``, the same preprocessing and inference as the JSON route. Their options are
query parameters, ``?heatmap=gbp&heatmap_size=256``.

Every accepted answer is ``{"predictions": [...], "model": {"name", "version", "uri"}}``
(``version`` the registered version that ``models:/name@alias`` or ``models:/name/N``
resolved to when the server started, and that was loaded; ``run_id`` for a ``runs:/`` URI).
Every refusal is JSON ``{"error_code", "message"}`` whose message starts with the reason
(``row 0: not valid base64 ...``), without MLflow's ``Failed to predict data '<table>'``
prefix nor an echo of the request body; a request without a Content-Type, or with another
one, gets 415 naming the accepted types; a batch refused by the gate (not a chest radiograph,
:mod:`cxrgaze.serving.gate`) gets 422, other bad input 400; a request not answered within
``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` seconds, upload included, 504.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from email.message import Message
from typing import Any

import pandas as pd
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel
from mlflow.pyfunc import scoring_server as mlflow_scoring
from mlflow.tracking import MlflowClient
from mlflow.utils.proto_json_utils import NumpyEncoder
from starlette.requests import Request
from starlette.responses import Response

DICOM = "application/dicom"
MULTIPART = "multipart/related"
RAW_TYPES: tuple[str, ...] = (DICOM, "image/png", "image/jpeg")
TABLE_TYPES: tuple[str, ...] = tuple(mlflow_scoring.CONTENT_TYPES)
ACCEPTED = f"{DICOM}, {MULTIPART}; type=\"{DICOM}\", image/png, image/jpeg, " + ", ".join(TABLE_TYPES)
QUERY_PARAMS = ("heatmap", "heatmap_size")
MAX_MESSAGE = 2000
"""Characters of an error message kept (MLflow's parse errors quote the whole body)."""
MODEL_URI_ENV = "CXRGAZE_SERVE_MODEL_URI"
"""The model URI handed to the app factory (uvicorn workers import the app by name)."""


class RequestError(Exception):
    """A refused request: HTTP ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str, error_code: str = "BAD_REQUEST") -> None:
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code


def resolve_model(model_uri: str) -> tuple[str, dict[str, Any]]:
    """The URI to load (an alias resolved to its version now, so that what is loaded is what is
    reported) and the ``model`` field of the answers."""
    info: dict[str, Any] = {"uri": model_uri, "name": None, "version": None}
    if model_uri.startswith("models:/"):
        name, _, ref = model_uri[len("models:/"):].strip("/").partition("/")
        name, _, alias = name.partition("@")
        client = MlflowClient()
        if alias:
            version = client.get_model_version_by_alias(name, alias)
        elif ref.isdigit():
            version = client.get_model_version(name, ref)
        else:  # a stage or "latest"
            stages = None if ref in ("", "latest") else [ref]
            version = max(client.get_latest_versions(name, stages), key=lambda v: int(v.version))
        info.update(name=name, version=str(version.version), run_id=version.run_id)
        return f"models:/{name}/{version.version}", info
    if model_uri.startswith("runs:/"):
        run_id, _, path = model_uri[len("runs:/"):].partition("/")
        info.update(name=path or None, run_id=run_id)
    return model_uri, info


def readable(message: str) -> str:
    """MLflow's error message without its ``Failed to predict data '<table>'`` and ``Failed to
    enforce schema of data '<table>'`` prefixes and the request body it quotes, at most :data:`MAX_MESSAGE` characters."""
    if message.startswith("Failed to predict data") and "\nError: " in message:
        message = message.split("\nError: ", 1)[1]
    if message.startswith("Failed to enforce schema") and ". Error: " in message:  # quotes the table too
        message = "input: " + message.split(". Error: ", 1)[1]
    message = message.split("\nInput:", 1)[0].strip()
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + " ..."


def split_multipart(body: bytes, content_type: Message) -> list[bytes]:
    """The parts of a ``multipart/related`` body (RFC 2046), each an image file.

    The body is searched in place and each part's content copied out once (a batch of 16
    films is a 230 MB body: splitting copies of it cost as much as decoding a film)."""
    boundary = content_type.get_param("boundary")
    kind = content_type.get_param("type")
    if not isinstance(boundary, str) or not boundary:
        raise RequestError(400, "multipart/related: no boundary parameter in the Content-Type")
    if isinstance(kind, str) and kind.lower() != DICOM:
        raise RequestError(415, f"multipart/related: type must be {DICOM!r}, got {kind!r}",
                           "UNSUPPORTED_MEDIA_TYPE")
    delimiter = b"\r\n--" + boundary.encode("latin-1")  # a delimiter line; the first may open the body
    if body.startswith(delimiter[2:]):  # no preamble
        at = len(delimiter) - 2
    else:
        found = body.find(delimiter)
        at = found + len(delimiter) if found >= 0 else -1
    cut_short = RequestError(400, "multipart/related: no close delimiter (--boundary--): the body is cut short")
    if at < 0:
        raise cut_short
    files: list[bytes] = []
    while body[at:at + 2] != b"--":  # ``at``: just after a delimiter; ``--`` closes, the rest is the epilogue
        end = body.find(delimiter, at)
        if end < 0:
            raise cut_short
        i = len(files)
        blank = body.find(b"\r\n\r\n", at, end)
        if blank < 0:
            raise RequestError(400, f"row {i}: multipart part without a blank line after its headers")
        head = body[at:blank].decode("latin-1").lower()  # line 1: the rest of the delimiter line
        part_type = next((line.split(":", 1)[1].strip() for line in head.split("\r\n")[1:]
                          if line.startswith("content-type:")), DICOM)
        if part_type.split(";")[0].strip() not in RAW_TYPES:
            raise RequestError(415, f"row {i}: part Content-Type {part_type!r}; each part must be one of "
                               f"{', '.join(RAW_TYPES)}", "UNSUPPORTED_MEDIA_TYPE")
        files.append(body[blank + 4:end])
        at = end + len(delimiter)
    if not files:
        raise RequestError(400, "multipart/related: no parts")
    return files


def query_params(query: dict[str, str]) -> dict[str, Any]:
    """``heatmap`` and ``heatmap_size`` from the query string (the model checks the values)."""
    unknown = sorted(set(query) - set(QUERY_PARAMS))
    if unknown:
        raise RequestError(400, f"params: unknown query parameter(s) {', '.join(unknown)}; "
                           f"accepted: {', '.join(QUERY_PARAMS)}", "INVALID_PARAMETER_VALUE")
    params: dict[str, Any] = {}
    if query.get("heatmap"):
        params["heatmap"] = query["heatmap"]
    if query.get("heatmap_size"):
        text = query["heatmap_size"]
        params["heatmap_size"] = int(text) if text.strip().lstrip("-").isdigit() else text
    return params


class Scorer:
    """The loaded model and the work of one ``/invocations`` request (runs in a worker thread)."""

    def __init__(self, model: PyFuncModel, info: dict[str, Any]) -> None:
        self.model, self.info = model, info
        self.python_model = model.unwrap_python_model()
        self.input_schema = model.metadata.get_input_schema()

    def raw(self, files: list[bytes], params: dict[str, Any]) -> bytes:
        """The answer to image files given as bytes."""
        if hasattr(self.python_model, "predict_bytes"):
            table = self.python_model.predict_bytes(files, params)
        else:  # a model logged before predict_bytes existed: its own JSON-route code
            frame = pd.DataFrame({"image": [base64.b64encode(f).decode("ascii") for f in files]})
            table = self.model.predict(frame, params=params or None)
        return self.answer(table.to_dict(orient="records"))

    def table(self, body: bytes, content_type: str) -> tuple[bytes, int]:
        """MLflow's own parsing and prediction of a JSON, CSV or Parquet request.

        A JSON body is parsed here, once, and handed to MLflow as the dict (MLflow's own
        path parses the text twice: 19 MB for one 15 MB film); one that does not parse is
        left to MLflow, for its message."""
        data: Any = body
        if content_type.split(";")[0].strip().lower() == mlflow_scoring.CONTENT_TYPE_JSON:
            try:
                data = json.loads(body)
            except ValueError:
                pass
            if not isinstance(data, dict):
                data = body
        result = mlflow_scoring.invocations(data, content_type, self.model, self.input_schema)
        if result.status != 200:
            raise RequestError(result.status, readable(result.response),
                               "UNSUPPORTED_MEDIA_TYPE" if result.status == 415 else "BAD_REQUEST")
        answer = json.loads(result.response)
        if isinstance(answer, dict) and "predictions" in answer:
            return self.answer(answer["predictions"]), 200
        return result.response.encode(), 200

    def answer(self, predictions: Any) -> bytes:
        return json.dumps({"predictions": predictions, "model": self.info}, cls=NumpyEncoder).encode()


def _error(status: int, error_code: str, message: str) -> Response:
    return Response(json.dumps({"error_code": error_code, "message": message}), status_code=status,
                    media_type="application/json")


class ScoringApp:
    """The ASGI app that ``cxrgaze serve`` runs.

    ``POST /invocations`` is answered here, as plain ASGI: no FastAPI routing and no
    ``@app.middleware("http")`` wrapper, whose body streams cost milliseconds per 15 MB film
    (BENCHMARKS.md, serving). MLflow's request timeout (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``,
    seconds, the same variable and default as ``mlflow models serve``) is applied here
    instead, from the first byte of the body to the answer: a client that stops sending
    gets a 504 rather than holding the request open. Everything else (``/ping``,
    ``/health``, ``/version``, other methods) goes to MLflow's own app.
    """

    def __init__(self, mlflow_app: Any, scorer: Scorer, timeout: float) -> None:
        self.mlflow_app, self.scorer, self.timeout = mlflow_app, scorer, timeout

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/invocations" and scope["method"] == "POST":
            request = Request(scope, receive)
            try:
                response = await asyncio.wait_for(self.invocations(request), timeout=self.timeout)
            except (asyncio.TimeoutError, TimeoutError):
                response = _error(504, "DEADLINE_EXCEEDED", f"the request took over {self.timeout:g} s "
                                  "(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT), body upload included")
            await response(scope, receive, send)
        else:
            await self.mlflow_app(scope, receive, send)

    async def invocations(self, request: Request) -> Response:
        """cxrgaze's ``/invocations`` (see the module docstring)."""
        header = request.headers.get("content-type")
        parsed = Message()
        parsed["content-type"] = header or "application/x-missing"
        mime = parsed.get_content_type()
        try:
            if not header or (mime not in RAW_TYPES + TABLE_TYPES and mime != MULTIPART):
                got = f"got {header!r}" if header else "the request has no Content-Type"
                raise RequestError(415, f"unsupported Content-Type: {got}; accepted: {ACCEPTED}",
                                   "UNSUPPORTED_MEDIA_TYPE")
            body = b"".join([chunk async for chunk in request.stream()])  # (request.body() would keep a copy)
            if mime in TABLE_TYPES:
                content, status = await asyncio.to_thread(self.scorer.table, body, header)
            else:
                if mime != MULTIPART and not body:
                    raise RequestError(400, "row 0: empty body (no image)")
                files = split_multipart(body, parsed) if mime == MULTIPART else [body]
                del body  # a multipart body's parts are copies: free the 230 MB of a 16-film batch now
                params = query_params(dict(request.query_params))
                content, status = await asyncio.to_thread(self.scorer.raw, files, params), 200
        except RequestError as exc:
            return _error(exc.status, exc.error_code, exc.message)
        except MlflowException as exc:  # the gate's refusals (attribute, not class: see cxrgaze.serving.gate) are 422
            status = 422 if getattr(exc, "gate_refusal", False) else exc.get_http_status_code()
            return _error(status, exc.error_code, readable(exc.message))
        return Response(content, status_code=status, media_type="application/json")


def create_app(model_uri: str) -> ScoringApp:
    """The :class:`ScoringApp` for the model at ``model_uri``: MLflow's scoring app with cxrgaze's
    ``/invocations`` in front."""
    load_uri, info = resolve_model(model_uri)
    model = mlflow_scoring.load_model_with_mlflow_config(load_uri)
    app = ScoringApp(mlflow_scoring.init(model), Scorer(model, info), MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())
    print(f"cxrgaze serve: {model_uri} -> {load_uri} (version {info['version']})", file=sys.stderr, flush=True)
    return app


def app_from_env() -> Any:
    """The app for ``$CXRGAZE_SERVE_MODEL_URI`` (uvicorn's factory, one per worker)."""
    return create_app(os.environ[MODEL_URI_ENV])
