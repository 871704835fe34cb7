"""Checkpoints, one home: the file format, atomic saving, safe loading, and the model in one.

A checkpoint is a ``torch.save``'d dict of tensors and plain data (loaded with
``weights_only=True``, so a foreign file cannot run code):

* ``best.pt`` (the kept epoch): ``format``, ``model`` (state dict), ``config``
  (:meth:`cxrgaze.config.RunConfig.as_dict`), ``epoch`` (0-based), ``metrics`` (its
  validation record);
* ``last.pt`` (resume state, rewritten every epoch): the same plus ``optimizer``,
  ``scheduler``, ``rng``, ``history``, ``best``, ``best_epoch`` and, for sharded steps,
  ``shards``.

Only this module reads a checkpoint's variant (:func:`load_model`); everything else asks it
for the model, the config or the :class:`~cxrgaze.variants.Variant`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from cxrgaze.config import ModelConfig, from_mapping
from cxrgaze.errors import reason
from cxrgaze.models import GazeNet, build_model
from cxrgaze.variants import Variant, parse_variant

CHECKPOINT_FORMAT = 1
"""Bumped when the layout of the dict changes; older files are refused with a clear error."""


class LoadedModel(NamedTuple):
    """A checkpoint's model (on the requested device, in eval mode), its run config as a
    dict, and its variant."""

    model: GazeNet
    config: dict[str, Any]
    variant: Variant


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` (with the current ``format``) atomically: a killed process leaves
    the previous file, never a truncated one."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
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


def config_variant(config: dict[str, Any]) -> Variant:
    """The :class:`~cxrgaze.variants.Variant` of a run config as checkpoints and MLflow runs
    carry it (:meth:`cxrgaze.config.RunConfig.as_dict`)."""
    return parse_variant(config["train"]["variant"])


def checkpoint_variant(ckpt: dict[str, Any]) -> Variant:
    """The :class:`~cxrgaze.variants.Variant` a loaded checkpoint was trained as."""
    return config_variant(ckpt["config"])


def model_from_checkpoint(ckpt: dict[str, Any], where: str | Path = "checkpoint") -> GazeNet:
    """The network of a loaded checkpoint, with its weights, on the CPU in train mode."""
    model = build_model(from_mapping(ModelConfig, ckpt["config"]["model"], where=f"{where}: model"),
                        variant=checkpoint_variant(ckpt).name)
    model.load_state_dict(ckpt["model"])
    return model


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """The model of a checkpoint file in eval mode on ``device``, its config and its variant."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    return LoadedModel(model.to(device).eval(), ckpt["config"], checkpoint_variant(ckpt))
