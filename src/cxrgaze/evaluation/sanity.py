"""Sanity checks of heatmap generators (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

A heatmap that explains a classifier must depend on the classifier's weights and on the
image. Two checks, for any map function ``map_fn(model, images, targets)`` returning
``(B, 1, H, W)`` (or ``(B, H, W)``, tensor or array) maps:

- **Cascading model-parameter randomisation** (:func:`cascade_randomisation`): the
  model's layers are re-initialised progressively from the top, the classification
  head first, then the encoder's stages from the last to the first, the stem last
  (:func:`cascade_steps`). After each step every image's map under the partly random
  model is compared with its map under the original model by the Spearman rank
  correlation of the absolute maps (Adebayo's "absolute value" variant: a map's sign is
  not its saliency, and the [0, 1] maps of ``cxrgaze.explain.heatmap`` are absolute
  anyway), averaged over images. A map that explains the model changes once the model
  is random: after the full cascade the correlation must fall below
  ``cascade_threshold`` (0.5 by default; Adebayo's gradient and Grad-CAM fall to about
  0 and guided backprop stays high). A map function that ignores the model (an edge
  detector, the image itself) stays at 1.
- **Input dependence** (:func:`input_dependence`): the mean Pearson correlation of the
  absolute maps of pairs of different images of the same class (each class's pairs
  averaged, then the classes), next to the same number for the images themselves
  (chest X-rays are alike, so the images' own correlation is the baseline). A map that
  is nearly the same for every image, as DeconvNet's can be on a network without
  max-pool switches (EfficientNet), scores near 1; at or above ``input_threshold``
  (0.9 by default) the check fails.

The checks run on a deep copy of the model in eval mode (the caller's model, its mode and
its weights are untouched) and inside ``torch.random.fork_rng`` (the caller's CPU and
CUDA random states are as before). Re-initialisation uses each module's
``reset_parameters`` (PyTorch's default initialisation: Kaiming-uniform convolutions and
linear layers, BatchNorm reset to the identity with running mean 0 and variance 1),
seeded per step from ``seed``; a module with parameters but no ``reset_parameters`` gets
them drawn from N(0, 0.02^2). Cost: ``1 + len(steps)`` calls of ``map_fn`` on
``n_images`` images.

:func:`sanity_check` runs both and returns a :class:`SanityResult` with ``passed``, the
reasons and a flat ``to_metrics(prefix)`` dict for ``metrics.json`` and MLflow.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

MapFn = Callable[[nn.Module, Tensor, Tensor], "Tensor | np.ndarray"]
"""``map_fn(model, images (B, 1, H, W), targets (B,)) -> maps (B, 1, H, W) or (B, H, W)``."""

CASCADE_THRESHOLD = 0.5
"""Pass: mean Spearman after the full cascade below this (the map depends on the weights)."""
INPUT_THRESHOLD = 0.9
"""Pass: mean same-class pairwise Pearson of the maps below this (the map depends on the image)."""


def generator_map_fn(rule: str) -> MapFn:
    """The map function of a generator rule (``grad``, ``gbp``, ``deconv``) for
    :func:`sanity_check`: ``cxrgaze.explain.generator_maps``, ``(B, 1, H, W)`` in [0, 1]."""
    from cxrgaze.explain import RULES, generator_maps

    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")

    def map_fn(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        return generator_maps(model, images, targets, rule)

    map_fn.__name__ = f"generator_{rule}"
    return map_fn


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


# --- input dependence -----------------------------------------------------------------
@dataclass(frozen=True)
class PairwiseCorrelation:
    """Mean Pearson correlation of same-class pairs: per class, then over classes."""

    mean: float
    """Mean over classes of each class's mean over its pairs; NaN if no finite pair."""
    n: int
    """Pairs with a finite correlation (all classes)."""
    n_nan: int
    """Pairs where it is undefined (a constant map)."""
    n_classes: int
    """Classes with at least one finite pair."""
    by_class: dict[int, tuple[float, int, int]] = field(default_factory=dict)
    """``class -> (mean, n, n_nan)``."""


