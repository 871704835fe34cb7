"""The training loop: ``train(config, prepared_dir, split_csv, out_dir) -> TrainResult``.

Joins a ``torchrun`` job when there is one, loads the train and val splits, resumes from
``last.pt``, runs the epochs (:class:`cxrgaze.train.step.Stepper`), evaluates validation
after each (:func:`validation_record`), keeps ``best.pt`` and ``last.pt``
(:mod:`cxrgaze.checkpoint`) and calls the epoch callbacks.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from cxrgaze.checkpoint import load_checkpoint, save_checkpoint
from cxrgaze.config import RunConfig
from cxrgaze.data.dataset import SplitTensors, load_split
from cxrgaze.distributed import (DistContext, barrier, broadcast_module, broadcast_object, context_from_env,
                                 init_from_env, is_active)
from cxrgaze.metrics import auc_summary
from cxrgaze.models import build_model
from cxrgaze.outlock import FolderInUse, acquire, release
from cxrgaze.predict import predict_logits, scores_from_logits, selection_metrics
from cxrgaze.runtime import resolve_device, seed_everything
from cxrgaze.train.agreement import agreed_start, start_facts
from cxrgaze.train.step import Stepper
from cxrgaze.variants import parse_variant


class EpochCallback(Protocol):
    def on_epoch_end(self, record: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    """What a finished run returns (and writes to ``metrics.json``)."""

    variant: str
    out_dir: Path
    best_epoch: int
    best: dict[str, float]
    """Validation metrics of the best epoch (``val_auc_macro``, ``val_auc_<class>``, ...)."""
    history: list[dict[str, Any]]
    """One record per epoch: epoch, train loss terms, validation metrics, lr, seconds."""
    device: str
    config: dict[str, Any]
    world_size: int = 1
    """Processes of the job (``torchrun`` ranks)."""
    shards: int = 1
    """Shards each global batch was cut into: ``world_size * train.micro_batches``. Batch-norm
    statistics and dropout masks are per shard, so results depend on it."""
    threads: int = 1
    """torch's intra-op threads (``torch.get_num_threads()``): the order of float sums, so
    the last bits of the results, depend on it."""

    @property
    def best_checkpoint(self) -> Path:
        return self.out_dir / "best.pt"

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "best_epoch": self.best_epoch, **self.best, "device": self.device,
                "epochs_run": len(self.history), "world_size": self.world_size, "shards": self.shards,
                "threads": self.threads}


def run_layout(world_size: int, micro_batches: int) -> dict[str, int]:
    """What a run's results depend on besides its config and data: ``world_size``,
    ``shards`` (``world_size * micro_batches``: batch-norm statistics and dropout masks are
    per shard) and ``threads``, torch's intra-op thread count (the order of float sums).
    In ``metrics.json`` and, as ``runtime.*``, in the MLflow params of the run."""
    return {"world_size": world_size, "shards": world_size * micro_batches, "threads": torch.get_num_threads()}


@dataclass
class _Progress:
    """The epochs so far and the best one (what ``last.pt`` carries across a resume)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)
    best_epoch: int = -1
    next_epoch: int = 0

    def add(self, record: dict[str, Any]) -> bool:
        """Append an epoch's record; whether it is the new best (highest finite
        ``val_selection``, ties: the earlier epoch; the first epoch until one is finite)."""
        self.history.append(record)
        score = record["val_selection"]
        improved = math.isfinite(score) and (self.best_epoch < 0 or score > self.best.get("val_selection", -math.inf))
        if improved or self.best_epoch < 0:
            self.best_epoch = record["epoch"]
            self.best = {k: v for k, v in record.items() if k.startswith("val_")}
            return True
        return False


def evaluate_split(model: nn.Module, data: SplitTensors, device: torch.device, prefix: str, cls_loss: str,
                   batch_size: int = 64) -> dict[str, float]:
    """Macro and per-class one-vs-rest AUC of the model on one split, on the scores of
    ``cls_loss`` (:func:`cxrgaze.predict.scores_from_logits`)."""
    scores = scores_from_logits(predict_logits(model, data.images, device, batch_size), cls_loss)
    return auc_summary(data.labels.numpy(), scores.numpy(), prefix=prefix)


