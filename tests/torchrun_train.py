"""Worker script of tests/test_distributed.py, run as ``torchrun --nproc_per_node=2 tests/torchrun_train.py``.

One launch (process start-up dominates on CPU) does, on every rank:

1. checks of the collectives of :mod:`cxrgaze.distributed` on the gloo group;
2. ``cxrgaze train --no-track`` through the CLI for each variant in ``VARIANTS``;
3. a run interrupted by a callback after its first epoch, then resumed from ``last.pt``.

Every ``torch.save`` and ``Path.write_text`` is recorded, and with the check results
written to ``SPY_DIR/rank<RANK>.json`` at the end (with plain ``open``, unrecorded).

Usage: ``torchrun ... tests/torchrun_train.py SPY_DIR OUT_ROOT PARAMS PREPARED SPLIT VARIANT[,VARIANT...]``
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import torch

RECORDED: list[str] = []
_save, _write_text = torch.save, pathlib.Path.write_text


def _spy_save(obj, f, *args, **kwargs):
    RECORDED.append(str(f))
    return _save(obj, f, *args, **kwargs)


def _spy_write_text(self, *args, **kwargs):
    RECORDED.append(str(self))
    return _write_text(self, *args, **kwargs)


torch.save = _spy_save
pathlib.Path.write_text = _spy_write_text


def check_collectives() -> dict:
    """The collectives on two ranks: sums, broadcast, and gradient presence."""
    from torch import nn

    from cxrgaze import distributed as D

    ctx = D.init_from_env("cpu")
    out: dict = {"rank": ctx.rank, "world_size": ctx.world_size, "active": D.is_active()}
    out["sums"] = D.all_reduce_sums({"a": 1.5 + ctx.rank, "b": float(ctx.rank)})
    out["broadcast"] = D.broadcast_object({"from": ctx.rank})
    model = nn.ModuleDict({"both": nn.Linear(2, 1), "rank0": nn.Linear(2, 1), "none": nn.Linear(2, 1)})
    for p in model.parameters():
        p.grad = None
    for p in model["both"].parameters():
        p.grad = torch.full_like(p, float(ctx.rank + 1))  # 1 and 2
    if ctx.rank == 0:
        for p in model["rank0"].parameters():
            p.grad = torch.full_like(p, 4.0)
    D.all_reduce_gradients(model, weight=0.5)
    out["grads"] = {name: [None if p.grad is None else p.grad.flatten().tolist() for p in m.parameters()]
                    for name, m in model.items()}
    torch.manual_seed(ctx.rank)  # different weights on each rank, then rank 0's everywhere
    net = nn.Linear(3, 2)
    D.broadcast_module(net)
    out["broadcast_module"] = [p.flatten().tolist() for p in net.parameters()]
    D.barrier()
    return out


class Interrupted(Exception):
    pass


class StopAfterFirstEpoch:
    def on_epoch_end(self, record):
        raise Interrupted


def main() -> int:
    spy_dir, out_root, params, prepared, split, variants = sys.argv[1:7]
    from cxrgaze.cli import main as cli_main
    from cxrgaze.config import load_params
    from cxrgaze.config import resolve_run_config
    from cxrgaze.train import train

    from cxrgaze import distributed

    report: dict = {"collectives": check_collectives(), "cli_rc": {}}
    # `cxrgaze train` leaves the process group when it ends; torch cannot join a new one in
    # the same torchrun job, so the group is kept across the CLI calls of this one launch.
    destroy, distributed.destroy = distributed.destroy, lambda: None
    for variant in variants.split(","):
        report["cli_rc"][variant] = cli_main(["train", "--variant", variant, "--params", params, "--prepared", prepared,
                                              "--split", split, "--out", f"{out_root}/{variant}", "--no-track"])
    distributed.destroy = destroy
    config = resolve_run_config(load_params(params), variants.split(",")[0])
    resumed = f"{out_root}/resumed"
    try:
        train(config, prepared, split, resumed, progress=False, callbacks=[StopAfterFirstEpoch()])
        report["interrupted"] = False
    except Interrupted:
        report["interrupted"] = True
    result = train(config, prepared, split, resumed, progress=False)
    report["resumed_history"] = [{k: v for k, v in r.items() if k != "seconds"} for r in result.history]
    destroy()
    report["recorded"] = RECORDED
    with open(os.path.join(spy_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
