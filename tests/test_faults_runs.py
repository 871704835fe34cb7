"""Faults that involve several processes, produced for real (issue 16, items 4 and 5).

* Two runs into one output folder: a second ``cxrgaze train`` into the folder a live one
  trains in is refused with one line naming the first process; once that process is
  killed (kill -9), its lock is stale and the next run takes the folder over and resumes.
  Under ``torchrun`` the ranks of one job share the folder and are refused together.
* A tune worker killed mid-trial on a ``journal:`` storage (no Optuna heartbeat there):
  the next worker marks its trial FAIL, queues it again, and the study reaches
  ``n_trials`` trials. With ``--workers 2`` and the second worker killed, the parent reaps
  it at once (a zombie must not look alive) and the study still ends; past ``MAX_RETRY``
  the trial is said not to be retried.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from cxrgaze.checkpoint import load_checkpoint
from cxrgaze.cli import main as cli_main
from cxrgaze.config import tune_config
from cxrgaze.outlock import LOCK_FILE, acquire, output_lock, process_alive, process_start, release
from cxrgaze.tune.storage import MAX_RETRY, TRIAL_RUN_ATTR, WORKER_ATTR, live_trials, open_study
from cxrgaze.tune.worker import _Worker, run_worker

from conftest import free_port, tool_env

TINY = "model: {encoder: tu-tinynet_e, decoder_channels: [32, 16, 16, 8, 8]}\n"


def _wait_for(check, what: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _lock_pid(folder: Path) -> int | None:
    try:
        return json.loads((folder / LOCK_FILE).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _train_cmd(params: Path, prepared: Path, split: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cxrgaze.cli", "train", "--variant", "unet", "--params", str(params),
            "--prepared", str(prepared), "--split", str(split), "--out", str(out), "--quiet", *extra]


def _run_status(db: Path, run_id: str) -> str:
    import sqlite3

    with sqlite3.connect(db) as con:
        return con.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()[0]


@pytest.mark.slow
def test_a_second_train_into_a_busy_folder_is_refused_and_a_dead_runs_lock_is_taken_over(
        tiny_prepared, mlflow_store, tmp_path):
    prepared, split = tiny_prepared
    params = tmp_path / "params.yaml"
    params.write_text(TINY + "train: {epochs: 4, batch_size: 8, lr: 0.003, device: cpu}\n")
    out = tmp_path / "run"
    cmd = _train_cmd(params, prepared, split, out)

    first = subprocess.Popen(cmd, env=tool_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Frozen (SIGSTOP) once it holds the folder and has checkpointed an epoch: alive, mid-run.
        _wait_for(lambda: _lock_pid(out) == first.pid and (out / "last.pt").exists(), "the first run's checkpoint",
                  first)
        first.send_signal(signal.SIGSTOP)
        assert not (out / "metrics.json").exists(), "the first run finished before it was stopped"
        run_id = json.loads((out / "run.json").read_text())["run_id"]
        last_pt = (out / "last.pt").read_bytes()

        second = subprocess.run(cmd, env=tool_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert lines[0].startswith("cxrgaze train: error: ")
        assert f"process {first.pid} on host {socket.gethostname()}" in lines[0] and "still running" in lines[0]
        # The refused run touched nothing: not the checkpoint, not the first run's MLflow run.
        assert (out / "last.pt").read_bytes() == last_pt
        assert json.loads((out / "run.json").read_text())["run_id"] == run_id
        assert _run_status(tmp_path / "mlflow.db", run_id) == "RUNNING"
    finally:
        first.kill()  # kill -9 (a stopped process dies of SIGKILL too)
        first.wait()
    assert _lock_pid(out) == first.pid, "a killed process leaves its lock file behind"
    done_epochs = load_checkpoint(out / "last.pt")["epoch"] + 1

    third = subprocess.run(cmd, env=tool_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    history = load_checkpoint(out / "last.pt")["history"]
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]
    assert 1 <= done_epochs < 4 and json.loads((out / "run.json").read_text())["run_id"] == run_id, \
        "the stale lock was taken over and the killed run resumed (same MLflow run)"
    assert _run_status(tmp_path / "mlflow.db", run_id) == "FINISHED"
    assert not (out / LOCK_FILE).exists(), "the lock is removed when the run ends"


def test_a_lock_of_another_host_is_kept_and_the_message_says_why(tiny_prepared, tmp_path, capsys):
    prepared, split = tiny_prepared
    params = tmp_path / "params.yaml"
    params.write_text(TINY + "train: {epochs: 1, batch_size: 8, device: cpu}\n")
    out = tmp_path / "run"
    out.mkdir()
    lock = {"pid": os.getpid(), "host": "gpu-node-7.invalid", "started": 1}  # e.g. a shared file system
    (out / LOCK_FILE).write_text(json.dumps(lock) + "\n")
    argv = ["train", "--variant", "unet", "--params", str(params), "--prepared", str(prepared), "--split", str(split),
            "--out", str(out), "--quiet", "--no-track"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"process {os.getpid()} on host gpu-node-7.invalid" in err and "cannot be checked" in err
    assert f"delete {(out / LOCK_FILE).resolve()}" in err
    assert json.loads((out / LOCK_FILE).read_text()) == lock, "never broken silently"
    assert not (out / "last.pt").exists()

    (out / LOCK_FILE).unlink()  # the user checked that run is over
    assert cli_main(argv) == 0
    assert (out / "best.pt").exists() and not (out / LOCK_FILE).exists()


def test_the_lock_is_reentrant_in_one_process_and_released_on_error(tmp_path):
    with output_lock(tmp_path / "a") as path:
        again = acquire(tmp_path / "a")  # train_tracked holds it around train(), which takes it again
        release(again)
        assert path.exists()
    assert not path.exists()
    with pytest.raises(KeyError):
        with output_lock(tmp_path / "a"):
            raise KeyError("boom")
    assert not (tmp_path / "a" / LOCK_FILE).exists()


def test_different_config_refusal_names_the_command_line_flag(tiny_prepared, tmp_path, capsys):
    prepared, split = tiny_prepared
    params = tmp_path / "params.yaml"
    params.write_text(TINY + "train: {epochs: 1, batch_size: 8, lr: 0.003, device: cpu}\n")
    argv = ["train", "--variant", "unet", "--params", str(params), "--prepared", str(prepared), "--split", str(split),
            "--out", str(tmp_path / "run"), "--quiet", "--no-track"]
    assert cli_main(argv) == 0
    capsys.readouterr()
    assert cli_main([*argv, "--lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cxrgaze train: error: "), err
    assert "different config" in err and "--no-resume" in err and "resume=False" not in err
    assert cli_main([*argv, "--lr", "0.01", "--no-resume"]) == 0  # what the message says works


def test_a_torchrun_job_into_a_busy_folder_stops_on_every_rank(tiny_prepared, tmp_path):
    """Rank 0 alone takes the lock for the job and tells the other ranks: a refused job
    ends at once on every rank with the same line (no rank waits for a collective)."""
    prepared, split = tiny_prepared
    params = tmp_path / "params.yaml"
    params.write_text(TINY + "train: {epochs: 1, batch_size: 16, device: cpu}\n")
    out = tmp_path / "run"
    env = {k: v for k, v in tool_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "cxrgaze.cli", *_train_cmd(params, prepared, split, out)[3:],
           "--no-track"]
    with output_lock(out):  # this test process is the live owner
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # (the ranks share one stderr: found by pattern, not by line, in case their writes interleave)
    refusals = [m for m in re.findall(r"cxrgaze train: error: .*?or use another output folder", proc.stderr)
                if f"process {os.getpid()} on host" in m]
    assert len(refusals) == 2, proc.stderr[-4000:]  # one per rank, the same line
    assert len(set(refusals)) == 1
    assert sorted(p.name for p in out.iterdir()) == [], "nothing written"


# --- tuning on a journal file --------------------------------------------------------------------

TUNE_PARAMS = {
    "model": {"encoder": "tu-tinynet_e", "decoder_channels": [32, 16, 16, 8, 8]},
    "train": {"batch_size": 16, "lr": 0.003, "device": "cpu"},
    "variants": {"unet": {}, "set3-gbp": {}, "set3-deconv": {}},
}


def _journal_trials(path: Path) -> list[optuna.trial.FrozenTrial]:
    if not path.exists():
        return []
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    try:
        return optuna.load_study(study_name="cxrgaze-set3-gbp", storage=storage).get_trials()
    except KeyError:  # the study is not created yet
        return []


@pytest.mark.slow
def test_a_killed_journal_worker_s_trial_is_failed_and_retried(tiny_prepared, mlflow_store, tmp_path, capsys):
    prepared, split = tiny_prepared
    journal = tmp_path / "optuna.journal"
    params = {**TUNE_PARAMS, "tune": {"storage": f"journal:{journal}", "variants": ["set3-gbp"], "n_trials": 2,
                                      "epochs": 1, "n_startup_trials": 10, "n_warmup_steps": 0,
                                      "space": {"alpha": {"low": 0.0, "high": 1.0}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "cxrgaze.cli", "tune", "--variant", "set3-gbp", "--params",
           str(tmp_path / "params.yaml"), "--prepared", str(prepared), "--split", str(split),
           "--out", str(tmp_path / "best.yaml")]
    worker = subprocess.Popen(cmd, env=tool_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: any(t.state == TrialState.RUNNING and (t.user_attrs.get(WORKER_ATTR) or {}).get("pid") == worker.pid
                              and TRIAL_RUN_ATTR in t.user_attrs for t in _journal_trials(journal)),
                  "the worker's first trial", worker)
    finally:
        worker.kill()  # kill -9 mid-trial
        worker.wait()
    [stale] = _journal_trials(journal)
    assert stale.state == TrialState.RUNNING, "Optuna alone leaves it RUNNING forever"

    cfg = tune_config(params)
    run_worker(params, cfg, "set3-gbp", prepared, split)  # the next worker, in this process
    assert "cxrgaze-set3-gbp: trial 0 lost its worker (process gone); marked FAIL and queued again" \
        in capsys.readouterr().out.splitlines()
    trials = open_study(cfg, "set3-gbp").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    retry = trials[1]
    assert retry.system_attrs.get("retry_history") == [0] and retry.params == stale.params
    assert retry.user_attrs[WORKER_ATTR]["pid"] == os.getpid(), "the retry is this worker's now"
    assert [t.number for t in live_trials(open_study(cfg, "set3-gbp"))] == [1, 2]  # n_trials reached

    import sqlite3

    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        status, = con.execute("SELECT status FROM runs WHERE run_uuid = ?",
                              (stale.user_attrs[TRIAL_RUN_ATTR],)).fetchone()
        error, = con.execute("SELECT value FROM tags WHERE run_uuid = ? AND key = 'cxrgaze.error'",
                             (stale.user_attrs[TRIAL_RUN_ATTR],)).fetchone()
    assert status == "FAILED" and error == f"worker process {worker.pid} on {socket.gethostname()} is gone"


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, oldest first."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid:
                kids.append((int(fields[19]), int(entry.name)))
    return [k for _, k in sorted(kids)]


def _spawned_workers(pid: int) -> list[int]:
    """The multiprocessing (spawn) workers of process ``pid``, in the order they started
    (the resource tracker left out)."""
    workers = []
    for kid in _children(pid):
        try:
            cmdline = Path(f"/proc/{kid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            workers.append(kid)
    return workers


@pytest.mark.slow
def test_a_killed_second_journal_worker_is_reaped_and_the_study_completes(tiny_prepared, mlflow_store, tmp_path):
    """``tune --workers 2`` on a journal file, worker 1 (not the first) killed with kill -9
    mid-trial: the parent reaps it at once (no zombie that looks alive), worker 0 fails its
    trial, runs the retry, and the study reaches ``n_trials`` instead of waiting forever."""
    prepared, split = tiny_prepared
    journal = tmp_path / "optuna.journal"
    params = {**TUNE_PARAMS, "tune": {"variants": ["set3-gbp"], "n_trials": 2, "epochs": 1, "n_startup_trials": 10,
                                      "n_warmup_steps": 0, "heartbeat_interval": 1,
                                      "space": {"alpha": {"low": 0.0, "high": 1.0}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "cxrgaze.cli", "tune", "--variant", "set3-gbp", "--params",
           str(tmp_path / "params.yaml"), "--prepared", str(prepared), "--split", str(split),
           "--out", str(tmp_path / "best.yaml"), "--storage", f"journal:{journal}", "--workers", "2"]
    env = {**tool_env(), "OMP_NUM_THREADS": "1"}
    tune = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        second: list[int] = []

        def second_worker_runs_a_trial() -> bool:
            if not second:
                workers = _spawned_workers(tune.pid)
                if len(workers) < 2:
                    return False
                second.append(workers[1])
            return any(t.state == TrialState.RUNNING and (t.user_attrs.get(WORKER_ATTR) or {}).get("pid") == second[0]
                       for t in _journal_trials(journal))

        _wait_for(second_worker_runs_a_trial, "the second worker's trial", tune)
        os.kill(second[0], signal.SIGKILL)  # kill -9 mid-trial
        try:
            out, err = tune.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail("the study never ended: the other worker waits for the killed one's trial")
    finally:
        if tune.poll() is None:
            os.killpg(tune.pid, signal.SIGKILL)
            tune.wait()
    assert f"tune-set3-gbp-1 (exit {-signal.SIGKILL})" in err, err[-3000:]
    trials = _journal_trials(journal)
    killed = [t for t in trials if (t.user_attrs.get(WORKER_ATTR) or {}).get("pid") == second[0]]
    assert [t.state for t in killed] == [TrialState.FAIL]
    assert "marked FAIL and queued again" in out, out[-3000:]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    live = live_trials(optuna.load_study(study_name="cxrgaze-set3-gbp", storage=storage))
    assert [t.state for t in live] == [TrialState.COMPLETE] * 2, "n_trials reached"


def test_a_zombie_process_is_not_alive():
    """An exited child not yet reaped (a zombie) still answers ``kill(pid, 0)``: it must
    count as gone, or its trial looks running forever."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        _wait_for(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                  "the child to exit", timeout=30)
        os.kill(pid, 0)  # a zombie: the signal still reaches it
        assert not process_alive(pid)
        assert not process_alive(pid, process_start(pid))
    finally:
        os.waitpid(pid, 0)
    assert process_alive(os.getpid(), process_start(os.getpid()))


