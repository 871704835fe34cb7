"""The DVC stage `train@<variant>` (pipelines/train.py): outputs that depend only on the
inputs, and resuming from state kept outside them."""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tool_env

pytestmark = pytest.mark.timeout(600)

PARAMS = """\
model: {encoder: tu-tinynet_e, decoder_channels: [32, 16, 16, 8, 8]}
train: {epochs: 3, batch_size: 8, lr: 0.003, device: cpu, seeds: [0, 1]}
variants: {unet: {}}
"""


def _stage(tmp_path: Path, prepared: Path, split: Path, name: str) -> tuple[list[str], Path, Path]:
    out, resume = tmp_path / name / "train", tmp_path / name / "resume"
    cmd = [sys.executable, str(ROOT / "pipelines" / "train.py"), "unet", str(prepared), str(split),
           str(tmp_path / "best.yaml"), str(out), str(resume)]
    return cmd, out, resume


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _unet_runs(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        return db.execute("SELECT COUNT(*) FROM runs WHERE name = 'unet'").fetchone()[0]


def _checkpoints_of_finished_runs(tmp_path: Path) -> list[str]:
    """The checkpoint tags of the FINISHED runs named unet (evaluate finds runs by them)."""
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        return [v for (v,) in db.execute(
            "SELECT t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE r.name = 'unet' "
            "AND r.status = 'FINISHED' AND t.key = 'cxrgaze.checkpoint_sha256'")]


def test_killed_stage_keeps_finished_seeds_resumes_the_next_and_matches_an_uninterrupted_run(tiny_prepared, tmp_path):
    prepared, split = tiny_prepared
    (tmp_path / "params.yaml").write_text(PARAMS)
    (tmp_path / "best.yaml").write_text("unet: {}\n")
    env = {**tool_env(), "CXRGAZE_PARAMS": str(tmp_path / "params.yaml")}

    cmd, ref_out, ref_resume = _stage(tmp_path, prepared, split, "ref")
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (ref_out / "seed0").iterdir()) == ["best.pt", "history.csv", "metrics.json"]
    assert not ref_resume.exists(), "resume state is removed when the stage finishes"
    assert _unet_runs(tmp_path) == 2

    cmd, out, resume = _stage(tmp_path, prepared, split, "killed")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (resume / "seed1" / "last.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (resume / "seed0" / "metrics.json").exists(), "seed 0 finished before the kill"
    assert not (resume / "seed1" / "metrics.json").exists(), "seed 1 finished before the kill"

    again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "seed0: finished before the stage was interrupted; kept" in again.stdout
    assert "seed1: resuming an interrupted run from last.pt" in again.stdout
    assert _unet_runs(tmp_path) == 4, "no new MLflow run: seed 0 kept, seed 1 resumed into its own run"
    # What DVC versions is byte for byte what an uninterrupted run writes, and every run
    # (the resumed one too) ended FINISHED, tagged with its checkpoint.
    assert _digests(out) == _digests(ref_out)
    best = [_digests(ref_out)[f"seed{s}/best.pt"] for s in (0, 1)]
    assert sorted(_checkpoints_of_finished_runs(tmp_path)) == sorted(best * 2)


def test_resume_state_of_other_inputs_is_discarded(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "pipelines"))
    try:
        import train as stage
    finally:
        sys.path.remove(str(ROOT / "pipelines"))
    folder = tmp_path / "seed0"
    folder.mkdir()
    for name in stage.DELIVERED:
        (folder / name).write_text("x")
    (folder / stage.FINGERPRINT).write_text("written-for-other-inputs\n")
    assert stage.resume_state(folder, "current") is False
    assert "resume state of other inputs; discarded" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == [stage.FINGERPRINT]
    for name in stage.DELIVERED:
        (folder / name).write_text("x")
    assert stage.resume_state(folder, "current") is True, "a finished seed of the same inputs is kept"
