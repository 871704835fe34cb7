"""Cascading model-parameter randomisation, the first sanity check of :mod:`cxrgaze.evaluation.sanity`.

The model's layers are re-initialised progressively from the top, the classification head
first, then the encoder's stages from the last to the first, the stem last
(:func:`cascade_steps`, :func:`reinitialise`); after each step every image's map is compared
with its map under the original model by the Spearman rank correlation of the absolute maps
(:func:`cascade_randomisation`). See :mod:`cxrgaze.evaluation.sanity` for the method, its
thresholds and the random state. Also the map helpers both checks share (``map_fn`` calls
in batches, maps as ``(B, H, W)`` arrays, the mean of the finite values).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

MapFn = Callable[[nn.Module, Tensor, Tensor], "Tensor | np.ndarray"]
"""``map_fn(model, images (B, 1, H, W), targets (B,)) -> maps (B, 1, H, W) or (B, H, W)``."""


# --- the cascade ---------------------------------------------------------------------
def cascade_steps(model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """The cascade of a :func:`cxrgaze.models.build_model` model, top first.

    ``[(step name, module names), ...]``: ``head`` (``classification_head``), then
    ``stage{k}`` for the encoder's stages from the deepest (largest ``k``) to the first,
    then ``stem`` (the layers before the first stage). Step ``i`` of the cascade
    re-initialises its modules *and* those of every step before it. The decoder is not
    part of the cascade: the generators and Grad-CAM run through the encoder and head.

    Stages: for smp's EfficientNet encoders (``efficientnet-b0``) the runs of ``_blocks``
    that end at each output feature (4 stages); otherwise (``tu-*`` timm encoders, smp
    ResNets) the encoder's top-level containers of blocks, a container of such
    containers expanded (``tu-tinynet_e``: ``blocks.0`` ... ``blocks.6``, 7 stages;
    ResNets: ``layer1`` ... ``layer4``). The stem is every layer with parameters before
    the first stage; layers with parameters after the last stage join it.
    """
    steps: list[tuple[str, tuple[str, ...]]] = []
    if getattr(model, "classification_head", None) is not None:
        steps.append(("head", ("classification_head",)))
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        raise ValueError("the model has no encoder: build it with cxrgaze.models.build_model")
    stem, stages = _encoder_stages(encoder)
    for k in range(len(stages), 0, -1):
        steps.append((f"stage{k}", tuple(f"encoder.{n}" for n in stages[k - 1])))
    if stem:
        steps.append(("stem", tuple(f"encoder.{n}" for n in stem)))
    return steps


def _encoder_stages(encoder: nn.Module) -> tuple[list[str], list[list[str]]]:
    """``(stem module names, [stage module names, ...] first to last)``, relative to ``encoder``."""
    if hasattr(encoder, "_blocks") and hasattr(encoder, "_out_indexes"):  # smp EfficientNet
        stages, start = [], 0
        for end in encoder._out_indexes:
            stages.append([f"_blocks.{i}" for i in range(start, end + 1)])
            start = end + 1
        return ["_conv_stem", "_bn0"], stages
    root, base = (encoder.model, "model.") if isinstance(getattr(encoder, "model", None), nn.Module) else (encoder, "")
    stem: list[str] = []
    stages: list[list[str]] = []
    for name, child in root.named_children():
        if not _has_params(child):
            continue
        if _is_container(child) and all(_is_stage(c) for c in child.children() if _has_params(c)) \
                and any(_has_params(c) for c in child.children()):
            stages.extend([[f"{base}{name}.{n}"] for n, c in child.named_children() if _has_params(c)])
        elif _is_stage(child):
            stages.append([f"{base}{name}"])
        elif stages:  # after the last stage: with the deepest one
            stages[-1].append(f"{base}{name}")
        else:
            stem.append(f"{base}{name}")
    if not stages:  # no container of blocks: the whole encoder is one stage
        return [], [stem] if stem else []
    return stem, stages


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.Sequential, nn.ModuleList))


def _is_stage(module: nn.Module) -> bool:
    """A container of blocks (modules whose own children have parameters)."""
    return _is_container(module) and any(
        any(_has_params(grandchild) for grandchild in child.children()) for child in module.children()
    )


def reinitialise(module: nn.Module) -> int:
    """Re-initialise every parameter of ``module`` in place from torch's global RNG;
    returns the number of parameter tensors drawn again."""
    done: set[int] = set()
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
            done.update(id(p) for p in sub.parameters(recurse=False))
    count = len(done)
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in done:
                p.normal_(0.0, 0.02)
                count += 1
    return count


@dataclass(frozen=True)
class CascadeStep:
    """One step of the cascade: the mean Spearman of the maps after it, over ``n`` images."""

    name: str
    """``original`` (no randomisation: 1 by construction), ``head``, ``stage{k}``, ``stem``."""
    modules: tuple[str, ...]
    """The modules this step re-initialises (those of the earlier steps stay random)."""
    spearman: float
    """Mean over images of the Spearman correlation of the absolute maps; NaN if none finite."""
    n: int
    """Images with a finite correlation."""
    n_nan: int
    """Images where it is undefined (a constant map)."""


def cascade_randomisation(
    model: nn.Module,
    map_fn: MapFn,
    images: Tensor,
    targets: Tensor,
    steps: Sequence[tuple[str, Sequence[str]]] | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> tuple[list[CascadeStep], np.ndarray]:
    """The cascade's Spearman curve and the original maps ``(B, H, W)``.

    ``steps`` defaults to :func:`cascade_steps`; pass a prefix of it (or any list of
    ``(name, module names)``) to stop early. Runs on a deep copy of ``model`` in eval
    mode; re-initialisation is seeded with ``seed`` and the step's position, inside
    ``fork_rng`` so the caller's random state is untouched. ``targets`` are the classes
    explained, the same at every step (the original model's classes, not the random
    model's predictions).
    """
    steps = cascade_steps(model) if steps is None else steps
    work = copy.deepcopy(model).eval()
    device = _device(work)
    images, targets = images.to(device, torch.float32), targets.to(device)
    with torch.random.fork_rng(devices=_cuda_indices()):
        original = _maps(work, map_fn, images, targets, batch_size)  # (B, H, W)
        curve = [CascadeStep("original", (), *_mean_spearman(original, original))]
        modules = dict(work.named_modules())
        for position, (name, names) in enumerate(steps):
            missing = [n for n in names if n not in modules]
            if missing:
                raise ValueError(f"cascade step {name!r}: no module {', '.join(missing)}")
            torch.manual_seed(seed * 1_000_003 + position)
            for module_name in names:
                reinitialise(modules[module_name])
            randomised = _maps(work, map_fn, images, targets, batch_size)
            curve.append(CascadeStep(name, tuple(names), *_mean_spearman(original, randomised)))
    return curve, original


def _mean_spearman(a: np.ndarray, b: np.ndarray) -> tuple[float, int, int]:
    values = []
    for x, y in zip(a, b):
        x, y = np.abs(x).ravel(), np.abs(y).ravel()
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            values.append(math.nan)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values.append(float(stats.spearmanr(x, y).statistic))
    return _mean_count(np.asarray(values, dtype=np.float64))


def _mean_count(values: np.ndarray) -> tuple[float, int, int]:
    finite = np.isfinite(values)
    n = int(finite.sum())
    return (float(values[finite].mean()) if n else math.nan), n, int(values.size - n)


# --- helpers ----------------------------------------------------------------------------
def _maps(model: nn.Module, map_fn: MapFn, images: Tensor, targets: Tensor, batch_size: int) -> np.ndarray:
    out = [_as_maps(map_fn(model, images[i:i + batch_size], targets[i:i + batch_size]))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)  # (B, H, W)


def _as_maps(maps: Tensor | np.ndarray) -> np.ndarray:
    """(B, 1, H, W) or (B, H, W), tensor or array -> float64 array (B, H, W)."""
    if isinstance(maps, Tensor):
        maps = maps.detach().float().cpu().numpy()
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, 1, H, W) or (B, H, W), got shape {maps.shape}")
    return maps


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _cuda_indices() -> list[int]:
    """Every CUDA device (``torch.manual_seed`` seeds them all), none without CUDA."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
