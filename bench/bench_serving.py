"""Served latency and throughput against the bare preprocess + forward in one process.

Sets up what ``register`` produces: a U-Net (``efficientnet-b0`` by default, random
weights: the timing does not depend on them) logged with ``cxrgaze.serving.log.log_model``
into a temporary SQLite store, registered as ``cxrgaze`` and aliased ``champion``; starts
``cxrgaze serve`` (cxrgaze's scoring server) and, as today's baseline, ``mlflow models
serve`` of the same model, each on a free loopback port; writes full-size 12-bit DICOMs
(3000 x 2500 and 2544 x 3056, uncompressed by default, about 15 MB each).

- Latency: one request with one DICOM, default heatmap (``mask``, 224 px PNG), p50 and
  p95 over ``--n`` requests, by four routes: ``cxrgaze serve`` with the DICOM as the body
  (``application/dicom``), ``cxrgaze serve`` with MLflow's JSON (base64 in
  ``dataframe_split``), ``mlflow models serve`` with the same JSON, and bare. The bodies are
  built once; the time is the POST and the parsing of the answer.
- Throughput: requests of ``--batch`` DICOMs (``multipart/related`` for the raw route),
  images per second over ``--rounds``.
- Pyfunc: the registered model loaded in this process (``mlflow.pyfunc.load_model``) and its
  ``predict_bytes`` called with the file's bytes: what the raw route runs, without HTTP.
- Bare: in this process, ``preprocess`` (the served code: decode, resize, float16) of the
  file's bytes and the U-Net forward (mask and class logits, the work the default heatmap
  needs), softmax and sigmoid; no base64, JSON, HTTP or PNG.

The calls of the five kinds alternate, so that a drift of a shared machine hits all alike.
Torch uses the same number of threads in all processes (``--threads``; ``--device cuda``
runs all on the GPU).

Run: .venv/bin/python bench/bench_serving.py   (about 4-5 minutes on a 2-core CPU)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import requests
import torch
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dicoms import radiograph, write_dicom  # noqa: E402

from cxrgaze.checkpoint import save_checkpoint  # noqa: E402
from cxrgaze.config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from cxrgaze.models import build_model  # noqa: E402
from cxrgaze.serving.log import log_model  # noqa: E402
from cxrgaze.serving.preprocess import preprocess  # noqa: E402
from cxrgaze.serving.serve import cxrgaze_serve_command, serve_command, serve_env  # noqa: E402

SYNTAXES = {"explicit": ExplicitVRLittleEndian, "j2k": JPEG2000Lossless}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=30, help="latency: requests (and bare calls), after 3 warm-ups")
    p.add_argument("--batch", type=int, default=16, help="throughput: images per request")
    p.add_argument("--rounds", type=int, default=4, help="throughput: requests (and bare batches), after 1 warm-up")
    p.add_argument("--size", type=int, default=224, help="model input size (data.image_size)")
    p.add_argument("--encoder", default="efficientnet-b0")
    p.add_argument("--syntax", choices=tuple(SYNTAXES), default="explicit", help="transfer syntax of the DICOMs")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the server gets CXRGAZE_DEVICE)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads in both processes (0: torch's default; 1 is steadier on a busy machine)")
    return p.parse_args()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register(root: Path, model: torch.nn.Module, run_config: RunConfig, data_config: DataConfig, example: bytes) -> str:
    """Log and register the model in a SQLite store under ``root``; returns the tracking URI."""
    checkpoint = root / "best.pt"
    save_checkpoint({"model": model.state_dict(), "config": run_config.as_dict(), "epoch": 0, "metrics": {}},
                    checkpoint)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("bench-serving", artifact_location=str(root / "artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        info = log_model(checkpoint, data_config, example)
    version = mlflow.register_model(info.model_uri, "cxrgaze").version
    mlflow.MlflowClient().set_registered_model_alias("cxrgaze", "champion", version)
    return uri


def start_server(root: Path, tracking_uri: str, device: str, threads: int,
                 command=cxrgaze_serve_command) -> tuple[subprocess.Popen, str]:  # noqa: ANN001
    port = free_port()
    env = serve_env({**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "CXRGAZE_DEVICE": device})
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server
    log = (root / "server.log").open("a")
    proc = subprocess.Popen(command(port=port), env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.25)


KINDS = ("bare", "pyfunc", "raw", "json", "mlflow json")
"""bare; the registered pyfunc's ``predict_bytes`` in this process (gate, preprocess, forward,
heatmap PNG: the served work without HTTP); cxrgaze serve with the DICOM as the body
(multipart for a batch); cxrgaze serve with MLflow's JSON; mlflow models serve with the
same JSON (today's baseline)."""
BOUNDARY = "cxrgaze-bench-boundary"


def json_body(batch: list[bytes]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"],
                                           "data": [[base64.b64encode(d).decode("ascii")] for d in batch]}}).encode()


