"""Several machines under ``torchrun``, on loopback: two agents as two "nodes", and elastic restarts.

The README's "Two machines" recipe, run for real on one host: one ``torchrun`` agent per
"node" (``--nnodes=2 --nproc_per_node=1 --node_rank=0/1``, c10d rendezvous on
``127.0.0.1``, one ``--rdzv-id``), both training the same job into one ``--out`` folder
that both see (a temporary folder here, NFS or similar between real machines).

* The two-agent job gives what the one-agent, two-process job
  (``torchrun --nproc_per_node=2``) of the same training gives: the same ranks, the same
  shards, the same computation. ``best.pt`` agrees within the tolerances of
  tests/test_distributed.py (two ranks against one process) and ``history.csv`` is
  byte-identical.
* ``--max-restarts=1``: the worker of rank 1 is killed with SIGKILL mid-training (after
  epoch 1's ``last.pt``); its agent restarts the group, the other agent follows, the job
  resumes from ``last.pt`` (epoch 1 is not trained again), exits 0 and ends with the
  uninterrupted run's ``history.csv`` and ``best.pt``. Both agents run with
  ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: with torch's default (the workers share the
  agents' rendezvous store) the restarted group cannot connect (``Gloo connectFullMesh
  failed ... Connection refused``): the agent whose worker failed counts a restart, the
  other one restarts for the membership change without counting it, and the workers of the
  new round meet the old round's keys (pytorch/pytorch#135712).

Every launch runs ``python -m cxrgaze.cli train --no-track`` (no MLflow), one intra-op
thread per worker (``OMP_NUM_THREADS=1``), the tiny U-Net on tu-tinynet_e at 32 px.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from cxrgaze.checkpoint import load_checkpoint

from conftest import free_port, tool_env

VARIANT = "unet"
EPOCHS = 3
W_RTOL, W_ATOL = 1e-5, 1e-6  # as tests/test_distributed.py (two ranks against one process)
PARAMS = (
    "model: {encoder: tu-tinynet_e, decoder_channels: [32, 16, 16, 8, 8]}\n"
    f"train: {{epochs: {EPOCHS}, batch_size: 16, lr: 0.003, device: cpu}}\n"
)
TIMEOUT = 480

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = {k: v for k, v in tool_env().items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                        "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train_args(job: dict, out: Path) -> list[str]:
    return ["-m", "cxrgaze.cli", "train", "--variant", VARIANT, "--params", str(job["params"]),
            "--prepared", str(job["prepared"]), "--split", str(job["split"]), "--out", str(out), "--no-track"]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _node(node_rank: int, endpoint: str, rdzv_id: str, *extra: str) -> list[str]:
    """The agent of one "machine": the README's command, with --local-addr on loopback."""
    return _torchrun("--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}", "--local-addr=127.0.0.1", *extra)


def _start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen(cmd, env=_env() | env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _wait(procs: list[subprocess.Popen], logs: list[Path], timeout: float = TIMEOUT) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _stop(procs)
        pytest.fail(f"torchrun still running after {timeout:.0f} s\n" + _tails(logs))
    return [p.returncode for p in procs]


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-5000:]}" for log in logs)


def _descendants(root: int) -> dict[int, dict[str, str]]:
    """The processes under ``root`` (from /proc), each with its environment."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                pass
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, ppid in parent.items():
            if ppid == pid and child not in found:
                try:
                    raw = Path(f"/proc/{child}/environ").read_bytes()
                except OSError:
                    continue
                found[child] = dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)
                frontier.append(child)
    return found


def _assert_same_run(out: Path, ref: Path) -> None:
    """Same history.csv (byte for byte), same best epoch, best.pt's weights within tolerance."""
    assert (out / "history.csv").read_text() == (ref / "history.csv").read_text()
    mine, theirs = load_checkpoint(out / "best.pt"), load_checkpoint(ref / "best.pt")
    assert mine["epoch"] == theirs["epoch"]
    assert mine["model"].keys() == theirs["model"].keys()
    for k, t in theirs["model"].items():
        m = mine["model"][k]
        assert m.shape == t.shape and torch.allclose(m.double(), t.double(), rtol=W_RTOL, atol=W_ATOL), \
            (k, (m.double() - t.double()).abs().max().item())


