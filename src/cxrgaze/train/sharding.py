"""One global batch cut into shards: this rank's shards forward and backward in turn, then
gradients and batch-norm running statistics are summed over ranks.

Used by :class:`cxrgaze.train.step.Stepper` under ``torchrun`` or with ``micro_batches > 1``
(:mod:`cxrgaze.distributed` explains the design and why it does not use
``DistributedDataParallel``). The result equals one process stepping on the whole batch:
the loss of each shard is weighted by its share of the batch, every shard starts from the
same running statistics, and dropout is seeded per shard (:func:`cxrgaze.train.step.shard_seed`), not per rank.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from cxrgaze.distributed import DistContext, all_reduce_, all_reduce_gradients, all_reduce_sums

Batch = dict[str, torch.Tensor]


def running_stats(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The (floating, integer) running-statistics buffers of the model's batch norms."""
    floats: list[torch.Tensor] = []
    ints: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            for buf in module.buffers(recurse=False):
                (floats if buf.is_floating_point() else ints).append(buf)
    return floats, ints


class ShardedBackward:
    """Backward of one global batch over ``ctx.world_size * micro_batches`` contiguous shards."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext, micro_batches: int) -> None:
        self.model, self.optimizer, self.ctx, self.micro_batches = model, optimizer, ctx, micro_batches
        self.floats, self.ints = running_stats(model)
        self.term_keys: list[str] = []

    def __call__(self, idx: torch.Tensor, shard_batch: Callable[[torch.Tensor, int, int], Batch],
                 loss_fn: Callable[[Batch], tuple[torch.Tensor, dict[str, Any]]],
                 seed_of: Callable[[int], int]) -> tuple[dict[str, float] | None, str]:
        """Leave the global gradient in ``.grad`` and return ``(sums, "")``: the global sums of
        ``len(shard) * term``. When a shard's loss is not finite on any rank, return
        ``(None, why)`` on every rank (``why`` names the shard on the rank that saw it)
        before touching gradients: the caller stops the run.

        ``shard_batch(piece, start, stop)`` builds the shard of indices ``piece`` (rows
        ``start:stop`` of the global batch); ``seed_of(s)`` seeds shard ``s``'s dropout.
        """
        pieces = idx.tensor_split(self.ctx.world_size * self.micro_batches)
        starts = [0]
        for piece in pieces:
            starts.append(starts[-1] + len(piece))
        floats0 = [t.clone() for t in self.floats]
        ints0 = [t.clone() for t in self.ints]
        floats_acc = [torch.zeros_like(t) for t in self.floats]
        local = dict.fromkeys(self.term_keys, 0.0)
        nonfinite, ran, bad = 0.0, 0.0, ""
        self.optimizer.zero_grad(set_to_none=True)
        for s in range(self.ctx.rank * self.micro_batches, (self.ctx.rank + 1) * self.micro_batches):
            n = len(pieces[s])
            if n == 0:
                continue
            for t, t0 in zip([*self.floats, *self.ints], [*floats0, *ints0]):  # every shard starts from the same statistics
                t.copy_(t0)
            torch.manual_seed(seed_of(s))  # dropout: a function of the shard, not the rank
            loss, terms = loss_fn(shard_batch(pieces[s], starts[s], starts[s + 1]))
            if not torch.isfinite(loss):
                nonfinite, bad = 1.0, f" (shard {s + 1}: {loss.item()})"
                break
            share = n / len(idx)
            (loss * share).backward()
            for acc, t in zip(floats_acc, self.floats):
                acc.add_(t * share)
            for k, v in terms.items():
                local[k] = local.get(k, 0.0) + float(v) * n
            ran = 1.0
        stats = all_reduce_sums({"_nonfinite": nonfinite, "_ranks": ran, **local})
        if stats.pop("_nonfinite") > 0:
            return None, bad
        self._reduce(floats_acc, ran, int(stats.pop("_ranks")))
        self.term_keys = self.term_keys or list(stats)
        return stats, ""

    def _reduce(self, floats_acc: list[torch.Tensor], ran: float, ranks: int) -> None:
        """Sum gradients over ranks; set the running statistics to the shards' weighted mean
        (floating) or common value (integer counters)."""
        all_reduce_gradients(self.model)
        ints_acc = [t * int(ran) for t in self.ints]  # equal on every rank that ran a shard
        all_reduce_([*floats_acc, *ints_acc])
        with torch.no_grad():
            for t, acc in zip(self.floats, floats_acc):
                t.copy_(acc)
            for t, acc in zip(self.ints, ints_acc):
                t.copy_(acc // ranks)