def raw_body(batch: list[bytes]) -> tuple[bytes, str]:
    """One DICOM as the body, or several as ``multipart/related``; and the Content-Type."""
    if len(batch) == 1:
        return batch[0], "application/dicom"
    parts = [f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + d + b"\r\n" for d in batch]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode(), f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def post(url: str, payload: bytes, content_type: str, rows: int) -> None:
    answer = requests.post(f"{url}/invocations", data=payload, timeout=600, headers={"Content-Type": content_type})
    if answer.status_code != 200 or len(answer.json()["predictions"]) != rows:
        raise SystemExit(f"served request failed: {answer.status_code} {answer.text[:500]}")


def measure(calls: dict, rounds: int, warm: int) -> dict[str, list[float]]:
    """``calls[kind]()`` for each kind in turn, ``warm + rounds`` times; the times of the last ``rounds``."""
    times: dict[str, list[float]] = {kind: [] for kind in calls}
    for i in range(rounds + warm):
        for kind, call in calls.items():
            start = time.perf_counter()
            call()
            if i >= warm:
                times[kind].append(time.perf_counter() - start)
    return times


def report(args: argparse.Namespace, device: torch.device, files: list[bytes], lat: dict, thr: dict) -> None:
    body = len(json_body(files[:1]))
    print(f"device {args.device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{args.encoder} U-Net at {args.size} px, {args.syntax} DICOMs 3000 x 2500 / 2544 x 3056 12-bit "
          f"({len(files[0]) / 2**20:.1f} MiB, JSON request body {body / 2**20:.1f} MiB), torch {torch.__version__}")
    bare50, bare95 = statistics.median(lat["bare"]), percentile(lat["bare"], 95)
    print(f"\n| one DICOM per call ({args.n} calls) | p50 (s) | p95 (s) | p50 / bare | p95 / bare |\n|---|---:|---:|---:|---:|")
    for kind in KINDS:
        p50, p95 = statistics.median(lat[kind]), percentile(lat[kind], 95)
        print(f"| {kind} | {p50:.3f} | {p95:.3f} | {p50 / bare50:.2f}x | {p95 / bare95:.2f}x |")
    bare = statistics.median(thr["bare"])
    print(f"\n| batches of {args.batch} ({args.rounds} batches) | median (s) | images/s | time / bare |\n|---|---:|---:|---:|")
    for kind in KINDS:
        t = statistics.median(thr[kind])
        print(f"| {kind} | {t:.2f} | {args.batch / t:.1f} | {t / bare:.2f}x |")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data_config = DataConfig(image_size=args.size)
    run_config = RunConfig(model=ModelConfig(encoder=args.encoder), train=TrainConfig(variant="unet"))
    torch.manual_seed(0)
    model = build_model(run_config.model, "unet").eval()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        files = []
        for i, shape in enumerate([(3000, 2500), (2544, 3056), (3000, 2500), (2544, 3056)]):
            path = root / f"image-{i}.dcm"
            write_dicom(path, radiograph(*shape, seed=i), SYNTAXES[args.syntax], "MONOCHROME1" if i % 2 else "MONOCHROME2")
            files.append(path.read_bytes())
        small = root / "example.dcm"
        write_dicom(small, radiograph(256, 256, seed=9))
        t0 = time.perf_counter()
        tracking_uri = register(root, model, run_config, data_config, small.read_bytes())
        print(f"logged and registered in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        procs = []
        try:
            for command in (cxrgaze_serve_command, serve_command):
                procs.append(start_server(root, tracking_uri, args.device, args.threads, command))
            print(f"servers up in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            (_, url), (_, mlflow_url) = procs
            model = model.to(device)

            def bare(batch: list[bytes]) -> None:
                grid = np.stack([preprocess(data, data_config) for data in batch])  # (B, S, S) float16
                x = torch.from_numpy(grid).to(device, torch.float32).unsqueeze(1)  # (B, 1, S, S)
                with torch.no_grad():
                    mask_logits, logits = model(x)
                    torch.softmax(logits, dim=1).cpu(), torch.sigmoid(mask_logits).cpu()
                if device.type == "cuda":
                    torch.cuda.synchronize()

            os.environ["CXRGAZE_DEVICE"] = args.device  # the in-process pyfunc's device, as the servers'
            served = mlflow.pyfunc.load_model("models:/cxrgaze@champion").unwrap_python_model()

            def calls(batch: list[bytes]) -> dict:
                js, (raw, raw_type) = json_body(batch), raw_body(batch)
                return {"bare": lambda: bare(batch), "pyfunc": lambda: served.predict_bytes(batch, {}),
                        "raw": lambda: post(url, raw, raw_type, len(batch)),
                        "json": lambda: post(url, js, "application/json", len(batch)),
                        "mlflow json": lambda: post(mlflow_url, js, "application/json", len(batch))}

            singles = [calls([f]) for f in files]
            lat: dict[str, list[float]] = {kind: [] for kind in KINDS}
            for i in range(args.n + 3):
                for kind, t in measure(singles[i % len(files)], 1, 0).items():
                    if i >= 3:
                        lat[kind].append(t[0])
            thr = measure(calls([files[i % len(files)] for i in range(args.batch)]), args.rounds, 1)
        finally:
            for proc, _ in procs:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
    report(args, device, files, lat, thr)


if __name__ == "__main__":
    main()