@pytest.fixture(scope="module")
def job(tiny_prepared, tmp_path_factory):
    """The training job, and its one-agent two-process run (the reference)."""
    prepared, split = tiny_prepared
    root = tmp_path_factory.mktemp("multinode")
    params = root / "params.yaml"
    params.write_text(PARAMS)
    job = {"root": root, "params": params, "prepared": prepared, "split": split, "ref": root / "one-agent"}
    log = root / "one-agent.log"
    t0 = time.monotonic()
    proc = _start(_torchrun("--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                            *_train_args(job, job["ref"])), log)
    assert _wait([proc], [log]) == [0], _tails([log])
    print(f"one agent, two processes: {time.monotonic() - t0:.1f} s")
    history = load_checkpoint(job["ref"] / "last.pt")["history"]
    assert len(history) == EPOCHS and len({r["train_loss"] for r in history}) == EPOCHS  # it trained
    return job


def test_two_agents_as_two_nodes_match_one_agent_with_two_processes(job):
    root, out = job["root"], job["root"] / "two-nodes"  # one folder both "machines" see
    endpoint, rdzv_id = f"127.0.0.1:{free_port()}", f"cxrgaze-test-{uuid.uuid4().hex[:8]}"
    logs = [root / "node0.log", root / "node1.log"]
    t0 = time.monotonic()
    procs = [_start(_node(n, endpoint, rdzv_id, *_train_args(job, out)), logs[n]) for n in (0, 1)]
    try:
        assert _wait(procs, logs) == [0, 0], _tails(logs)
    finally:
        _stop(procs)
    print(f"two agents: {time.monotonic() - t0:.1f} s")
    # c10d ranks the agents by (address, pid), not by --node_rank: on loopback normally node 0
    # is rank 0, but either may be. Rank 0 reports once; the other worker is rank 1 of the
    # same job and prints nothing.
    texts = sorted((log.read_text() for log in logs), key=lambda t: f"{VARIANT}: best epoch" in t)
    quiet, rank0 = texts
    assert rank0.count(f"{VARIANT}: best epoch") == 1, rank0
    assert f"{VARIANT}: best epoch" not in quiet and f"{VARIANT} epoch 1/{EPOCHS}" not in quiet, quiet
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "history.csv", "last.pt", "metrics.json"]
    assert load_checkpoint(out / "last.pt").get("shards", 1) == 2  # two ranks, one job
    _assert_same_run(out, job["ref"])


def test_a_killed_worker_restarts_the_group_which_resumes_from_last_pt(job):
    """--max-restarts=1 on both agents; SIGKILL of rank 1's worker during epoch 2 (after epoch 1's last.pt)."""
    root, out = job["root"], job["root"] / "elastic"
    endpoint, rdzv_id = f"127.0.0.1:{free_port()}", f"cxrgaze-test-{uuid.uuid4().hex[:8]}"
    logs = [root / "elastic-node0.log", root / "elastic-node1.log"]
    t0 = time.monotonic()
    procs = [_start(_node(n, endpoint, rdzv_id, "--max-restarts=1", *_train_args(job, out)), logs[n],
                    TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1") for n in (0, 1)]
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "last.pt").exists():
            assert all(p.poll() is None for p in procs), "an agent exited before epoch 1 ended\n" + _tails(logs)
            assert time.monotonic() < deadline, "no last.pt\n" + _tails(logs)
            time.sleep(0.05)
        victims = [pid for agent in procs for pid, env in _descendants(agent.pid).items()
                   if env.get("RANK") == "1" and env.get("TORCHELASTIC_RESTART_COUNT") == "0"]
        assert len(victims) == 1, (victims, _tails(logs))
        assert not (out / "metrics.json").exists(), "the job ended before the kill"
        os.kill(victims[0], signal.SIGKILL)
        killed_after = load_checkpoint(out / "last.pt")["epoch"]
        assert killed_after < EPOCHS - 1
        assert _wait(procs, logs) == [0, 0], _tails(logs)
    finally:
        _stop(procs)
    print(f"elastic run, killed after epoch {killed_after + 1}: {time.monotonic() - t0:.1f} s")
    both = logs[0].read_text() + logs[1].read_text()  # rank 0's output is in one of them
    # resumed, not restarted from scratch: epoch 1 was trained (and reported) once
    assert both.count(f"{VARIANT} epoch 1/{EPOCHS}: train_loss=") == 1, both
    assert both.count(f"{VARIANT} epoch {EPOCHS}/{EPOCHS}: train_loss=") == 1, both
    assert both.count(f"{VARIANT}: best epoch") == 1, both
    assert (out / "best.pt").is_file() and (out / "metrics.json").is_file()
    assert not (out / "cxrgaze.lock").exists()  # the restarted rank 0 took over the killed attempt's lock and released it
    _assert_same_run(out, job["ref"])  # resume is exact: the uninterrupted run's history and weights
