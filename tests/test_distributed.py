"""Training under ``torchrun``: two CPU processes (gloo) against one process.

The reference is one process that cuts every global batch into the same two contiguous
shards and accumulates their weighted gradients (``train(..., micro_batches=2)``): the
same computation as two ranks, batch-norm statistics per shard and dropout seeded per
shard included (:mod:`cxrgaze.distributed`). Only the order of floating-point sums may
differ: with two ranks the gradient is ``g0 + g1`` on both sides (gloo's sum of two
addends is the same float as autograd's accumulation), so equality is expected, but the
comparison uses tolerances that also hold where the order of a sum of more than two terms
changes (more ranks, NCCL's ring or tree): per-epoch train loss terms and validation AUCs
within ``REL = 1e-5`` relative, final weights and batch-norm statistics within
``rtol=1e-5, atol=1e-6``. (A validation AUC is a rank statistic: it moves in steps, not
smoothly, if logits that close change their order; at these tolerances they do not.)

One ``torchrun`` launch (tests/torchrun_train.py) serves the tests of this module: the CLI
for ``set3-gbp`` (the second-order heatmap loss) and ``unet``, 2 epochs, global batch 16
(the 45 training images give batches of 16, 16 and 13, so the last batch's shards are
uneven, 7 and 6), a run interrupted after one epoch and resumed, and checks of the
collectives.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrgaze.checkpoint import load_checkpoint
from cxrgaze.config import load_params, resolve_run_config
from cxrgaze.distributed import (DistContext, all_reduce_gradients, all_reduce_sums, broadcast_object, context_from_env,
                                 is_active)
from cxrgaze.train import TrainingDiverged, train

from conftest import free_port, tool_env

HERE = Path(__file__).resolve().parent
VARIANTS = ("set3-gbp", "unet")
EPOCHS = 2
REL = 1e-5
W_RTOL, W_ATOL = 1e-5, 1e-6
PARAMS = (
    "model: {encoder: tu-tinynet_e, decoder_channels: [32, 16, 16, 8, 8]}\n"
    f"train: {{epochs: {EPOCHS}, batch_size: 16, lr: 0.003, device: cpu}}\n"
)


@pytest.fixture(scope="module")
def job(tiny_prepared, tmp_path_factory):
    """The two-rank launch: its folders, its stdout and each rank's report."""
    prepared, split = tiny_prepared
    root = tmp_path_factory.mktemp("torchrun")
    params = root / "params.yaml"
    params.write_text(PARAMS)
    spy = root / "spy"
    spy.mkdir()
    env = {k: v for k, v in tool_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(HERE / "torchrun_train.py"),
           str(spy), str(root / "out"), str(params), str(prepared), str(split), ",".join(VARIANTS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-6000:]}"
    reports = [json.loads((spy / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"root": root, "out": root / "out", "params": params, "stdout": proc.stdout, "reports": reports}


@pytest.fixture(scope="module")
def reference(job, tiny_prepared, tmp_path_factory):
    """One process, each global batch as the same two shards (micro_batches=2), per variant."""
    prepared, split = tiny_prepared
    root = tmp_path_factory.mktemp("one-process")
    params = load_params(job["params"])
    return {v: train(resolve_run_config(params, v), prepared, split, root / v, progress=False, micro_batches=2)
            for v in VARIANTS}


def _strip(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def _max_rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_ranks_match_one_process_on_the_same_global_batches(variant, job, reference):
    ref = reference[variant]
    ckpt = load_checkpoint(job["out"] / variant / "last.pt")
    got = _strip(ckpt["history"])
    want = _strip(ref.history)
    assert len(got) == len(want) == EPOCHS
    assert [list(r) for r in got] == [list(r) for r in want]  # same records, same keys, same order
    worst = {}
    for g, w in zip(got, want):
        for k in g:
            if k.startswith(("train_", "val_")):
                worst[k] = max(worst.get(k, 0.0), _max_rel(g[k], w[k]))
                assert g[k] == pytest.approx(w[k], rel=REL, abs=1e-12), (k, g[k], w[k])
            else:
                assert g[k] == w[k], k
    assert ckpt["best_epoch"] == ref.best_epoch
    metrics = json.loads((job["out"] / variant / "metrics.json").read_text())
    assert metrics["best_epoch"] == ref.best_epoch and metrics["val_auc_macro"] == pytest.approx(ref.best["val_auc_macro"], rel=REL)

    mine = ckpt["model"]
    theirs = load_checkpoint(ref.out_dir / "last.pt")["model"]
    assert mine.keys() == theirs.keys()
    diffs = {k: (mine[k].double() - theirs[k].double()).abs().max().item() for k in mine if mine[k].numel()}
    for k in mine:
        assert torch.allclose(mine[k].double(), theirs[k].double(), rtol=W_RTOL, atol=W_ATOL), (k, diffs.get(k))
    print(f"{variant}: max relative difference of logged metrics {max(worst.values()):.3g}, "
          f"max absolute difference of weights/buffers {max(diffs.values()):.3g}")


def test_the_compared_runs_trained(job, reference):
    """Guard against a vacuous comparison: the loss moved from one epoch to the next."""
    for variant in VARIANTS:
        hist = [r["train_loss"] for r in reference[variant].history]
        assert all(math.isfinite(v) for v in hist) and hist[0] != hist[1]


def test_only_rank_zero_writes_files_and_prints(job):
    rank0, rank1 = (r["recorded"] for r in job["reports"])
    assert rank1 == [], f"rank 1 wrote {rank1}"
    for folder in (*VARIANTS, "resumed"):
        written = {Path(p).name for p in rank0 if Path(p).parent == job["out"] / folder}
        assert written == {"best.pt.tmp", "last.pt.tmp", "metrics.json", "history.csv"}, (folder, written)
        assert sorted(p.name for p in (job["out"] / folder).iterdir()) == ["best.pt", "history.csv", "last.pt", "metrics.json"]
    lines = job["stdout"].splitlines()
    for variant in VARIANTS:
        assert sum(line.startswith(f"{variant}: best epoch") for line in lines) == 1, job["stdout"]
        for e in range(1, EPOCHS + 1):
            assert sum(line.startswith(f"{variant} epoch {e}/{EPOCHS}: train_loss=") for line in lines) == 1, job["stdout"]
    assert job["reports"][0]["cli_rc"] == job["reports"][1]["cli_rc"] == dict.fromkeys(VARIANTS, 0)


def test_resume_under_two_ranks_continues_exactly(job):
    """Every rank reloads rank 0's last.pt; the resumed run is the uninterrupted one."""
    uninterrupted = _strip(load_checkpoint(job["out"] / VARIANTS[0] / "last.pt")["history"])
    for report in job["reports"]:
        assert report["interrupted"] is True
        assert report["resumed_history"] == uninterrupted
    assert _strip(load_checkpoint(job["out"] / "resumed" / "last.pt")["history"]) == uninterrupted


def test_collectives_on_two_ranks(job):
    for rank, report in enumerate(job["reports"]):
        c = report["collectives"]
        assert (c["rank"], c["world_size"], c["active"]) == (rank, 2, True)
        assert c["sums"] == {"a": 4.0, "b": 1.0}
        assert c["broadcast"] == {"from": 0}
        # weight 0.5: (1 + 2) / 2; a gradient present on rank 0 only counts as zero on rank 1;
        # a parameter without gradient on any rank keeps None (the optimizer skips it)
        assert c["grads"] == {"both": [[1.5, 1.5], [1.5]], "rank0": [[2.0, 2.0], [2.0]], "none": [None, None]}
    assert job["reports"][0]["collectives"]["broadcast_module"] == job["reports"][1]["collectives"]["broadcast_module"]


# ----------------------------------------------------------------------------- one process


def test_context_from_torchrun_environment():
    assert context_from_env({}) == DistContext(0, 1, 0)
    ctx = context_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.is_distributed) == (3, 4, 1, False, True)
    assert ctx.device(torch.device("cuda")) == torch.device("cuda", 1)
    assert ctx.device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="names one GPU"):
        ctx.device(torch.device("cuda", 0))
    assert DistContext().device(torch.device("cuda", 2)) == torch.device("cuda", 2)
    with pytest.raises(ValueError, match="inconsistent"):
        context_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="integers"):
        context_from_env({"RANK": "zero", "WORLD_SIZE": "2"})