def validation_record(model: nn.Module, data: SplitTensors, device: torch.device, config: RunConfig) -> dict[str, float]:
    """One epoch's validation metrics: the AUCs (:func:`evaluate_split`), ``val_outside_mass``
    (the mean share of the generator map's mass outside the gaze, explaining the true class)
    and ``val_selection``, the score that checkpoint selection and tuning maximise
    (``TrainConfig.selection_gaze_weight``)."""
    record = evaluate_split(model, data, device, prefix="val_", cls_loss=config.loss.cls_loss,
                            batch_size=config.train.eval_batch_size)
    record.update(selection_metrics(model, data.images, data.gaze, data.labels, record["val_auc_macro"],
                                    parse_variant(config.train.variant).generator, config.train.selection_gaze_weight,
                                    device, config.train.eval_batch_size))
    return record


def train(
    config: RunConfig,
    prepared_dir: str | Path,
    split_csv: str | Path,
    out_dir: str | Path,
    callbacks: Iterable[EpochCallback] = (),
    progress: bool = True,
    resume: bool = True,
    dist: DistContext | None = None,
    micro_batches: int | None = None,
) -> TrainResult:
    """Train ``config.train.variant`` on the prepared arrays; write checkpoints to ``out_dir``.

    Resumes from ``out_dir/last.pt`` when it exists and was written with the same config
    (a different config is an error rather than a silent restart; pass ``resume=False``,
    on the command line ``--no-resume``, or delete the folder to start over). The folder is
    held for the run (:mod:`cxrgaze.outlock`): a second process training into it is refused
    with :class:`~cxrgaze.outlock.FolderInUse` naming the first (under ``torchrun``, rank 0
    holds it for the job and every rank stops with the refusal).

    ``dist``: this process's place in a ``torchrun`` job; ``None`` reads it from the
    environment (:func:`cxrgaze.distributed.init_from_env`, which joins the job when
    ``WORLD_SIZE`` > 1). A given context with several ranks needs that process group
    initialised. ``micro_batches``: the shards each rank processes in turn per global
    batch; the global batch (``train.batch_size``) is cut into ``world_size *
    micro_batches`` contiguous shards; ``None`` (the default): ``train.micro_batches``. With
    one rank and one micro-batch a step is one forward and backward of the whole batch, as always.
    """
    config = _with_micro_batches(config, micro_batches)
    cfg, micro_batches = config.train, config.train.micro_batches
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx, device = _join(dist, cfg.device, micro_batches)
    with _exclusive(out_dir, ctx):  # one run per folder (cxrgaze.outlock)
        seed_everything(cfg.seed)
        train_data, val_data = _start(config, prepared_dir, split_csv, out_dir, resume, ctx, micro_batches)
        model = build_model(config.model, variant=cfg.variant).to(device)
        stepper = Stepper(model, config, train_data, device, ctx, micro_batches, out_dir / "last.pt")
        state = _resume(stepper, config, device, ctx) if resume and stepper.last_path.exists() else _Progress()
        broadcast_module(model)  # every rank starts from rank 0's weights (they agree already: same seed or last.pt)
        for epoch in range(state.next_epoch, cfg.epochs):
            t0 = time.perf_counter()
            sums = stepper.run_epoch(epoch, progress)
            record: dict[str, Any] = {"epoch": epoch, "lr": stepper.optimizer.param_groups[0]["lr"]}
            record.update({f"train_{k}": s / len(train_data) for k, s in sums.items()})
            val = validation_record(model, val_data, device, config) if ctx.is_main else None
            record.update(broadcast_object(val))  # rank 0 evaluates; every rank agrees on the best epoch
            if stepper.scheduler is not None:
                stepper.scheduler.step()
            record["seconds"] = time.perf_counter() - t0
            improved = state.add(record)
            if ctx.is_main:
                _save(stepper, config, state, epoch, improved, out_dir)
            if progress and ctx.is_main:
                tqdm.write(f"{cfg.variant} epoch {epoch + 1}/{cfg.epochs}: "
                           + ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k.startswith(("train_", "val_auc_macro", "val_outside"))))
            for cb in callbacks:
                cb.on_epoch_end(record)
        return _finish(state, cfg.variant, out_dir, device, config, ctx)


