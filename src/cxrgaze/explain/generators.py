"""Heatmap generators as functions: ``attribute`` (one model, one rule) and ``heatmap``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cxrgaze.explain.rules import RULES
from cxrgaze.explain.tracing import trace
from cxrgaze.models import class_logits


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

    The model's train/eval mode is the caller's: in train mode BatchNorm uses (and
    updates) batch statistics as in any forward, so the map depends on the batch.
    To share one forward with a loss, use :func:`cxrgaze.explain.trace` directly.
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
