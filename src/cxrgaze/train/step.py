"""One epoch of optimisation: the optimizer and schedule, the seeded batch order, and the step.

:class:`Stepper` owns the optimizer and the LR schedule of a run and runs one epoch of
steps. A step is one forward and backward of the whole global batch, or, under
``torchrun`` or with ``micro_batches > 1``, the sharded backward of
:mod:`cxrgaze.train.sharding`; either way gradients are clipped (``train.clip_value``)
before the optimizer step.

Every random stream of an epoch is a function of ``(train.seed, epoch)`` alone
(:func:`epoch_seed`): the batch order, the augmentation and, for shards, dropout. So a
resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cxrgaze.config import RunConfig, TrainConfig
from cxrgaze.data.dataset import SplitTensors, random_affine
from cxrgaze.distributed import DistContext
from cxrgaze.losses import compute_loss
from cxrgaze.train.sharding import Batch, ShardedBackward


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and the batch."""


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s random streams: the batch order uses it, the
    augmentation ``+ 1``, each shard's dropout mixes in the batch and shard (:func:`shard_seed`)."""
    return seed * 100_003 + epoch


def shard_seed(seed: int, epoch: int, batch: int, shard: int) -> int:
    """Dropout seed of shard ``shard`` of batch ``batch``: the same on whichever rank runs it."""
    return ((epoch_seed(seed, epoch) * 100_003 + batch) * 4_099 + shard) % (2**63 - 1)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The batch order of one epoch: a permutation seeded by (seed, epoch) alone."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return list(torch.randperm(n, generator=g).split(batch_size))


def to_batch(data: SplitTensors, idx: torch.Tensor, device: torch.device,
             augment: torch.Generator | None = None) -> Batch:
    """A training batch on ``device``; with ``augment`` (a seeded generator) each image and
    its gaze map get the same small random affine."""
    images = data.images[idx].float()  # (B, 1, S, S)
    gaze = data.gaze[idx].float()  # (B, 1, S, S)
    if augment is not None:
        pairs = [random_affine(torch.stack([im, gz]), generator=augment) for im, gz in zip(images, gaze)]  # (2, 1, S, S) each
        images = torch.stack([p[0] for p in pairs])
        gaze = torch.stack([p[1] for p in pairs])
    return {"image": images.to(device), "gaze": gaze.to(device), "label": data.labels[idx].to(device)}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer must be 'adam' or 'adamw', got {cfg.optimizer!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``cyclic``: the reference's triangular cyclic LR, stepped once per epoch between
    ``lr * cyclic_min_factor`` and ``lr`` with a half-cycle of ``cyclic_half_period`` epochs."""
    if cfg.scheduler == "none":
        return None
    if cfg.scheduler == "cyclic":
        return torch.optim.lr_scheduler.CyclicLR(
            optimizer, base_lr=cfg.lr * cfg.cyclic_min_factor, max_lr=cfg.lr,
            step_size_up=cfg.cyclic_half_period, mode="triangular", cycle_momentum=False)
    raise ValueError(f"train.scheduler must be 'none' or 'cyclic', got {cfg.scheduler!r}")


class Stepper:
    """The optimizer, LR schedule and step of one run on this rank."""

    def __init__(self, model: nn.Module, config: RunConfig, data: SplitTensors, device: torch.device,
                 ctx: DistContext, micro_batches: int, last_path: Path) -> None:
        self.model, self.config, self.cfg, self.data = model, config, config.train, data
        self.device, self.ctx, self.last_path = device, ctx, last_path
        self.optimizer = make_optimizer(model, self.cfg)
        self.scheduler = make_scheduler(self.optimizer, self.cfg)
        self.shards = ctx.world_size * micro_batches
        self.sharded = ShardedBackward(model, self.optimizer, ctx, micro_batches) if self.shards > 1 else None
        self.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                         if self.cfg.amp == "bf16" else torch.autocast(device_type=device.type, enabled=False))

    def run_epoch(self, epoch: int, progress: bool) -> dict[str, float]:
        """Train one epoch; the sum over images of each loss term (``len(batch) * term``)."""
        cfg = self.cfg
        self.model.train()
        sums: dict[str, float] = {}
        batches = epoch_batches(len(self.data), cfg.batch_size, cfg.seed, epoch)
        augment = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch) + 1) if cfg.augment else None
        bar = tqdm(batches, desc=f"{cfg.variant} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (progress and self.ctx.is_main), leave=False)
        for b, idx in enumerate(bar):
            if self.sharded is not None:
                terms = self._sharded_backward(idx, augment, epoch, b)
            else:
                terms = self._backward(idx, augment, epoch, b)
            if cfg.clip_value > 0:
                torch.nn.utils.clip_grad_value_(self.model.parameters(), cfg.clip_value)
            self.optimizer.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            seen = sum(len(i) for i in batches[: b + 1])
            bar.set_postfix({k: f"{s / seen:.4f}" for k, s in sums.items()})
        bar.close()
        return sums

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        with self.autocast:
            return compute_loss(self.model, batch, self.cfg.variant, self.config.loss)

    def _diverged(self, what: str, epoch: int, b: int, detail: str = "") -> TrainingDiverged:
        last = self.last_path if self.last_path.exists() else "none (first epoch)"
        return TrainingDiverged(f"{self.cfg.variant}: loss is {what} at epoch {epoch + 1}, batch {b + 1}{detail}; "
                                f"the last good checkpoint is {last}")

    def _backward(self, idx: torch.Tensor, augment: torch.Generator | None, epoch: int, b: int) -> dict[str, float]:
        """One forward and backward of the whole batch; the terms times the batch size."""
        loss, terms = self._loss(to_batch(self.data, idx, self.device, augment))
        if not torch.isfinite(loss):
            raise self._diverged(str(loss.item()), epoch, b)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return {k: float(v) * len(idx) for k, v in terms.items()}

    def _sharded_backward(self, idx: torch.Tensor, augment: torch.Generator | None, epoch: int, b: int) -> dict[str, float]:
        """The batch over this rank's shards (same affines as one process: drawn for the whole batch)."""
        full = to_batch(self.data, idx, torch.device("cpu"), augment) if augment is not None else None

        def shard_batch(piece: torch.Tensor, start: int, stop: int) -> Batch:
            if full is not None:
                return {k: v[start:stop].to(self.device) for k, v in full.items()}
            return to_batch(self.data, piece, self.device)

        assert self.sharded is not None
        sums, bad = self.sharded(idx, shard_batch, self._loss, lambda s: shard_seed(self.cfg.seed, epoch, b, s))
        if sums is None:
            raise self._diverged("not finite", epoch, b, bad)
        return sums
