"""Data-parallel training under ``torchrun``: one process per GPU (or per CPU worker).

::

    torchrun --nproc_per_node=4 -m cxrgaze.cli train --variant set3-gbp --params params.yaml \\
        --out runs/set3-gbp

``train.batch_size`` stays the *global* batch: every rank draws the same seeded
permutation (:func:`cxrgaze.train.step.epoch_batches`), cuts each global batch into
``world_size`` contiguous shards (``torch.tensor_split``: sizes differ by at most one,
so an uneven last batch is shared fairly) and trains on its own shard. Changing the
number of GPUs therefore changes neither the batch order nor the effective batch size.

Design: no ``DistributedDataParallel``; gradients are all-reduced explicitly
============================================================================

Every rank keeps a plain model. A step is: forward + ``loss.backward()`` on the rank's
shard, with the shard loss weighted by ``n_shard / n_global``; then every parameter's
``.grad`` is summed over the ranks (:func:`all_reduce_gradients`), *before* value
clipping and the optimizer step, which then run identically on every rank. Because the
objectives are means over images, the gradient of the global batch's loss is exactly the
shard-size-weighted sum of the shard gradients, *whatever graph produced them*: this
holds for the second-order heatmap losses too.

Why not DDP: the set-1/2/3 objectives take the generator's heatmap from
``torch.autograd.grad(..., create_graph=True)`` inside the loss (:mod:`cxrgaze.explain`)
and differentiate it again in ``loss.backward()``. ``DistributedDataParallel``'s own
documentation says it "doesn't work with torch.autograd.grad (i.e. it will only work if
gradients are to be accumulated in .grad attributes of parameters)"; its reducer fires
bucketed all-reduce hooks as parameters' gradients are accumulated and expects one
backward per ``DDP.forward`` (reentrant backward only with ``static_graph=True``).
Whether it gives the right gradients then hangs on reducer internals. Checked with torch
2.14 (gloo, two ranks, set3-gbp and set1-gbp on the tiny U-Net, against this module):
plain DDP happens to match (the generator's ``autograd.grad`` asks only for the input
gradient, so no reducer hook fires during it); ``static_graph=True`` gives silently
wrong gradients (max difference 174 for a max gradient of 178); set 1, which skips the
decoder through ``model.classify`` (not reachable through the wrapper), stops with
"Expected to have finished reduction" unless ``find_unused_parameters=True``, which then
runs the decoder and hands it zero gradients instead of none. The explicit all-reduce is
exact for any autograd graph, needs no hooks and no wrapper. The price is that
communication no longer overlaps the backward pass: one flat all-reduce of the gradients
per step (a U-Net on EfficientNet-B0 is ~25 MB), small next to the double backward of
the set-1/3 objectives.

Batch normalisation: each rank normalises with its own shard's batch statistics, as DDP
does without ``SyncBatchNorm``. The running statistics kept for evaluation are the
shard-size-weighted mean of what each shard's forward made of the same starting values,
so they are identical on every rank (DDP instead broadcasts rank 0's buffers).

Dropout: each shard's forward reseeds the torch RNG from (seed, epoch, batch, shard), so
the masks depend on the shard, not on which rank runs it.

The same sharded step runs in one process with ``train(..., micro_batches=k)``: each
global batch is cut into ``world_size * k`` shards, a rank processes ``k`` of them in turn
and accumulates their weighted gradients. One process with ``micro_batches=2`` therefore
computes what two ranks compute, up to the order of floating-point sums (the tests check
this), and is gradient accumulation when a global batch does not fit in memory.

Who does what: rank 0 alone evaluates the validation split (the metrics are broadcast,
so every rank agrees on the best epoch), prints progress, writes ``best.pt``, ``last.pt``,
``metrics.json`` and ``history.csv``, and logs to MLflow. On resume every rank loads
``last.pt``. Train-loss terms are summed over ranks and divided by the global count.

Every function here is a no-op (or the identity) without an initialised process group of
more than one rank, so single-process code calls them unconditionally.

Failing loudly instead of hanging
=================================

``CXRGAZE_DIST_TIMEOUT`` (:data:`TIMEOUT_ENV`, seconds, default 600) is the process
group's timeout: a collective that some rank does not join within it fails. The
collectives here turn a gloo/NCCL failure into :class:`RankSilent`, one line naming the
rank(s) that went silent (the survivors mark themselves in the job's store for a few
seconds; the ranks that never do are named) and whether they timed out or left (a killed
rank closes its connections: the others fail at once). Before training, the ranks compare
what they start from (:func:`all_gather_object`, :mod:`cxrgaze.train.agreement`) and all
stop with one :class:`RanksDisagree` where they differ. Under ``torchrun`` rank 0
(the one with the MLflow run) turns SIGTERM, which torchrun sends the survivors when a
rank dies, into :class:`Terminated`, so the run ends KILLED instead of staying RUNNING.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a ``torchrun`` job (a single process: the defaults)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that evaluates, prints, writes files and logs."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: a CUDA device becomes ``cuda:LOCAL_RANK``.

        A CUDA device with an explicit index (``cuda:1``) is refused under several ranks:
        every rank would share that one GPU.
        """
        if not self.is_distributed or device.type != "cuda":
            return device
        if device.index is not None:
            raise ValueError(f"train.device {str(device)!r} names one GPU; under torchrun use 'cuda' or 'auto' "
                             "(each rank takes cuda:LOCAL_RANK)")
        return torch.device("cuda", self.local_rank)


