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

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from cxrgaze.evaluation.cascade import (CascadeStep, MapFn, _as_maps, _mean_count, cascade_randomisation, cascade_steps,
                                        reinitialise)
from cxrgaze.explain import RULES, generator_maps

__all__ = ["CASCADE_THRESHOLD", "INPUT_THRESHOLD", "CascadeStep", "MapFn", "PairwiseCorrelation", "SanityResult",
           "balanced_subset", "cascade_randomisation", "cascade_steps", "generator_map_fn", "input_dependence",
           "reinitialise", "sanity_check"]
"""The public names; the cascade's (:mod:`cxrgaze.evaluation.cascade`) are re-exported from here."""

CASCADE_THRESHOLD = 0.5
"""Pass: mean Spearman after the full cascade below this (the map depends on the weights)."""
INPUT_THRESHOLD = 0.9
"""Pass: mean same-class pairwise Pearson of the maps below this (the map depends on the image)."""


def generator_map_fn(rule: str) -> MapFn:
    """The map function of a generator rule (``grad``, ``gbp``, ``deconv``) for
    :func:`sanity_check`: ``cxrgaze.explain.generator_maps``, ``(B, 1, H, W)`` in [0, 1]."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")

    def map_fn(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        return generator_maps(model, images, targets, rule)

    map_fn.__name__ = f"generator_{rule}"
    return map_fn



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
    index, x, t, groups = _subset(images, targets, classes, n_images)
    curve, original = cascade_randomisation(model, map_fn, x, t, steps=steps, seed=seed, batch_size=batch_size)
    maps_cc = input_dependence(original, groups)
    images_cc = input_dependence(x.detach().float().cpu().numpy(), groups)
    full = curve[-1].spearman if len(curve) > 1 else math.nan
    head = next((s.spearman for s in curve if s.name == "head"), math.nan)

    reasons = (_cascade_failures(curve, full, head, cascade_threshold, head_threshold)
               + _input_failures(maps_cc, images_cc, input_threshold))
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


def _subset(images: Tensor, targets: Tensor, classes: Tensor | None,
            n_images: int) -> tuple[np.ndarray, Tensor, Tensor, Tensor]:
    """:func:`sanity_check`'s images: their indices (:func:`balanced_subset`), the images, their
    targets and their classes (``classes`` or, by default, ``targets``)."""
    if images.ndim != 4 or images.shape[0] != targets.shape[0]:
        raise ValueError(f"images (N, 1, H, W) and targets (N,) expected, got {tuple(images.shape)} "
                         f"and {tuple(targets.shape)}")
    classes = targets if classes is None else classes
    index = balanced_subset(classes, n_images)
    return index, images[index], targets[index], torch.as_tensor(classes)[index]


def _cascade_failures(curve: list[CascadeStep], full: float, head: float, cascade_threshold: float,
                      head_threshold: float | None) -> list[str]:
    """Why the cascade check failed (nothing when it passed): ``full`` is the Spearman after
    the full cascade, ``head`` after the head alone."""
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
    return reasons


def _input_failures(maps_cc: PairwiseCorrelation, images_cc: PairwiseCorrelation,
                    input_threshold: float) -> list[str]:
    """Why the input-dependence check failed (nothing when it passed)."""
    reasons = []
    if not math.isfinite(maps_cc.mean):
        reasons.append("input: no same-class pair with a defined correlation (constant maps, "
                       "or fewer than 2 images in every class)")
    elif maps_cc.mean >= input_threshold:
        reasons.append(f"input: same-class pairwise correlation {maps_cc.mean:.3f} >= {input_threshold} "
                       f"(images' own {images_cc.mean:.3f}; the map hardly depends on the image)")
    return reasons


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
