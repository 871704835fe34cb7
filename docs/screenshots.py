"""Screenshots of what a user sees after ``make demo``, taken with headless Chromium against
the real servers, each page checked for the text it must show.

Pages: MLflow's results view (the evaluated models with their headline metrics), the
runs table of the experiment (its description links to that view), the champion's run (its description: the
headline), the champion's heatmap panel, the registered model with its ``champion`` alias,
and optuna-dashboard's page of the first study (set 3's alpha). ``mlflow ui`` and ``optuna-dashboard`` are started on free
loopback ports over the project's ``mlflow.db`` and ``optuna.db`` and stopped at the end.

Usage (after ``make demo``; Chromium from Debian's ``chromium`` package)::

    .venv/bin/python docs/screenshots.py [--root .] [--out docs/screenshots]

Exits 1, naming the page and the text it lacks, when a page does not render what it must
(the README's images are this script's output; ``tests/test_pipeline_full.py`` runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import html
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from cxrgaze.mlflow_ui import results_link

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000", "--virtual-time-budget=20000", "--hide-scrollbars")
"""Headless, and quiet on a machine without internet (no background connections)."""
ML_VIEW = "?workflowType=machine_learning"
"""MLflow 3 opens on its GenAI view without it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(cmd: list[str], url: str, log: Path, timeout: float = 180) -> Iterator[str]:
    """Run ``cmd`` until the block ends; yield ``url`` once it answers HTTP 200."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not answer at {url} (see {log})")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def page_text(chromium: str, url: str) -> str:
    """The text of the page once its scripts have run (the DOM, tags stripped)."""
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=180).stdout
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


def screenshot(chromium: str, url: str, png: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}", url],
                       capture_output=True, timeout=180, check=True)


def champion(root: Path) -> dict[str, str]:
    """The champion's version, run, variant and test macro AUC (as its description prints it)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    try:
        version = client.get_model_version_by_alias("cxrgaze", "champion")
    except MlflowException as exc:
        raise SystemExit(f"screenshots: {store}: no `champion` ({exc.message.splitlines()[0]}); run `make demo` first")
    run = client.get_run(version.run_id)
    return {"version": str(version.version), "run_id": run.info.run_id, "experiment": run.info.experiment_id,
            "variant": run.data.tags["cxrgaze.variant"], "test_auc": f"{run.data.metrics['test_auc_macro']:.3f}",
            "test_auc_digits": repr(run.data.metrics["test_auc_macro"])[:6]}  # the runs table shows it unrounded


def pages(mlflow_url: str, optuna_url: str, champ: dict[str, str]) -> list[tuple[str, str, list[str]]]:
    """(file name, URL, texts the page must show)."""
    run = f"{mlflow_url}/#/experiments/{champ['experiment']}/runs/{champ['run_id']}"
    return [
        ("mlflow-results-view.png", results_link(champ["experiment"], f"{mlflow_url}/"),
         ["shared view", "test_auc_macro_ci95_low", f"{champ['variant']} evaluation", champ["test_auc_digits"]]),
        ("mlflow-runs.png", f"{mlflow_url}/#/experiments/{champ['experiment']}/runs{ML_VIEW}",
         ["Results view", "report", champ["variant"]]),
        ("mlflow-champion-run.png", f"{run}{ML_VIEW}",
         [champ["variant"], "Test macro AUC", champ["test_auc"]]),
        ("mlflow-heatmaps.png", f"{run}/artifacts/figures/heatmaps.png{ML_VIEW}", ["figures/heatmaps.png"]),
        ("mlflow-registry.png", f"{mlflow_url}/#/models/cxrgaze{ML_VIEW}",
         ["champion", f"Version {champ['version']}", "Promotion rule"]),
        ("optuna-dashboard.png", f"{optuna_url}/dashboard/studies/1", ["cxrgaze-set3-gbp", "History"]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the project (mlflow.db, optuna.db)")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"), help="folder for the PNGs")
    args = parser.parse_args(argv)
    root, out = args.root.resolve(), args.out.resolve()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("screenshots: no chromium (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    champ = champion(root)
    mlflow_port, optuna_port = free_port(), free_port()
    mlflow_cmd = [str(bin_dir / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                  "--host", "127.0.0.1", "--port", str(mlflow_port)]
    optuna_cmd = [str(bin_dir / "optuna-dashboard"), f"sqlite:///{root / 'optuna.db'}", "--host", "127.0.0.1",
                  "--port", str(optuna_port)]
    failures = []
    with tempfile.TemporaryDirectory() as logs, \
            server(mlflow_cmd, f"http://127.0.0.1:{mlflow_port}", Path(logs) / "mlflow.log") as mlflow_url, \
            server(optuna_cmd, f"http://127.0.0.1:{optuna_port}/dashboard", Path(logs) / "optuna.log"):
        for name, url, expected in pages(mlflow_url, f"http://127.0.0.1:{optuna_port}", champ):
            text = page_text(chromium, url)
            missing = [e for e in expected if e not in text]
            if missing:
                failures.append(f"{name} ({url}): does not show {missing}")
            screenshot(chromium, url, out / name)
            print(f"{out / name}: {'ok' if not missing else 'MISSING ' + ', '.join(missing)}")
    for failure in failures:
        print(f"screenshots: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