def input_dependence(maps: Tensor | np.ndarray, classes: Tensor | np.ndarray | Sequence[int]) -> PairwiseCorrelation:
    """Mean pairwise Pearson correlation of the absolute ``maps`` (B, H, W) or (B, 1, H, W)
    of different images of the same class (``classes`` (B,)).

    Every pair ``i < j`` with ``classes[i] == classes[j]`` counts once; a class with one
    image contributes nothing. Near 1: the maps hardly depend on the image.
    """
    flat = np.abs(_as_maps(maps)).reshape(len(maps), -1)  # (B, H*W)
    classes = np.asarray(classes.cpu() if isinstance(classes, Tensor) else classes).ravel()
    if classes.shape[0] != flat.shape[0]:
        raise ValueError(f"{flat.shape[0]} maps but {classes.shape[0]} classes")
    by_class: dict[int, tuple[float, int, int]] = {}
    for c in np.unique(classes):
        rows = flat[classes == c]
        if len(rows) < 2:
            continue
        i, j = np.triu_indices(len(rows), k=1)
        by_class[int(c)] = _mean_count(_pearson(rows[i], rows[j]))
    means = np.array([m for m, n, _ in by_class.values() if n > 0], dtype=np.float64)
    return PairwiseCorrelation(
        mean=float(means.mean()) if means.size else math.nan,
        n=sum(n for _, n, _ in by_class.values()),
        n_nan=sum(k for _, _, k in by_class.values()),
        n_classes=int(means.size),
        by_class=by_class,
    )


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of (P, N) arrays; NaN where a row is constant."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))  # (P,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(axis=1) / np.where(denom > 0, denom, 1.0), math.nan)


# --- both checks ------------------------------------------------------------------------
@dataclass
class SanityResult:
    """The two checks of one map function on one model."""

    name: str
    cascade: list[CascadeStep]
    """The Spearman curve: ``original`` (1), then each step of the cascade, cumulative."""
    cascade_spearman: float
    """Mean Spearman after the full cascade (the last step)."""
    head_spearman: float
    """Mean Spearman after re-initialising the classification head alone (NaN if not run)."""
    input_pairwise_cc: PairwiseCorrelation
    """Same-class pairwise correlation of the maps."""
    image_pairwise_cc: PairwiseCorrelation
    """The same for the images themselves: the baseline the maps' value compares with."""
    n_images: int
    cascade_threshold: float
    input_threshold: float
    head_threshold: float | None
    passed: bool
    reasons: list[str]
    seconds: float

    def to_metrics(self, prefix: str = "sanity_") -> dict[str, float]:
        """Flat metrics, e.g. with ``prefix="sanity_generator_"``: ``..._cascade_spearman``
        (and ``_n``), ``..._head_spearman``, ``..._cascade_<step>_spearman`` per step,
        ``..._input_pairwise_cc`` (and ``_n`` pairs, ``_nan``), ``..._image_pairwise_cc``,
        ``..._n_images`` and ``..._passed`` (1.0 or 0.0)."""
        last = self.cascade[-1]
        out = {
            f"{prefix}cascade_spearman": self.cascade_spearman,
            f"{prefix}cascade_spearman_n": float(last.n),
            f"{prefix}head_spearman": self.head_spearman,
        }
        for step in self.cascade[1:]:
            out[f"{prefix}cascade_{step.name}_spearman"] = step.spearman
        out.update({
            f"{prefix}input_pairwise_cc": self.input_pairwise_cc.mean,
            f"{prefix}input_pairwise_cc_n": float(self.input_pairwise_cc.n),
            f"{prefix}input_pairwise_cc_nan": float(self.input_pairwise_cc.n_nan),
            f"{prefix}image_pairwise_cc": self.image_pairwise_cc.mean,
            f"{prefix}n_images": float(self.n_images),
            f"{prefix}passed": 1.0 if self.passed else 0.0,
        })
        return out