def test_a_dead_worker_s_trial_past_max_retry_is_not_said_to_be_queued(tmp_path, capsys):
    journal = tmp_path / "optuna.journal"
    params = {**TUNE_PARAMS, "tune": {"storage": f"journal:{journal}", "variants": ["set3-gbp"], "n_trials": 1}}
    cfg = tune_config(params)
    study = open_study(cfg, "set3-gbp")
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a process of this host that is gone
    for _ in range(MAX_RETRY):  # trial 0 and its retries, each lost its worker
        study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    trial = study.ask()  # the last retry allowed, its worker gone too
    trial.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": pid, "started": None})
    study._storage.set_trial_system_attr(trial._trial_id, "retry_history", list(range(MAX_RETRY)))
    study._storage.set_trial_system_attr(trial._trial_id, "failed_trial", 0)

    worker = _Worker.__new__(_Worker)  # only what _next_action uses: no MLflow, no training
    worker.study, worker.cfg, worker.heartbeat = study, cfg, False
    assert worker._next_action() == "stop"
    out = capsys.readouterr().out
    assert (f"cxrgaze-set3-gbp: trial {trial.number} lost its worker (process gone); marked FAIL, not retried "
            f"(MAX_RETRY={MAX_RETRY} reached)") in out.splitlines(), out
    assert "queued again" not in out
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL] * (MAX_RETRY + 1), "nothing queued"
