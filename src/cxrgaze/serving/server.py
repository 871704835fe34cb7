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
  part one file, ``row i`` is part ``i``. Each part is read for the model (gate, decoding,
  resizing) while the next one uploads (:class:`MultipartReader`, :meth:`Scorer.stream`).

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
from typing import Any, AsyncIterator

import pandas as pd
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel
from mlflow.pyfunc import scoring_server as mlflow_scoring
from mlflow.tracking import MlflowClient
from mlflow.utils.proto_json_utils import NumpyEncoder
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

DICOM = "application/dicom"
MULTIPART = "multipart/related"
RAW_TYPES: tuple[str, ...] = (DICOM, "image/png", "image/jpeg")
TABLE_TYPES: tuple[str, ...] = tuple(mlflow_scoring.CONTENT_TYPES)
ACCEPTED = f"{DICOM}, {MULTIPART}; type=\"{DICOM}\", image/png, image/jpeg, " + ", ".join(TABLE_TYPES)
QUERY_PARAMS = ("heatmap", "heatmap_size")
MAX_MESSAGE = 2000
"""Characters of an error message kept (MLflow's parse errors quote the whole body)."""
QUEUED_PARTS = 2
"""Received multipart parts that may wait for their reading before the upload waits."""
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
        name, slash, ref = model_uri[len("models:/"):].strip("/").partition("/")
        name, at, alias = name.partition("@")
        if not slash and not at:  # models:/<model id>: a logged model (MLflow 3), not a registered version
            info["model_id"] = name
            return model_uri, info
        client = MlflowClient()
        if alias:
            version = client.get_model_version_by_alias(name, alias)
        elif ref.isdigit():
            version = client.get_model_version(name, ref)
        else:  # a stage or "latest"
            stages = None if ref.lower() == "latest" else [ref]
            versions = client.get_latest_versions(name, stages)
            if not versions:
                raise MlflowException(f"registered model {name!r} has no version{f' in stage {ref}' if stages else ''}")
            version = max(versions, key=lambda v: int(v.version))
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


class MultipartReader:
    """A ``multipart/related`` body (RFC 2046) read as it arrives: :meth:`feed` takes the
    next bytes of the body and returns the parts it completed (each an image file, copied
    out once), :meth:`close` checks that the body ended with the close delimiter.

    The server decodes each part while the next one is uploading, and a 16-film batch (230
    MB) is never in memory as a whole: the reader holds the unfinished part, and at most
    :data:`QUEUED_PARTS` finished ones wait to be decoded (:meth:`Scorer.stream`). A part over
    ``max_part`` bytes is refused as soon as that many bytes of it have arrived (uvicorn
    reads and drops the rest of the upload, so the client still gets the answer).
    """

    HEADER_ALLOWANCE = 64 * 1024
    """Bytes of part headers allowed on top of ``max_part``."""

    def __init__(self, content_type: Message, max_part: int | None = None) -> None:
        boundary = content_type.get_param("boundary")
        kind = content_type.get_param("type")
        if not isinstance(boundary, str) or not boundary:
            raise RequestError(400, "multipart/related: no boundary parameter in the Content-Type")
        if isinstance(kind, str) and kind.lower() != DICOM:
            raise RequestError(415, f"multipart/related: type must be {DICOM!r}, got {kind!r}",
                               "UNSUPPORTED_MEDIA_TYPE")
        self.delimiter = b"\r\n--" + boundary.encode("latin-1")
        self.max_part = max_part
        self.buffer = bytearray(b"\r\n")  # so that a delimiter that opens the body (no preamble) is found too
        self.scanned = 0
        """Where the search for the next delimiter goes on (what is before it holds none)."""
        self.state = "preamble"  # -> "parts" after the first delimiter -> "closed" after the close delimiter
        self.part_start = False
        """In ``parts``: the buffer starts just after a delimiter (``--`` there closes the body)."""
        self.parts = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        """The parts that ``chunk`` completes, in order."""
        if self.state == "closed":
            return []  # the epilogue
        self.buffer += chunk
        done: list[bytes] = []
        while True:
            if self.state == "parts" and self.part_start:  # just after a delimiter: a part, or the close?
                if len(self.buffer) < 2:
                    return done
                if self.buffer[:2] == b"--":  # the close delimiter; the rest is the epilogue
                    self.state, self.buffer = "closed", bytearray()
                    return done
                self.part_start = False
            end = self.buffer.find(self.delimiter, self.scanned)
            if end < 0:
                self.scanned = max(0, len(self.buffer) - len(self.delimiter) + 1)
                if self.state == "preamble":  # keep only what may begin the first delimiter
                    del self.buffer[:self.scanned]
                    self.scanned = 0
                elif self.max_part is not None and len(self.buffer) > self.max_part + self.HEADER_ALLOWANCE:
                    raise RequestError(400, f"row {self.parts}: payload of more than {self.max_part} bytes is over "
                                       f"the limit of {self.max_part} bytes")
                return done
            if self.state == "parts":
                done.append(self._part(end))
            del self.buffer[:end + len(self.delimiter)]
            self.scanned, self.state, self.part_start = 0, "parts", True

    def _part(self, end: int) -> bytes:
        """The content of the part that ends at ``end``: the buffer holds the rest of its
        delimiter line, its headers, a blank line and the content."""
        row = self.parts
        blank = self.buffer.find(b"\r\n\r\n", 0, end)
        if blank < 0:
            raise RequestError(400, f"row {row}: multipart part without a blank line after its headers")
        head = self.buffer[:blank].decode("latin-1").lower()  # line 1: the rest of the delimiter line
        part_type = next((line.split(":", 1)[1].strip() for line in head.split("\r\n")[1:]
                          if line.startswith("content-type:")), DICOM)
        if part_type.split(";")[0].strip() not in RAW_TYPES:
            raise RequestError(415, f"row {row}: part Content-Type {part_type!r}; each part must be one of "
                               f"{', '.join(RAW_TYPES)}", "UNSUPPORTED_MEDIA_TYPE")
        self.parts += 1
        with memoryview(self.buffer) as view:  # one copy (a bytearray slice would be a second)
            return bytes(view[blank + 4:end])

    def close(self) -> None:
        """Check that the body was complete; raises the :class:`RequestError` saying what is missing."""
        if self.state != "closed":
            raise RequestError(400, "multipart/related: no close delimiter (--boundary--): the body is cut short")
        if self.parts == 0:
            raise RequestError(400, "multipart/related: no parts")


