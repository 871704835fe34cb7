"""Training of every variant: ``train(config) -> TrainResult``.

The CLI, the DVC stage, the Optuna objective and the tests all call :func:`train`.

What a run guarantees:

* The checkpoint kept as ``best.pt`` is the epoch with the best ``val_selection``: the
  *validation* macro AUC, minus ``train.selection_gaze_weight`` times the generator map's
  mass outside the gaze on validation when that weight is set (ties: the earlier epoch);
  test data is never seen here.
* ``last.pt`` is written atomically at the end of every epoch with the model, optimizer,
  scheduler and RNG state. A killed run started again with the same config resumes from
  it and, on CPU, finishes with exactly the result of an uninterrupted run: the batch
  order of epoch ``e`` comes from a generator seeded with ``(seed, e)`` and the global
  torch RNG (dropout) is restored from the checkpoint.
* A NaN or infinite loss stops the run with :class:`TrainingDiverged` naming the epoch
  and batch; ``last.pt`` and ``best.pt`` from the last good epoch stay.
* Callbacks (``on_epoch_end(record)``) see each epoch's record: MLflow logging and Optuna
  pruning plug in there without this module knowing about either.
* Under ``torchrun --nproc_per_node=N`` (or with ``micro_batches=k``) each global batch of
  ``train.batch_size`` images is cut into contiguous shards whose gradients are summed
  before clipping and the optimizer step (:mod:`cxrgaze.distributed` explains the design
  and why it does not use ``DistributedDataParallel``); rank 0 alone evaluates, prints
  and writes files, and every rank returns the same history.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from cxrgaze.config import LossConfig, ModelConfig, TrainConfig, to_dict
from cxrgaze.data.dataset import SplitTensors, load_split, random_affine
from cxrgaze.distributed import (DistContext, all_reduce_, all_reduce_gradients, all_reduce_sums, barrier,
                                 broadcast_module, broadcast_object, context_from_env, init_from_env, is_active)
from cxrgaze.losses import compute_loss
from cxrgaze.metrics import auc_summary
from cxrgaze.models import build_model
from cxrgaze.predict import predict_logits, scores_from_logits, selection_metrics
from cxrgaze.runtime import resolve_device, seed_everything
from cxrgaze.variants import parse_variant
from cxrgaze.errors import reason

CHECKPOINT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and the batch."""