def _with_micro_batches(config: RunConfig, micro_batches: int | None) -> RunConfig:
    """``config`` with ``train.micro_batches`` replaced by ``micro_batches`` (None: as it
    is), so that the checkpoints and ``metrics.json`` carry what the run used."""
    if micro_batches is None or micro_batches == config.train.micro_batches:
        return config
    return replace(config, train=replace(config.train, micro_batches=micro_batches))


def _join(dist: DistContext | None, device_name: str, micro_batches: int) -> tuple[DistContext, torch.device]:
    """This process's place in the job and its device; joins a ``torchrun`` job from the
    environment when ``dist`` is None."""
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive integer, got {micro_batches}")
    ctx = context_from_env() if dist is None else dist
    device = ctx.device(resolve_device(device_name))
    if dist is None:
        init_from_env(device)
    elif ctx.is_distributed and not is_active():
        raise RuntimeError(f"train(dist=rank {ctx.rank} of {ctx.world_size}) needs an initialised process group "
                           "(cxrgaze.distributed.init_from_env)")
    return ctx, device


@contextmanager
def _exclusive(out_dir: Path, ctx: DistContext) -> Iterator[None]:
    """Hold ``out_dir`` for the run. Under ``torchrun`` rank 0 holds it for the whole job
    (the ranks of one job share it) and tells the others whether it could: a refused job
    stops on every rank with the same one-line reason instead of waiting for rank 0."""
    lock, error = None, None
    if ctx.is_main:
        try:
            lock = acquire(out_dir)
        except (FolderInUse, OSError) as exc:
            error = exc
    refusal = broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if refusal is not None:
        raise FolderInUse(refusal)
    try:
        yield
    finally:
        if lock is not None:
            release(lock)


def _start(config: RunConfig, prepared_dir: str | Path, split_csv: str | Path, out_dir: Path, resume: bool,
           ctx: DistContext, micro_batches: int) -> tuple[SplitTensors, SplitTensors]:
    """The train and val splits, once every rank agrees on where it starts
    (:mod:`cxrgaze.train.agreement`: resume point, config, data)."""
    cfg, last = config.train, out_dir / "last.pt"
    return agreed_start(ctx, lambda: _load_splits(prepared_dir, split_csv, cfg.batch_size, ctx, micro_batches),
                        lambda s: start_facts(config.as_dict(), prepared_dir, split_csv, (len(s[0]), len(s[1])),
                                              last if resume and last.exists() else None))


def _load_splits(prepared_dir: str | Path, split_csv: str | Path, batch_size: int, ctx: DistContext,
                 micro_batches: int) -> tuple[SplitTensors, SplitTensors]:
    """The train and val splits; refuses empty ones and batches too small to shard."""
    train_data = load_split(prepared_dir, split_csv, "train")
    val_data = load_split(prepared_dir, split_csv, "val")
    if len(train_data) == 0 or len(val_data) == 0:
        raise ValueError(f"{split_csv}: the train and val splits must both be non-empty "
                         f"(train {len(train_data)}, val {len(val_data)})")
    shards = ctx.world_size * micro_batches
    if min(batch_size, len(train_data)) < shards:
        raise ValueError(f"train.batch_size {batch_size} (the global batch; {len(train_data)} training images) "
                         f"cannot be cut into {shards} shards ({ctx.world_size} rank(s) x {micro_batches} micro-batches)")
    return train_data, val_data


