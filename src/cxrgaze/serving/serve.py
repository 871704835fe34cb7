"""``cxrgaze serve``: ``mlflow models serve`` of the registered champion, with safe defaults.

It runs exactly the command the README shows, ``mlflow models serve -m
models:/cxrgaze@champion --env-manager local -h 127.0.0.1 -p 5000``, with the current
interpreter's ``bin`` folder first on ``PATH`` (MLflow starts ``uvicorn`` through the
shell, so the virtual environment must be found without being activated). It binds the
loopback interface unless told otherwise: the server has no authentication.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

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


def serve(model_uri: str = DEFAULT_MODEL_URI, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          workers: int | None = None) -> NoReturn:
    """Replace this process with the model server (returns only by raising ``OSError``)."""
    command = serve_command(model_uri, host, port, workers)
    store = os.environ.get("MLFLOW_TRACKING_URI", "MLflow's default")
    print(f"cxrgaze serve: mlflow {' '.join(command[3:])} (tracking store: {store})", file=sys.stderr, flush=True)
    os.execve(command[0], command, serve_env())
