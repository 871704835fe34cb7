"""``cxrgaze serve``: cxrgaze's scoring server (:mod:`cxrgaze.serving.server`) for the registered
champion, under uvicorn, with safe defaults.

The app is MLflow's own scoring app with cxrgaze's ``/invocations`` in front: the JSON
protocol of ``mlflow models serve`` unchanged, plus raw DICOM and multipart bodies, readable
errors and the model version in each answer. The plain MLflow server still works on the
same model: :func:`serve_command` is the command the README shows, ``mlflow models serve -m
models:/cxrgaze@champion --env-manager local -h 127.0.0.1 -p 5000`` (run with the current
interpreter's ``bin`` folder first on ``PATH``, :func:`serve_env`: MLflow starts ``uvicorn``
through the shell). Both bind the loopback interface unless told otherwise: the server has
no authentication. uvicorn parses HTTP with ``httptools`` (a pinned dependency; its pure-Python
``h11`` is slower at receiving a 15-20 MB body), for both servers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_MODEL_URI = "models:/cxrgaze@champion"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000


def serve_command(model_uri: str = DEFAULT_MODEL_URI, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                  workers: int | None = None) -> list[str]:
    """The ``mlflow models serve`` command line (run by this interpreter's MLflow)."""
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", host, "-p", str(port)]
    if workers is not None:
        command += ["-w", str(workers)]
    return command


def serve_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) with this interpreter's ``bin`` first on ``PATH``.

    ``sys.executable`` is not resolved: in a virtual environment it is the venv's own link.
    """
    env = dict(os.environ if environ is None else environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def cxrgaze_serve_command(model_uri: str = DEFAULT_MODEL_URI, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                          workers: int | None = None) -> list[str]:
    """``cxrgaze serve`` as a command line of this interpreter (for benchmarks and tests)."""
    command = [sys.executable, "-m", "cxrgaze.cli", "serve", "--model", model_uri, "--host", host, "--port", str(port)]
    return command + (["--workers", str(workers)] if workers is not None else [])


def serve(model_uri: str = DEFAULT_MODEL_URI, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          workers: int | None = None) -> None:
    """Run cxrgaze's scoring server for ``model_uri`` until stopped (SIGINT or SIGTERM)."""
    import uvicorn

    from cxrgaze.serving.server import MODEL_URI_ENV

    os.environ[MODEL_URI_ENV] = model_uri
    store = os.environ.get("MLFLOW_TRACKING_URI", "MLflow's default")
    print(f"cxrgaze serve: {model_uri} on http://{host}:{port} (tracking store: {store})", file=sys.stderr, flush=True)
    uvicorn.run("cxrgaze.serving.server:app_from_env", factory=True, host=host, port=port, workers=workers)