class EpochCallback(Protocol):
    def on_epoch_end(self, record: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run (stored in checkpoints and MLflow params)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def as_dict(self) -> dict[str, Any]:
        return {"model": to_dict(self.model), "loss": to_dict(self.loss), "train": to_dict(self.train)}


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

    @property
    def best_checkpoint(self) -> Path:
        return self.out_dir / "best.pt"

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "best_epoch": self.best_epoch, **self.best, "device": self.device,
                "epochs_run": len(self.history)}


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a cxrgaze checkpoint safely (``weights_only=True``); a damaged file is a clear error."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise ValueError(f"{path}: not a readable checkpoint ({reason(exc, 120)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise ValueError(f"{path}: not a cxrgaze checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return ckpt


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer must be 'adam' or 'adamw', got {cfg.optimizer!r}")


def _make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``cyclic``: the reference's triangular cyclic LR, stepped once per epoch between
    ``lr * cyclic_min_factor`` and ``lr`` with a half-cycle of ``cyclic_half_period`` epochs."""
    if cfg.scheduler == "none":
        return None
    if cfg.scheduler == "cyclic":
        return torch.optim.lr_scheduler.CyclicLR(
            optimizer, base_lr=cfg.lr * cfg.cyclic_min_factor, max_lr=cfg.lr,
            step_size_up=cfg.cyclic_half_period, mode="triangular", cycle_momentum=False)
    raise ValueError(f"train.scheduler must be 'none' or 'cyclic', got {cfg.scheduler!r}")


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The batch order of one epoch: a permutation seeded by (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return list(torch.randperm(n, generator=g).split(batch_size))


def _to_batch(data: SplitTensors, idx: torch.Tensor, device: torch.device,
              augment: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A training batch on ``device``; with ``augment`` (a seeded generator) each image and
    its gaze map get the same small random affine."""
    images = data.images[idx].float()  # (B, 1, S, S)
    gaze = data.gaze[idx].float()  # (B, 1, S, S)
    if augment is not None:
        pairs = [random_affine(torch.stack([im, gz]), generator=augment) for im, gz in zip(images, gaze)]  # (2, 1, S, S) each
        images = torch.stack([p[0] for p in pairs])
        gaze = torch.stack([p[1] for p in pairs])
    return {"image": images.to(device), "gaze": gaze.to(device), "label": data.labels[idx].to(device)}


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
    micro_batches: int = 1,
) -> TrainResult:
    """Train ``config.train.variant`` on the prepared arrays; write checkpoints to ``out_dir``.

    Resumes from ``out_dir/last.pt`` when it exists and was written with the same config
    (a different config is an error rather than a silent restart; pass ``resume=False``
    or delete the folder to start over).

    ``dist``: this process's place in a ``torchrun`` job; ``None`` reads it from the
    environment (:func:`cxrgaze.distributed.init_from_env`, which joins the job when
    ``WORLD_SIZE`` > 1). A given context with several ranks needs that process group
    initialised. ``micro_batches``: the shards each rank processes in turn per global
    batch; the global batch (``train.batch_size``) is cut into ``world_size *
    micro_batches`` contiguous shards. With one rank and ``micro_batches=1`` (the
    default) a step is one forward and backward of the whole batch, as always.
    """
    cfg = config.train
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive integer, got {micro_batches}")
    ctx = context_from_env() if dist is None else dist
    device = ctx.device(resolve_device(cfg.device))
    if dist is None:
        init_from_env(device)
    elif ctx.is_distributed and not is_active():
        raise RuntimeError(f"train(dist=rank {ctx.rank} of {ctx.world_size}) needs an initialised process group "
                           "(cxrgaze.distributed.init_from_env)")
    shards = ctx.world_size * micro_batches
    seed_everything(cfg.seed)
    train_data = load_split(prepared_dir, split_csv, "train")
    val_data = load_split(prepared_dir, split_csv, "val")
    if len(train_data) == 0 or len(val_data) == 0:
        raise ValueError(f"{split_csv}: the train and val splits must both be non-empty "
                         f"(train {len(train_data)}, val {len(val_data)})")
    if min(cfg.batch_size, len(train_data)) < shards:
        raise ValueError(f"train.batch_size {cfg.batch_size} (the global batch; {len(train_data)} training images) "
                         f"cannot be cut into {shards} shards ({ctx.world_size} rank(s) x {micro_batches} micro-batches)")

    model = build_model(config.model, variant=cfg.variant).to(device)
    optimizer = _make_optimizer(model, cfg)
    scheduler = _make_scheduler(optimizer, cfg)
    config_dict = config.as_dict()
    history: list[dict[str, Any]] = []
    best: dict[str, float] = {}
    best_epoch = -1
    start_epoch = 0

    last_path = out_dir / "last.pt"
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        if ckpt["config"] != config_dict:
            raise ValueError(f"{last_path}: written by a run with a different config; "
                             "delete the folder (or pass resume=False) to start over")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt.get("scheduler") is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        history, best, best_epoch = ckpt["history"], ckpt["best"], ckpt["best_epoch"]
        start_epoch = ckpt["epoch"] + 1
        if ckpt.get("shards", 1) != shards and ctx.is_main:
            warnings.warn(f"{last_path}: written with global batches cut into {ckpt.get('shards', 1)} shard(s), "
                          f"resumed with {shards}: the run goes on, but is not the bit-exact continuation", stacklevel=2)
    broadcast_module(model)  # every rank starts from rank 0's weights (they agree already: same seed or last.pt)
    running_stats = _running_stats(model)
    term_keys: list[str] = []

    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                if cfg.amp == "bf16" else torch.autocast(device_type=device.type, enabled=False))
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        sums: dict[str, float] = {}
        batches = _batches(len(train_data), cfg.batch_size, cfg.seed, epoch)
        augment = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch + 1) if cfg.augment else None
        bar = tqdm(batches, desc=f"{cfg.variant} epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and ctx.is_main),
                   leave=False)
        for b, idx in enumerate(bar):
            if shards > 1:
                step_sums = _sharded_backward(model, optimizer, config, train_data, idx, device, augment, autocast, ctx,
                                              micro_batches, epoch, b, running_stats, term_keys, last_path)
                term_keys = term_keys or list(step_sums)
                if cfg.clip_value > 0:
                    torch.nn.utils.clip_grad_value_(model.parameters(), cfg.clip_value)
                optimizer.step()
                for k, v in step_sums.items():
                    sums[k] = sums.get(k, 0.0) + v
                seen = sum(len(i) for i in batches[: b + 1])
                bar.set_postfix({k: f"{s / seen:.4f}" for k, s in sums.items()})
                continue
            batch = _to_batch(train_data, idx, device, augment)
            with autocast:
                loss, terms = compute_loss(model, batch, cfg.variant, config.loss)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"{cfg.variant}: loss is {loss.item()} at epoch {epoch + 1}, batch {b + 1}; "
                                       f"the last good checkpoint is {last_path if last_path.exists() else 'none (first epoch)'}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_value > 0:
                torch.nn.utils.clip_grad_value_(model.parameters(), cfg.clip_value)
            optimizer.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
            seen = sum(len(i) for i in batches[: b + 1])
            bar.set_postfix({k: f"{s / seen:.4f}" for k, s in sums.items()})
        bar.close()
        record: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        record.update({f"train_{k}": s / len(train_data) for k, s in sums.items()})
        val = validation_record(model, val_data, device, config) if ctx.is_main else None
        record.update(broadcast_object(val))  # rank 0 evaluates; every rank agrees on the best epoch
        if scheduler is not None:
            scheduler.step()
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        score = record["val_selection"]
        improved = math.isfinite(score) and (best_epoch < 0 or score > best.get("val_selection", -math.inf))
        if improved or best_epoch < 0:
            best_epoch = epoch
            best = {k: v for k, v in record.items() if k.startswith("val_")}
            if ctx.is_main:
                _atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": config_dict,
                              "epoch": epoch, "metrics": best}, out_dir / "best.pt")
        if ctx.is_main:
            _atomic_save({
                "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None},
                "epoch": epoch, "history": history, "best": best, "best_epoch": best_epoch, "config": config_dict,
                **({"shards": shards} if shards > 1 else {}),
            }, last_path)
        if progress and ctx.is_main:
            tqdm.write(f"{cfg.variant} epoch {epoch + 1}/{cfg.epochs}: "
                       + ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k.startswith(("train_", "val_auc_macro", "val_outside"))))
        for cb in callbacks:
            cb.on_epoch_end(record)

    result = TrainResult(variant=cfg.variant, out_dir=out_dir, best_epoch=best_epoch, best=best,
                         history=history, device=str(device), config=config_dict)
    if ctx.is_main:
        (out_dir / "metrics.json").write_text(json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n")
        _write_history_csv(history, out_dir / "history.csv")
    barrier()  # every rank returns once rank 0's files are complete
    return result


def _running_stats(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The (floating, integer) running-statistics buffers of the model's batch norms."""
    floats: list[torch.Tensor] = []
    ints: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            for buf in module.buffers(recurse=False):
                (floats if buf.is_floating_point() else ints).append(buf)
    return floats, ints


def _shard_seed(seed: int, epoch: int, batch: int, shard: int) -> int:
    return (((seed * 100_003 + epoch) * 100_003 + batch) * 4_099 + shard) % (2**63 - 1)


def _sharded_backward(model: nn.Module, optimizer: torch.optim.Optimizer, config: RunConfig, data: SplitTensors,
                      idx: torch.Tensor, device: torch.device, augment: torch.Generator | None, autocast: Any,
                      ctx: DistContext, micro_batches: int, epoch: int, b: int,
                      running_stats: tuple[list[torch.Tensor], list[torch.Tensor]], term_keys: list[str],
                      last_path: Path) -> dict[str, float]:
    """One global batch cut into ``world_size * micro_batches`` contiguous shards: this rank's
    shards forward and backward in turn (loss weighted by the shard's share of the batch),
    then gradients and batch-norm running statistics are summed over ranks. Leaves the
    global gradient in ``.grad``; returns the global sums of ``len(shard) * term``."""
    cfg = config.train
    n_global = len(idx)
    pieces = idx.tensor_split(ctx.world_size * micro_batches)
    starts = [0]
    for piece in pieces:
        starts.append(starts[-1] + len(piece))
    full = _to_batch(data, idx, torch.device("cpu"), augment) if augment is not None else None  # same affines as one process
    floats, ints = running_stats
    floats0 = [t.clone() for t in floats]
    ints0 = [t.clone() for t in ints]
    floats_acc = [torch.zeros_like(t) for t in floats]
    local = dict.fromkeys(term_keys, 0.0)
    nonfinite, ran, bad = 0.0, 0.0, ""
    optimizer.zero_grad(set_to_none=True)
    for s in range(ctx.rank * micro_batches, (ctx.rank + 1) * micro_batches):
        n = len(pieces[s])
        if n == 0:
            continue
        for t, t0 in zip([*floats, *ints], [*floats0, *ints0]):  # every shard starts from the same statistics
            t.copy_(t0)
        torch.manual_seed(_shard_seed(cfg.seed, epoch, b, s))  # dropout: a function of the shard, not the rank
        if full is not None:
            batch = {k: v[starts[s]:starts[s + 1]].to(device) for k, v in full.items()}
        else:
            batch = _to_batch(data, pieces[s], device)
        with autocast:
            loss, terms = compute_loss(model, batch, cfg.variant, config.loss)
        if not torch.isfinite(loss):
            nonfinite, bad = 1.0, f" (shard {s + 1}: {loss.item()})"
            break
        share = n / n_global
        (loss * share).backward()
        for acc, t in zip(floats_acc, floats):
            acc.add_(t * share)
        for k, v in terms.items():
            local[k] = local.get(k, 0.0) + float(v) * n
        ran = 1.0
    stats = all_reduce_sums({"_nonfinite": nonfinite, "_ranks": ran, **local})
    if stats.pop("_nonfinite") > 0:
        raise TrainingDiverged(f"{cfg.variant}: loss is not finite at epoch {epoch + 1}, batch {b + 1}{bad}; "
                               f"the last good checkpoint is {last_path if last_path.exists() else 'none (first epoch)'}")
    ranks = stats.pop("_ranks")
    all_reduce_gradients(model)
    ints_acc = [t * int(ran) for t in ints]  # equal on every rank that ran a shard
    all_reduce_([*floats_acc, *ints_acc])
    with torch.no_grad():
        for t, acc in zip(floats, floats_acc):
            t.copy_(acc)
        for t, acc in zip(ints, ints_acc):
            t.copy_(acc // int(ranks))
    return stats


HISTORY_EXCLUDED = ("seconds",)
"""Record fields left out of ``history.csv``: wall-clock time differs from run to run, and
the file is a DVC output that must depend only on the inputs (the times are logged to
MLflow as ``epoch_seconds`` and kept in ``last.pt``)."""


def _write_history_csv(history: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for rec in history:
        keys += [k for k in rec if k not in keys and k not in HISTORY_EXCLUDED]
    lines = [",".join(keys)]
    for rec in history:
        lines.append(",".join("" if rec.get(k) is None else (f"{rec[k]:.6g}" if isinstance(rec[k], float) else str(rec[k])) for k in keys))
    path.write_text("\n".join(lines) + "\n")


def run_seeds(params: dict[str, Any], where: str = "params.yaml") -> tuple[int, ...]:
    """The training seeds of a params mapping: ``train.seeds`` (a list: every variant is
    trained once per seed), or ``(train.seed,)`` when there is no list."""
    from cxrgaze.config import ConfigError

    train_section = params.get("train") or {}
    seeds = train_section.get("seeds")
    if seeds is None:
        return (int(train_section.get("seed", TrainConfig.seed)),)
    if (not isinstance(seeds, (list, tuple)) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"{where}: train.seeds must be a non-empty list of distinct non-negative integers, got {seeds!r}")
    if "seed" in train_section:
        raise ConfigError(f"{where}: train has both seed and seeds; keep one")
    return tuple(seeds)


def resolve_run_config(params: dict[str, Any], variant: str, where: str = "params.yaml",
                       seed: int | None = None) -> RunConfig:
    """The RunConfig of ``variant`` (for one training ``seed``) from a params mapping.

    ``model``, ``loss`` and ``train`` give the common settings; ``variants.<variant>`` may
    override any of them with its own ``model:``/``loss:``/``train:`` mappings (the
    reference tuned the baseline and the U-Net separately). ``seed`` defaults to the first
    of :func:`run_seeds`.
    """
    from cxrgaze.config import ConfigError, from_mapping

    try:
        parse_variant(variant)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    overrides = dict((params.get("variants") or {}).get(variant) or {})
    unknown = sorted(set(overrides) - {"model", "loss", "train"})
    if unknown:
        raise ConfigError(f"{where}: variants.{variant}: unknown section(s) {', '.join(unknown)}")
    sections = {}
    for name in ("model", "loss", "train"):
        merged = {**(params.get(name) or {}), **(overrides.get(name) or {})}
        if name == "train":
            merged["variant"] = variant
            merged.pop("seeds", None)
            merged["seed"] = run_seeds(params, where)[0] if seed is None else seed
        sections[name] = merged
    return RunConfig(
        model=from_mapping(ModelConfig, sections["model"], where=f"{where}: model"),
        loss=from_mapping(LossConfig, sections["loss"], where=f"{where}: loss"),
        train=from_mapping(TrainConfig, sections["train"], where=f"{where}: train"),
    )