def _resume(stepper: Stepper, config: RunConfig, device: torch.device, ctx: DistContext) -> _Progress:
    """Restore model, optimizer, schedule and RNG from ``last.pt`` (same config only)."""
    last_path = stepper.last_path
    ckpt = load_checkpoint(last_path)
    check_resumable(ckpt, config, last_path)
    stepper.model.load_state_dict(ckpt["model"])
    stepper.optimizer.load_state_dict(ckpt["optimizer"])
    if stepper.scheduler is not None and ckpt.get("scheduler") is not None:
        stepper.scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    shards = stepper.shards
    if ckpt.get("shards", 1) != shards and ctx.is_main:
        warnings.warn(f"{last_path}: written with global batches cut into {ckpt.get('shards', 1)} shard(s), "
                      f"resumed with {shards}: the run goes on, but is not the bit-exact continuation", stacklevel=3)
    return _Progress(ckpt["history"], ckpt["best"], ckpt["best_epoch"], ckpt["epoch"] + 1)


def check_resumable(last: dict[str, Any], config: RunConfig, last_path: Path) -> None:
    """Refuse to resume from ``last`` (the checkpoint at ``last_path``) unless it was written
    with ``config`` (``train.micro_batches`` aside)."""
    if _without_micro_batches(last["config"]) != _without_micro_batches(config.as_dict()):
        raise ValueError(f"{last_path}: written by a run with a different config; "
                         "delete the folder or train with --no-resume to start over")


def _without_micro_batches(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict less ``train.micro_batches``: how the global batches are cut, like the
    number of ranks, may change on a resume (with a warning: the shard count of ``last.pt``);
    ``last.pt`` files written before the setting existed lack it."""
    return {**config, "train": {k: v for k, v in config["train"].items() if k != "micro_batches"}}


def _save(stepper: Stepper, config: RunConfig, state: _Progress, epoch: int, improved: bool, out_dir: Path) -> None:
    """``best.pt`` when the epoch is the new best; ``last.pt`` (resume state) always."""
    model, scheduler, config_dict = stepper.model, stepper.scheduler, config.as_dict()
    if improved:
        save_checkpoint({"model": model.state_dict(), "config": config_dict, "epoch": epoch, "metrics": state.best},
                        out_dir / "best.pt")
    save_checkpoint({
        "model": model.state_dict(), "optimizer": stepper.optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if stepper.device.type == "cuda" else None},
        "epoch": epoch, "history": state.history, "best": state.best, "best_epoch": state.best_epoch,
        "config": config_dict, **({"shards": stepper.shards} if stepper.shards > 1 else {}),
    }, stepper.last_path)


HISTORY_EXCLUDED = ("seconds",)
"""Record fields left out of ``history.csv``: wall-clock time differs from run to run, and
the file is a DVC output that must depend only on the inputs (the times are logged to
MLflow as ``epoch_seconds`` and kept in ``last.pt``)."""


def _finish(state: _Progress, variant: str, out_dir: Path, device: torch.device, config: RunConfig,
            ctx: DistContext) -> TrainResult:
    """The result; rank 0 writes ``metrics.json`` and ``history.csv``."""
    result = TrainResult(variant=variant, out_dir=out_dir, best_epoch=state.best_epoch, best=state.best,
                         history=state.history, device=str(device), config=config.as_dict(),
                         **run_layout(ctx.world_size, config.train.micro_batches))
    if ctx.is_main:
        (out_dir / "metrics.json").write_text(json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n")
        write_history_csv(state.history, out_dir / "history.csv")
    barrier()  # every rank returns once rank 0's files are complete
    return result


def write_history_csv(history: list[dict[str, Any]], path: Path) -> None:
    """``history.csv``: one row per epoch, floats to 6 significant digits, no wall-clock times."""
    keys: list[str] = []
    for rec in history:
        keys += [k for k in rec if k not in keys and k not in HISTORY_EXCLUDED]
    lines = [",".join(keys)]
    for rec in history:
        lines.append(",".join("" if rec.get(k) is None else (f"{rec[k]:.6g}" if isinstance(rec[k], float) else str(rec[k])) for k in keys))
    path.write_text("\n".join(lines) + "\n")
