"""Class scores on arrays: the one place where logits become scores.

The classifier is trained with ``loss.cls_loss``; its scores must be the probabilities
that loss models, everywhere a score is read (training curves, checkpoint selection,
tuning, evaluation, the registry and the served model):

- ``bce`` (per-class BCE-with-logits on the one-hot label, the reference): each class is
  an independent binary problem, so its score is ``sigmoid(logit_k)``. The K scores do not
  sum to 1.
- ``ce`` (cross-entropy): the classes compete, so the scores are ``softmax(logits)``.

AUCs only depend on the ranking within a class, and ``sigmoid`` and ``softmax`` rank a
class's cases differently, so the choice changes the AUCs, not only the printed values.
The predicted class is the arg-max of the scores in both cases.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cxrgaze.explain import UnsupportedActivation, generator_maps
from cxrgaze.losses import outside_mass
from cxrgaze.models import class_logits

SCORING: dict[str, str] = {"bce": "sigmoid", "ce": "softmax"}
"""``loss.cls_loss`` -> the name of its scoring rule."""


def scoring_rule(cls_loss: str) -> str:
    """``"sigmoid"`` for ``bce``, ``"softmax"`` for ``ce``; a clear error otherwise."""
    try:
        return SCORING[cls_loss]
    except KeyError:
        raise ValueError(f"loss.cls_loss must be one of {', '.join(SCORING)}, got {cls_loss!r}") from None


def apply_rule(logits: Tensor, rule: str) -> Tensor:
    """Scores (..., K) of logits (..., K) under a scoring rule (``sigmoid`` or ``softmax``
    over the last axis), in float32, or float64 for float64 logits."""
    if rule not in SCORING.values():
        raise ValueError(f"scoring must be one of {', '.join(SCORING.values())}, got {rule!r}")
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.sigmoid(logits) if rule == "sigmoid" else torch.softmax(logits, dim=-1)


def scores_from_logits(logits: Tensor, cls_loss: str) -> Tensor:
    """Class scores (N, K) in [0, 1] of class logits (N, K) under ``cls_loss``'s rule
    (see the module docstring)."""
    return apply_rule(logits, scoring_rule(cls_loss))


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, device: torch.device | str, batch_size: int = 64) -> Tensor:
    """Class logits (N, K) of ``images`` (N, 1, S, S), through the encoder and head only,
    in eval mode, on the CPU in float32."""
    model.eval()
    out = [class_logits(model, images[i:i + batch_size].to(device, torch.float32)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, 0)


def selection_score(auc: float, outside_mass: float, gaze_weight: float) -> float:
    """The score that checkpoint selection, tuning and (optionally) the registry maximise:
    ``auc - gaze_weight * outside_mass`` (``auc`` alone when the weight is 0;
    ``TrainConfig.selection_gaze_weight``)."""
    return auc - gaze_weight * outside_mass if gaze_weight > 0 else auc


def generator_outside_mass(model: nn.Module, images: Tensor, gaze: Tensor, targets: Tensor, rule: str,
                           device: torch.device | str, batch_size: int = 64) -> Tensor:
    """Share of each image's generator map mass outside its gaze (N,) in [0, 1]
    (:func:`cxrgaze.losses.outside_mass` of :func:`cxrgaze.explain.generator_maps`), in eval
    mode, explaining ``targets`` (N,); on the CPU in float32."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device, torch.float32)
        maps = generator_maps(model, x, targets[i:i + batch_size].to(device), rule).detach()
        out.append(outside_mass(maps, gaze[i:i + batch_size].to(device, torch.float32)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def selection_metrics(model: nn.Module, images: Tensor, gaze: Tensor, labels: Tensor, val_auc: float, rule: str,
                      gaze_weight: float, device: torch.device | str, batch_size: int = 64) -> dict[str, float]:
    """``val_outside_mass`` (the mean of :func:`generator_outside_mass` on validation,
    explaining the true class) and ``val_selection`` (:func:`selection_score`): what training,
    tuning and evaluation record. An encoder that ``rule`` has no backward rule for loses the
    diagnostic (NaN) unless ``gaze_weight`` needs it, which is an error."""
    try:
        mass = float(generator_outside_mass(model, images, gaze, labels, rule, device, batch_size).mean())
    except UnsupportedActivation as exc:
        if gaze_weight > 0:
            raise ValueError(f"train.selection_gaze_weight {gaze_weight}: {exc}") from None
        mass = math.nan
    return {"val_outside_mass": mass, "val_selection": selection_score(val_auc, mass, gaze_weight)}