def context_from_env(environ: Mapping[str, str] | None = None) -> DistContext:
    """The :class:`DistContext` that ``torchrun``'s ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK`` describe (absent: a single process). Initialises nothing."""
    env = os.environ if environ is None else environ
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them); got "
                         f"{env.get('RANK')!r}, {env.get('WORLD_SIZE')!r}, {env.get('LOCAL_RANK')!r}") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}, "
                         f"LOCAL_RANK={local_rank}")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def init_from_env(device: str | torch.device = "cpu") -> DistContext:
    """Join the ``torchrun`` job that the environment describes and return its context.

    With ``WORLD_SIZE`` > 1 this initialises the default process group (``env://``: torchrun
    sets ``MASTER_ADDR``/``MASTER_PORT``) once: ``nccl`` when ``device`` is CUDA (and makes
    ``cuda:LOCAL_RANK`` the current device), ``gloo`` otherwise. Idempotent; a single
    process gets ``DistContext()`` and initialises nothing.
    """
    ctx = context_from_env()
    if not ctx.is_distributed:
        return ctx
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    device = torch.device(device)
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (ctx.rank, ctx.world_size):
            raise RuntimeError(f"the initialised process group (rank {dist.get_rank()} of {dist.get_world_size()}) "
                               f"disagrees with RANK={ctx.rank}, WORLD_SIZE={ctx.world_size}")
        return ctx
    timeout = timedelta(seconds=timeout_seconds())
    if device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend="nccl", device_id=torch.device("cuda", ctx.local_rank), timeout=timeout)
    else:
        dist.init_process_group(backend="gloo", timeout=timeout)
    if ctx.is_main:
        _raise_on_sigterm()
    return ctx


TIMEOUT_ENV = "CXRGAZE_DIST_TIMEOUT"
"""Seconds a collective waits for every rank before the job fails (:data:`DEFAULT_TIMEOUT`)."""
DEFAULT_TIMEOUT = 600.0


def timeout_seconds(environ: Mapping[str, str] | None = None) -> float:
    """The process-group timeout: ``CXRGAZE_DIST_TIMEOUT`` seconds, 600 when unset."""
    text = (os.environ if environ is None else environ).get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={text!r}: must be a positive number of seconds")
    return seconds


class RankSilent(RuntimeError):
    """A collective failed: a rank stopped answering (timeout) or left the job."""


class RanksDisagree(RuntimeError):
    """The ranks of one job start from different states (resume point, config, data)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM received (torchrun stops the survivors this way when a rank fails)."""


def _raise_on_sigterm() -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the failure path must not be cut short
        raise Terminated(f"rank {dist.get_rank() if dist.is_initialized() else 0} received SIGTERM: torchrun stops "
                         "the job's ranks when one of them fails (see its error above)")

    signal.signal(signal.SIGTERM, handler)


_FAULT_KEY = "cxrgaze/fault/"