def sanity_check(
    model: nn.Module,
    map_fn: MapFn,
    images: Tensor,
    targets: Tensor,
    classes: Tensor | None = None,
    n_images: int = 16,
    steps: Sequence[tuple[str, Sequence[str]]] | None = None,
    cascade_threshold: float = CASCADE_THRESHOLD,
    input_threshold: float = INPUT_THRESHOLD,
    head_threshold: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    name: str = "generator",
) -> SanityResult:
    """Both sanity checks of ``map_fn`` on ``model`` with ``images`` (N, 1, H, W).

    ``targets`` (N,) are the classes the maps explain (the predicted classes in
    ``cxrgaze.evaluate``); ``classes`` (N,) group the images for the input-dependence
    check (default: ``targets``). Up to ``n_images`` images are used, taken class by
    class in turn (round robin over the sorted classes, each class in its given order),
    so every class gets pairs; the choice is deterministic.

    Passed when the mean Spearman after the full cascade is below ``cascade_threshold``
    and the maps' same-class pairwise correlation is below ``input_threshold``; an
    undefined (NaN) value fails its check. With ``head_threshold`` set, the Spearman
    after re-initialising the head alone must be below it too (Adebayo's finding for
    guided backprop is a map that does not change at all when the top layers do; the
    full cascade alone may still pass it, as its maps follow the image's edges less once
    the lower layers are random). ``reasons`` says which failed and why.
    """
    start = time.perf_counter()
    if images.ndim != 4 or images.shape[0] != targets.shape[0]:
        raise ValueError(f"images (N, 1, H, W) and targets (N,) expected, got {tuple(images.shape)} "
                         f"and {tuple(targets.shape)}")
    classes = targets if classes is None else classes
    index = balanced_subset(classes, n_images)
    x, t, groups = images[index], targets[index], torch.as_tensor(classes)[index]
    curve, original = cascade_randomisation(model, map_fn, x, t, steps=steps, seed=seed, batch_size=batch_size)
    maps_cc = input_dependence(original, groups)
    images_cc = input_dependence(x.detach().float().cpu().numpy(), groups)
    full = curve[-1].spearman if len(curve) > 1 else math.nan
    head = next((s.spearman for s in curve if s.name == "head"), math.nan)

    reasons = []
    if len(curve) == 1:
        reasons.append("cascade: no step to run")
    elif not math.isfinite(full):
        reasons.append(f"cascade: Spearman after {curve[-1].name} undefined (constant maps)")
    elif full >= cascade_threshold:
        reasons.append(f"cascade: Spearman after {curve[-1].name} {full:.3f} >= {cascade_threshold} "
                       "(the map hardly depends on the weights)")
    if head_threshold is not None and not (head < head_threshold):
        reasons.append(f"cascade: Spearman after head {head:.3f}, not below {head_threshold} "
                       "(the map ignores the classification head)")
    if not math.isfinite(maps_cc.mean):
        reasons.append("input: no same-class pair with a defined correlation (constant maps, "
                       "or fewer than 2 images in every class)")
    elif maps_cc.mean >= input_threshold:
        reasons.append(f"input: same-class pairwise correlation {maps_cc.mean:.3f} >= {input_threshold} "
                       f"(images' own {images_cc.mean:.3f}; the map hardly depends on the image)")
    return SanityResult(
        name=name,
        cascade=curve,
        cascade_spearman=full,
        head_spearman=head,
        input_pairwise_cc=maps_cc,
        image_pairwise_cc=images_cc,
        n_images=len(index),
        cascade_threshold=cascade_threshold,
        input_threshold=input_threshold,
        head_threshold=head_threshold,
        passed=not reasons,
        reasons=reasons,
        seconds=time.perf_counter() - start,
    )


def balanced_subset(classes: Tensor | np.ndarray | Sequence[int], n: int) -> np.ndarray:
    """Indices of up to ``n`` items taken class by class in turn (sorted classes, each in
    its given order): deterministic, and every class with two items gets a pair."""
    if n < 1:
        raise ValueError(f"n_images must be at least 1, got {n}")
    classes = np.asarray(classes.cpu() if isinstance(classes, Tensor) else classes).ravel()
    queues = [list(np.flatnonzero(classes == c)) for c in np.unique(classes)]
    chosen: list[int] = []
    while len(chosen) < min(n, classes.size):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(int(queue.pop(0)))
    return np.array(chosen, dtype=np.int64)


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
