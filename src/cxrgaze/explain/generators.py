"""Heatmap generators as functions: :func:`generator_maps` (the map of each image, the one
entry point of training, evaluation and serving), ``attribute`` (the raw attribution) and
``heatmap`` (attribution -> map).

A generator map belongs to one image: the map of image ``i`` is the attribution of image
``i``'s own target logit to image ``i``. In train mode batch norm normalises with the
batch's statistics; inside the generator's backward they are constants
(:mod:`cxrgaze.explain.ops`), so no image's map contains another image's logit, and the
map trained is the map evaluated and served (eval mode: running statistics).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cxrgaze.explain.rules import RULES
from cxrgaze.explain.tracing import Trace, trace
from cxrgaze.models import class_logits


def generator_maps(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    rule: str,
    create_graph: bool = False,
    *,
    traced_forward: tuple[Trace, Tensor] | None = None,
) -> Tensor:
    """The generator map of each image: ``(B, 1, H, W)`` in [0, 1].

    ``images`` (B, C, H, W); ``targets`` (B,) the class each map explains; ``rule`` one of
    ``grad``, ``gbp``, ``deconv`` (:mod:`cxrgaze.explain.rules`). The map of image ``i``
    is :func:`heatmap` of the attribution of its own ``targets[i]`` logit to it and depends
    on no other image of the batch (in train mode, given the batch's batch-norm statistics,
    which the generator's backward holds constant). With ``create_graph=True`` the maps are
    differentiable with respect to the parameters (second order, exact).

    ``traced_forward=(tr, class_logits)`` reuses a forward pass the caller already ran,
    so that a loss and the generator share one forward::

        x = images.detach().requires_grad_(True)
        with trace(model) as tr:
            mask_logits, logits = model(x)
        h = generator_maps(model, x, y, "gbp", create_graph=True, traced_forward=(tr, logits))

    ``class_logits`` (B, K) must come from that traced forward of exactly ``images``
    (which must require grad); the model is not run again. Without it the model is run
    once, traced, on ``images`` (through ``classify`` when it has one: no decoder). The
    model's train/eval mode is the caller's; a train-mode forward updates the batch-norm
    running statistics once, as any forward does.
    """
    if traced_forward is None:
        return heatmap(attribute(model, images, targets, rule, create_graph=create_graph))
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    if not images.requires_grad:
        raise ValueError("traced_forward: `images` must be the tensor the traced forward ran on, "
                         "with requires_grad=True")
    tr, logits = traced_forward
    with torch.enable_grad():
        return heatmap(tr.attribute(logits, images, targets, rule, create_graph=create_graph))


def attribute(
    model: nn.Module,
    images: Tensor,
    target: Tensor,
    rule: str,
    create_graph: bool = False,
) -> Tensor:
    """Attribution of the ``target`` class logits to ``images`` under ``rule``.

    ``images`` (B, C, H, W); ``target`` (B,) class indices; ``rule`` one of ``grad``,
    ``gbp``, ``deconv`` (see :mod:`cxrgaze.explain.rules`). ``model(images)`` returns class
    logits or a ``(mask_logits, class_logits)`` pair; a model with ``classify`` is run
    through it (no decoder). Returns a tensor shaped like ``images``; with
    ``create_graph=True`` it is differentiable with respect to the model's parameters.

    The model's train/eval mode is the caller's: in train mode BatchNorm normalises with
    (and updates) the batch's statistics as in any forward, and the generator's backward
    holds them constant, so image ``i``'s attribution is that of its own logit alone
    (given the batch's statistics). For maps use :func:`generator_maps`, which also
    shares a loss's forward.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    x = images if images.requires_grad else images.detach().requires_grad_(True)
    with torch.enable_grad():
        with trace(model) as tr:
            logits = class_logits(model, x)
        return tr.attribute(logits, x, target, rule, create_graph=create_graph)


def heatmap(attribution: Tensor) -> Tensor:
    """``(B, C, H, W)`` attribution -> ``(B, 1, H, W)`` map in [0, 1].

    Maximum of the absolute value over channels, divided by each image's maximum; an
    all-zero map stays zero. The maximum pixel is exactly 1: clamp before a BCE.
    """
    amplitude = attribution.abs().amax(dim=1, keepdim=True)  # (B, 1, H, W)
    peak = amplitude.flatten(1).amax(dim=1).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return amplitude / torch.where(peak > 0, peak, torch.ones_like(peak))