def split_multipart(body: bytes, content_type: Message) -> list[bytes]:
    """The parts of a whole ``multipart/related`` body (:class:`MultipartReader` fed at once)."""
    reader = MultipartReader(content_type)
    parts = reader.feed(body)
    reader.close()
    return parts


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
        try:
            params["heatmap_size"] = int(text)
        except ValueError:
            params["heatmap_size"] = text  # the model names it as not an integer
    return params


class Scorer:
    """The loaded model and the work of one ``/invocations`` request."""

    def __init__(self, model: PyFuncModel, info: dict[str, Any]) -> None:
        self.model, self.info = model, info
        self.python_model = model.unwrap_python_model()
        self.input_schema = model.metadata.get_input_schema()
        self.streams = all(hasattr(self.python_model, name) for name in ("options", "read_file", "batch",
                                                                          "predict_grids"))
        """Whether the model reads files one by one (models logged before it take the whole batch)."""
        limits = getattr(self.python_model, "limits", None)
        self.max_part: int | None = getattr(limits, "max_bytes", None)

    async def stream(self, chunks: AsyncIterator[bytes], reader: MultipartReader, params: dict[str, Any]) -> bytes:
        """The answer to a multipart body as it arrives: each part is read for the model
        (gate, decoding, resizing) on a worker thread while the next part uploads, one part
        at a time per request; the batch is predicted once the body is complete.

        At most :data:`QUEUED_PARTS` received parts wait for their reading; beyond that the
        upload waits (uvicorn stops reading the socket), so a fast upload of slow-to-decode
        films (JPEG 2000) does not pile up in memory."""
        model = self.python_model
        heatmap, size = model.options(params)  # a bad option fails before the upload is read
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=QUEUED_PARTS)

        async def read_parts() -> list[Any]:
            outcomes: list[Any] = []
            while (part := await queue.get()) is not None:
                try:
                    outcomes.append(await asyncio.to_thread(model.read_file, part))
                except Exception as exc:  # noqa: BLE001 - each row's outcome; model.batch sorts them out
                    outcomes.append(exc)
            return outcomes

        reading = asyncio.create_task(read_parts())
        try:
            async for chunk in chunks:
                for part in reader.feed(chunk):
                    await queue.put(part)
            reader.close()
            await queue.put(None)
            outcomes = await reading
        finally:
            reading.cancel()  # a refused body: the parts still queued are not read
        return await asyncio.to_thread(self._predict_read, outcomes, heatmap, size)

    def _predict_read(self, outcomes: list[Any], heatmap: str, size: int) -> bytes:
        images, notes = self.python_model.batch(outcomes)
        return self.answer(self.python_model.predict_grids(images, notes, heatmap, size).to_dict(orient="records"))

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
            if mime == MULTIPART and self.scorer.streams:
                reader = MultipartReader(parsed, self.scorer.max_part)
                params = query_params(dict(request.query_params))
                content, status = await self.scorer.stream(request.stream(), reader, params), 200
            elif mime in TABLE_TYPES:
                body = b"".join([chunk async for chunk in request.stream()])  # (request.body() would keep a copy)
                content, status = await asyncio.to_thread(self.scorer.table, body, header)
            else:
                body = b"".join([chunk async for chunk in request.stream()])
                if mime != MULTIPART and not body:
                    raise RequestError(400, "row 0: empty body (no image)")
                files = split_multipart(body, parsed) if mime == MULTIPART else [body]
                del body  # a multipart body's parts are copies
                params = query_params(dict(request.query_params))
                content, status = await asyncio.to_thread(self.scorer.raw, files, params), 200
        except RequestError as exc:
            return _error(exc.status, exc.error_code, exc.message)
        except ClientDisconnect:  # nobody to answer; uvicorn drops this
            return _error(400, "BAD_REQUEST", "the client disconnected before its body was complete")
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
