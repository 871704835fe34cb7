"""Distributed training fails loudly (issue 17): real ``torchrun`` jobs of two CPU ranks on loopback.

- Ranks that start from different places (``--out`` not shared: ``last.pt`` only where
  rank 1 sees it) stop before training, every rank with the same one-line error.
- A rank that goes silent (SIGSTOP) makes the others fail after ``CXRGAZE_DIST_TIMEOUT``
  seconds with an error naming it, and the MLflow run ends FAILED.
- A rank killed with ``kill -9`` leaves the MLflow run FAILED or KILLED, not RUNNING.
- SIGTERM to rank 0 (what torchrun sends the survivors) ends the MLflow run KILLED.

Each job runs ``cxrgaze train`` through tests/torchrun_faults.py, which writes each rank's
pid and replaces ``{rank}`` in the arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxrgaze.config import load_params, resolve_run_config
from cxrgaze.distributed import TIMEOUT_ENV, timeout_seconds
from cxrgaze.train import train

from conftest import free_port, tool_env

HERE = Path(__file__).resolve().parent
VARIANT = "baseline"
TIMEOUT = 20


def _params(path: Path, epochs: int) -> Path:
    path.write_text("model: {encoder: tu-tinynet_e, decoder_channels: [32, 16, 16, 8, 8]}\n"
                    f"train: {{epochs: {epochs}, batch_size: 16, lr: 0.003, device: cpu}}\n")
    return path


def _launch(tmp_path: Path, params: Path, out: str, prepared: Path, split: Path, *extra: str,
            env_update: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """``torchrun --nproc_per_node=2 ... cxrgaze train``; returns the launcher and the pid folder."""
    pids = tmp_path / "pids"
    pids.mkdir(exist_ok=True)
    env = {k: v for k, v in tool_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", **(env_update or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(HERE / "torchrun_faults.py"), str(pids),
           "train", "--variant", VARIANT, "--params", str(params), "--prepared", str(prepared), "--split", str(split),
           "--out", out, "--quiet", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return proc, pids


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the job did not end within {timeout:.0f} s (it hangs)\n--- stdout\n{out}\n--- stderr\n{err[-6000:]}")


def _failed(proc: subprocess.Popen) -> tuple[list[str], str]:
    """Wait for a job that must fail (non-zero exit): its ``cxrgaze train: `` lines, printed for the
    test log, and its stderr."""
    _, err = _finish(proc, 120)
    assert proc.returncode != 0, err[-6000:]
    lines = [line for line in err.splitlines() if line.startswith("cxrgaze train: ")]
    print("\n".join(lines))
    return lines, err


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_for(what: str, predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = _finish(proc, 5) if proc.poll() is None else proc.communicate()
            pytest.fail(f"never saw {what}\n--- stdout\n{out}\n--- stderr\n{err[-6000:]}")
        time.sleep(0.2)


def _run_status(out: Path) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_run(json.loads((out / "run.json").read_text())["run_id"]).info.status


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_timeout_setting():
    assert timeout_seconds({}) == 600
    assert timeout_seconds({TIMEOUT_ENV: "20"}) == 20
    for bad in ("0", "-3", "soon", "inf"):
        with pytest.raises(ValueError, match=TIMEOUT_ENV):
            timeout_seconds({TIMEOUT_ENV: bad})


@pytest.mark.slow
def test_ranks_that_resume_from_different_places_all_stop_before_training(tiny_prepared, tmp_path):
    """``--out`` that is not shared: rank 1 sees a ``last.pt`` (after epoch 1), rank 0 none."""
    prepared, split = tiny_prepared
    params = _params(tmp_path / "params.yaml", epochs=2)

    class Stop(Exception):
        pass

    class StopAfterFirstEpoch:
        def on_epoch_end(self, record):
            raise Stop

    with pytest.raises(Stop):
        train(resolve_run_config(load_params(params), VARIANT), prepared, split, tmp_path / "seed", progress=False,
              callbacks=[StopAfterFirstEpoch()])
    (tmp_path / "out1").mkdir()
    last = tmp_path / "out1" / "last.pt"
    last.write_bytes((tmp_path / "seed" / "last.pt").read_bytes())
    digest = _sha(last)

    proc, _ = _launch(tmp_path, params, str(tmp_path / "out{rank}"), prepared, split, "--no-track")
    out, err = _finish(proc, 300)
    assert proc.returncode != 0
    expected = (f"cxrgaze train: error: rank 0 resumes from none (no last.pt), rank 1 resumes from epoch 1 "
                f"(last.pt sha256 {digest[:12]}): --out must be shared storage that every rank sees")
    lines = [line for line in err.splitlines() if line.startswith("cxrgaze train: error:")]
    assert lines == [expected, expected], err[-6000:]  # both ranks, the same line
    assert "epoch" not in out  # nothing trained
    assert sorted(p.name for p in (tmp_path / "out0").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "out1").iterdir()) == ["last.pt"] and _sha(last) == digest


def _train_until_first_epoch(tmp_path: Path, prepared: Path, split: Path, timeout: int):
    """A tracked two-rank job of many epochs, once rank 0 wrote ``last.pt`` and ``run.json``."""
    params = _params(tmp_path / "params.yaml", epochs=200)
    out = tmp_path / "out"
    proc, pids = _launch(tmp_path, params, str(out), prepared, split, env_update={TIMEOUT_ENV: str(timeout)})
    _wait_for("the first epoch", lambda: (out / "last.pt").exists() and (out / "run.json").exists()
              and all((pids / f"rank{r}.pid").exists() for r in (0, 1)), proc)
    rank0, rank1 = (int((pids / f"rank{r}.pid").read_text()) for r in (0, 1))
    assert _run_status(out) == "RUNNING"
    return proc, out, rank0, rank1


@pytest.mark.slow
def test_a_silent_rank_fails_the_job_after_the_timeout_and_the_run(tiny_prepared, mlflow_store, tmp_path):
    prepared, split = tiny_prepared
    proc, out, rank0, rank1 = _train_until_first_epoch(tmp_path, prepared, split, TIMEOUT)
    os.kill(rank1, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        _wait_for("rank 0 ending", lambda: not _alive(rank0), proc, timeout=TIMEOUT + 120)
        waited = time.monotonic() - stopped
    finally:
        if _alive(rank1):
            os.kill(rank1, signal.SIGCONT)  # its pending SIGTERM from torchrun then ends it
    lines, err = _failed(proc)
    rank0 = [line for line in lines if line.startswith(
        f"cxrgaze train: error: rank 1 did not answer within {TIMEOUT} s ({TIMEOUT_ENV}) in ")]
    assert len(rank0) == 1 and "rank 0 stops the job" in rank0[0], err[-6000:]
    assert TIMEOUT - 1 <= waited < TIMEOUT + 90
    assert _run_status(out) == "FAILED"


@pytest.mark.slow
def test_a_killed_rank_does_not_leave_the_run_running(tiny_prepared, mlflow_store, tmp_path):
    prepared, split = tiny_prepared
    proc, out, rank0, rank1 = _train_until_first_epoch(tmp_path, prepared, split, 600)
    os.kill(rank1, signal.SIGKILL)
    ends, err = _failed(proc)
    assert _run_status(out) in ("FAILED", "KILLED"), err[-6000:]
    assert len(ends) == 1 and ("rank 1 left the job" in ends[0] or "rank 0 received SIGTERM" in ends[0]), err[-6000:]


def test_what_the_ranks_disagree_on_is_named_in_one_line():
    from cxrgaze.train.agreement import disagreement

    def facts(**change):
        base = {"resume": None, "config": {"train": {"lr": 0.003, "epochs": 2}}, "config_sha256": "c0" * 32,
                "data_version": "v1", "data": {"train": 45, "val": 12, "manifest": "m" * 64, "split": "s" * 64}}
        return {**base, **change}

    assert disagreement([facts(), facts()]) is None
    other = facts(config={"train": {"lr": 0.01, "epochs": 2}}, config_sha256="c1" * 32, data_version=None,
                  data={"train": 40, "val": 12, "manifest": "n" * 64, "split": "s" * 64})
    message = disagreement([facts(), facts(), other])
    assert "\n" not in message
    assert message == ("rank 2 runs another config (sha256 c1c1c1c1c1c1, not c0c0c0c0c0c0) differing in train.lr: "
                       "start every rank with the same --params and options; "
                       "ranks 0, 1 have data version v1, rank 2 has data version none (CXRGAZE_DATA_VERSION): "
                       "every rank must train on the same data; "
                       "ranks 0, 1 have 45 train / 12 val images (manifest.csv sha256 mmmmmmmmmmmm, split sha256 "
                       "ssssssssssss), rank 2 has 40 train / 12 val images (manifest.csv sha256 nnnnnnnnnnnn, split "
                       "sha256 ssssssssssss): --prepared and --split must hold the same data on every rank")


@pytest.mark.slow
def test_sigterm_to_rank_zero_ends_the_run_killed(tiny_prepared, mlflow_store, tmp_path):
    """What torchrun sends the survivors when a rank dies (or a scheduler sends the job)."""
    prepared, split = tiny_prepared
    proc, out, rank0, _ = _train_until_first_epoch(tmp_path, prepared, split, 600)
    os.kill(rank0, signal.SIGTERM)
    ends, err = _failed(proc)
    assert "cxrgaze train: interrupted: rank 0 received SIGTERM: torchrun stops the job's ranks when one of them " \
           "fails (see its error above)" in ends, err[-6000:]
    assert _run_status(out) == "KILLED"