def _silent_ranks(rank: int, world_size: int, wait: float) -> list[int]:
    """The ranks that do not mark themselves in the job's store within ``wait`` seconds
    (every survivor of a broken collective marks itself), else those that gave up before
    this one (and left); [] when the store is unreachable."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{_FAULT_KEY}{rank}", "1")
        deadline = time.monotonic() + wait
        while True:
            silent = [r for r in range(world_size) if not store.check([f"{_FAULT_KEY}{r}"])]
            if not silent or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        gone = [r for r in range(world_size) if r != rank and store.check([f"{_FAULT_KEY}gone/{r}"])]
        store.set(f"{_FAULT_KEY}gone/{rank}", "1")
        return silent or gone
    except Exception:  # the store went with the job: name no one rather than guess
        return []


@contextmanager
def _guarded(what: str) -> Iterator[None]:
    """Turn the failure of collective ``what`` into :class:`RankSilent` naming the silent rank(s)."""
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, (RankSilent, RanksDisagree)):
            raise
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group is broken: end the run, then exit
        rank, world_size, text = dist.get_rank(), dist.get_world_size(), str(exc)
        timed_out = re.search(r"time[d ]?\s*out", text, re.I) is not None
        silent = _silent_ranks(rank, world_size, min(5.0, timeout_seconds()))
        who = ("rank " if len(silent) == 1 else "ranks ") + ", ".join(map(str, silent)) if silent else "another rank"
        detail = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text.strip() else type(exc).__name__)
        detail = detail.split(". ")[0][:160]  # gloo's first sentence, without its advice
        if timed_out:
            message = (f"{who} did not answer within {timeout_seconds():g} s ({TIMEOUT_ENV}) in {what}; "
                       f"rank {rank} stops the job (gloo: {detail})")
        else:
            message = f"{who} left the job during {what}; rank {rank} stops the job ({detail})"
        raise RankSilent(message) from exc


def is_active() -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _coalesced(tensors: Sequence[Tensor], collective: Callable[[Tensor], Any]) -> None:
    """Run ``collective`` in place on one flat buffer per (device, dtype), then copy back."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        collective(flat)
        offset = 0
        for t in group:
            n = t.numel()
            t.detach().copy_(flat[offset:offset + n].view_as(t))
            offset += n


def all_reduce_(tensors: Sequence[Tensor]) -> None:
    """Sum each tensor over the ranks, in place (one collective per device and dtype).
    Every rank must pass tensors of the same shapes in the same order."""
    if is_active() and tensors:
        with _guarded("an all-reduce"):
            _coalesced(tensors, dist.all_reduce)


def all_reduce_gradients(model: nn.Module, weight: float | None = None) -> None:
    """``p.grad <- sum over ranks of (weight * p.grad)`` for every trainable parameter.

    Pass ``weight=1/world_size`` for the mean of per-rank mean losses over equal shards;
    :func:`cxrgaze.train.train` instead weights each shard's loss by its share of the
    global batch before ``backward`` and passes no weight. A parameter without a gradient
    on some ranks (an empty shard) counts as zero there; one without a gradient on every
    rank keeps ``grad=None``, so the optimizer skips it exactly as in one process.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if weight is not None:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(weight)
    if not is_active():
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=_collective_device())
    with _guarded("the all-reduce of gradients"):
        dist.all_reduce(present)
    for p, count in zip(params, present.tolist()):
        if count > 0 and p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_([p.grad for p in params if p.grad is not None])


def all_reduce_sums(values: Mapping[str, float]) -> dict[str, float]:
    """The sum over ranks of each value (in float64). Every rank passes the same keys in
    the same order; without a process group, the values unchanged."""
    if not is_active() or not values:
        return dict(values)
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=_collective_device())
    with _guarded("an all-reduce"):
        dist.all_reduce(t)
    return dict(zip(values.keys(), t.tolist()))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if not is_active():
        return obj
    box = [obj]
    with _guarded(f"a broadcast from rank {src}"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    with _guarded("the start-up check of the ranks"):
        dist.all_gather_object(out, obj)
    return out


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``model``."""
    if is_active():
        with _guarded(f"a broadcast from rank {src}"):
            _coalesced([*model.parameters(), *model.buffers()], lambda flat: dist.broadcast(flat, src=src))


def barrier() -> None:
    if is_active():
        with _guarded("a barrier"):
            dist.barrier()


def destroy() -> None:
    """Leave the process group (if one is initialised); call once at the end of the job."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