def test_collectives_are_the_identity_in_one_process():
    assert not is_active()
    assert all_reduce_sums({"a": 1.5}) == {"a": 1.5}
    assert broadcast_object([1, 2]) == [1, 2]
    model = torch.nn.Linear(2, 1)
    model.weight.grad = torch.ones_like(model.weight)
    all_reduce_gradients(model, weight=0.25)
    assert torch.equal(model.weight.grad, torch.full_like(model.weight, 0.25)) and model.bias.grad is None


def test_a_global_batch_smaller_than_the_shards_is_refused(tiny_prepared, tmp_path):
    prepared, split = tiny_prepared
    config = resolve_run_config(load_params_text(tmp_path), "baseline")
    with pytest.raises(ValueError, match="cannot be cut into 32 shards"):
        train(config, prepared, split, tmp_path / "run", progress=False, micro_batches=32)
    with pytest.raises(ValueError, match="micro_batches"):
        train(config, prepared, split, tmp_path / "run", progress=False, micro_batches=0)


def test_a_non_finite_shard_loss_stops_the_sharded_run(tiny_prepared, tmp_path):
    prepared, split = tiny_prepared
    data = tmp_path / "prepared"
    shutil.copytree(prepared, data)
    images = np.load(data / "images.npy")
    images[:] = np.nan
    np.save(data / "images.npy", images)
    config = resolve_run_config(load_params_text(tmp_path), "set3-gbp")
    with pytest.raises(TrainingDiverged, match=r"not finite at epoch 1, batch 1 \(shard 1: nan\)"):
        train(config, data, split, tmp_path / "run", progress=False, micro_batches=2)
    assert not (tmp_path / "run" / "last.pt").exists()


def load_params_text(tmp_path: Path) -> dict:
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    return load_params(path)


def test_no_torchrun_variables_leak_into_this_process():
    """The launch's environment variables belong to its children only."""
    assert "WORLD_SIZE" not in os.environ and context_from_env().world_size == 1
