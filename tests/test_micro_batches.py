"""Micro-batches from the command line and the params file (``cxrgaze train --micro-batches
N``, ``train.micro_batches``), and the layout a run records: world size, shard count and
torch's thread count, as MLflow params (``runtime.*``) and in ``metrics.json``.

A run with ``--micro-batches 2`` must be the run of ``train(..., micro_batches=2)``: in one
process, with the same thread count, the same floats (``torch.equal``; the two-rank
comparison in tests/test_distributed.py needs tolerances only because the order of sums may
change across processes). It must differ from one micro-batch: batch-norm statistics and
dropout masks are per shard.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from cxrgaze.checkpoint import load_checkpoint
from cxrgaze.cli import main
from cxrgaze.config import ConfigError, resolve_run_config
from cxrgaze.tracking import read_run_file
from cxrgaze.train import train

pytestmark = pytest.mark.timeout(300)

FAST = {"model": {"encoder": "tu-tinynet_e", "decoder_channels": [32, 16, 16, 8, 8]},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.003, "device": "cpu"}}


def _weights(folder):
    return load_checkpoint(folder / "best.pt")["model"]


def test_cli_micro_batches_train_what_python_trains_and_are_recorded(tiny_prepared, mlflow_store, tmp_path, capsys):
    prepared, split = tiny_prepared
    params = tmp_path / "params.yaml"  # the flag replaces the file's value
    params.write_text(yaml.safe_dump({**FAST, "train": {**FAST["train"], "micro_batches": 3}}))
    code = main(["train", "--variant", "unet", "--params", str(params), "--prepared", str(prepared), "--split",
                 str(split), "--out", str(tmp_path / "cli"), "--micro-batches", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err

    config = resolve_run_config(FAST, "unet")
    assert config.train.micro_batches == 1
    python = train(config, prepared, split, tmp_path / "python", progress=False, micro_batches=2)
    single = train(config, prepared, split, tmp_path / "single", progress=False)

    cli_w, py_w, one_w = _weights(tmp_path / "cli"), _weights(tmp_path / "python"), _weights(tmp_path / "single")
    assert cli_w.keys() == py_w.keys() == one_w.keys()
    assert all(torch.equal(cli_w[k], py_w[k]) for k in cli_w)
    assert not all(torch.equal(cli_w[k], one_w[k]) for k in cli_w)  # per-shard batch norm and dropout
    assert load_checkpoint(tmp_path / "cli" / "best.pt")["config"]["train"]["micro_batches"] == 2
    assert python.config["train"]["micro_batches"] == 2 and single.config["train"]["micro_batches"] == 1

    threads = torch.get_num_threads()
    run = MlflowClient().get_run(read_run_file(tmp_path / "cli")["run_id"])
    assert {k: run.data.params.get(k) for k in ("train.micro_batches", "runtime.world_size", "runtime.shards",
                                                "runtime.threads")} == {
        "train.micro_batches": "2", "runtime.world_size": "1", "runtime.shards": "2", "runtime.threads": str(threads)}
    for folder, shards in (("cli", 2), ("python", 2), ("single", 1)):
        metrics = json.loads((tmp_path / folder / "metrics.json").read_text())
        assert (metrics["world_size"], metrics["shards"], metrics["threads"]) == (1, shards, threads), folder
    assert python.to_json() == json.loads((tmp_path / "python" / "metrics.json").read_text())


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True])
def test_micro_batches_in_the_params_file_are_validated(value):
    with pytest.raises(ConfigError, match="train.micro_batches"):
        resolve_run_config({"train": {"micro_batches": value}}, "unet")


def test_the_flag_is_validated_before_any_work(tmp_path, capsys):
    code = main(["train", "--variant", "unet", "--prepared", str(tmp_path / "none"), "--split", str(tmp_path / "none.csv"),
                 "--out", str(tmp_path / "out"), "--micro-batches", "0", "--no-track", "--quiet"])
    assert code == 2
    assert "train.micro_batches must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shipped_params_train_one_micro_batch():
    from conftest import ROOT

    from cxrgaze.config import load_params

    assert resolve_run_config(load_params(ROOT / "params.yaml"), "unet").train.micro_batches == 1


class _StopAfterFirstEpoch:
    def on_epoch_end(self, record):
        if record["epoch"] == 0:
            raise KeyboardInterrupt("stopped after epoch 0")


def test_a_resume_may_change_the_micro_batches_and_read_older_checkpoints(tiny_prepared, tmp_path):
    """How the batches are cut is not a different config, like the number of ranks: a
    resume with other micro-batches goes on with a warning (not bit-exact), also from a
    ``last.pt`` written before ``train.micro_batches`` existed."""
    from cxrgaze.checkpoint import save_checkpoint

    prepared, split = tiny_prepared
    config = resolve_run_config({**FAST, "train": {**FAST["train"], "epochs": 2}}, "unet")
    with pytest.raises(KeyboardInterrupt):
        train(config, prepared, split, tmp_path, progress=False, callbacks=[_StopAfterFirstEpoch()])
    ckpt = load_checkpoint(tmp_path / "last.pt")
    del ckpt["config"]["train"]["micro_batches"]  # as written by an older cxrgaze
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, tmp_path / "last.pt")
    with pytest.warns(UserWarning, match="resumed with 2"):
        result = train(config, prepared, split, tmp_path, progress=False, micro_batches=2)
    assert len(result.history) == 2 and result.shards == 2
    assert load_checkpoint(tmp_path / "last.pt")["config"]["train"]["micro_batches"] == 2
    with pytest.raises(ValueError, match="different config"):  # anything else still is refused
        train(resolve_run_config({**FAST, "train": {**FAST["train"], "epochs": 2, "lr": 0.001}}, "unet"),
              prepared, split, tmp_path, progress=False)
