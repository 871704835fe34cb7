"""The objectives of the baseline, the U-Net, the paper's experiment sets 1-3 and
"right for the right reasons".

Notation (DESIGN.md): ``L_cls`` classification loss, ``M`` decoder mask logits, ``G``
gaze heatmap in [0, 1], ``H`` generator heatmap in [0, 1], ``L_s`` a heatmap loss.

============== ===================================================== =================
variant        loss                                                  model
============== ===================================================== =================
``baseline``   ``L_cls``                                             encoder + head
``unet``       ``g L_cls + (1-g) L_s(M, G)``                         U-Net
``set1-R``     ``g L_cls + (1-g) L_H(H, G)``                         U-Net (no decoder pass)
``set2-R``     ``g L_cls + (1-g) L_s(M, H)`` (H detached by default) U-Net
``set3-R``     ``g L_cls + (1-g) (a L_s(M, G) + (1-a) L_H(H, G))``   U-Net
``rrr-R``      ``L_cls + l R(A, G)``                                 encoder + head
============== ===================================================== =================

``R`` is the generator rule: ``gbp``, ``deconv`` or ``grad`` (plain input gradient).
``g`` is ``LossConfig.gamma``, ``a`` ``alpha``, ``l`` ``rrr_weight``
(:mod:`cxrgaze.variants` is the table's home).

The generator-vs-gaze loss ``L_H(H, G) = L_s(H, G) + b_mass mass(H, G) + b_out out(H, G)``
has two optional terms (weights ``mass_weight`` and ``outside_weight``, 0 by default, so
that ``L_H = L_s`` as in the paper). They pull the whole map toward the gaze by the share
of its mass, not by a pixel mean; neither "sees" a small shortcut directly (the synthetic
marker covers about 6 of 4096 pixels at 64 px), but a map held on the gaze leaves it:

- ``mass(H, G) = sum H (1 - G) / sum H``: the share of the map's mass outside the gaze
  (:func:`outside_mass`), scale-free, 0 when all the map lies where the radiologist looked;
- ``out(H, G) = mean ((1 - G) H)^2``: an "outside-gaze" penalty (:func:`outside_penalty`),
  the map analogue of Ross et al.'s term.

("KL from the gaze distribution" is ``map_loss: kl``.)

``rrr-R`` is Ross, Hughes and Doshi-Velez 2017, "Right for the right reasons":
``R(A, G) = sum_pixels ((1 - G) A)^2`` averaged over images, ``A`` the attribution under
rule ``R`` of the summed log-probabilities ``sum_k log p_k`` of each image (its own, as
every generator map here; ``p`` the scores of ``cls_loss``: a sigmoid per class for
``bce``, the softmax for ``ce``). Ross et al. use a binary mask of irrelevant pixels;
``1 - G`` is its soft version. ``A`` is not normalised (the raw input gradient, as in the
paper), so ``l`` is on the gradients' scale: Ross et al. pick it so that both terms are
of the same order; tune it on a log scale.

A term whose weight is 0 is not computed (so ``alpha=1`` is exactly ``unet``,
``alpha=0`` exactly ``set1``, ``gamma=1`` exactly ``L_cls`` and ``rrr_weight=0``
exactly ``baseline``'s loss).

The forward pass is shared: one traced forward gives the class logits, the mask and
the generator's gradient (``cxrgaze.explain.trace``); the generator's call uses
``create_graph=True`` only where its map is trained (sets 1 and 3, set 2 undetached, rrr).
"""

from __future__ import annotations

import contextlib
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cxrgaze.config import LossConfig
from cxrgaze.explain import Trace, generator_maps, trace
from cxrgaze.models import class_logits, split_outputs
from cxrgaze.variants import VARIANTS, Variant, parse_variant  # noqa: F401  (re-exported)


class LossOutput(NamedTuple):
    """Everything one objective evaluation produced."""

    total: Tensor
    """The scalar to backpropagate."""
    terms: dict[str, Tensor]
    """Detached scalars for logging: ``loss``, ``cls`` and, where computed,
    ``mask_gaze`` (L_s(M, G)), ``gen_gaze`` (L_H(H, G)), ``mask_gen`` (L_s(M, H)),
    ``gen_mass`` and ``gen_outside`` (the unweighted optional terms of L_H), ``rrr``
    (R(A, G))."""
    class_logits: Tensor
    """(B, K)"""
    mask_logits: Tensor | None
    """(B, 1, H, W) where the decoder ran."""
    generator_map: Tensor | None
    """(B, 1, H, W) generator heatmap H in [0, 1] where a generator map was computed."""


def classification_loss(logits: Tensor, label: Tensor, kind: str = "bce") -> Tensor:
    """``L_cls`` of logits (B, K) against labels (B,) as indices or (B, K) one-hot.

    ``bce``: BCE-with-logits on the one-hot label (reference); ``ce``: cross-entropy.
    Computed in float32.
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    if label.ndim == 1:
        index = label.long()
        one_hot = F.one_hot(index, num_classes).float()  # (B, K)
    else:
        one_hot = label.float()
        index = one_hot.argmax(dim=1)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, one_hot)
    if kind == "ce":
        return F.cross_entropy(logits, index)
    raise ValueError(f"classification loss must be 'bce' or 'ce', got {kind!r}")


def map_loss(
    pred: Tensor,
    target: Tensor,
    kind: str = "bce",
    logits: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """``L_s(pred, target)`` between maps (B, 1, H, W); ``target`` in [0, 1].

    ``pred`` is mask logits (``logits=True``) or a map in [0, 1] (a generator heatmap;
    clamped to ``[eps, 1 - eps]`` before a BCE). ``bce``: mean pixel BCE; ``mse``: mean
    squared error of [0, 1] maps; ``kl``: each map normalised to a distribution over
    pixels (``eps`` added), ``KL(target || pred)`` summed over pixels, averaged over
    images (the saliency-benchmark KL). Computed in float32.
    """
    if pred.shape != target.shape:
        raise ValueError(f"map shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    pred, target = pred.float(), target.float()
    if kind == "bce":
        if logits:
            return F.binary_cross_entropy_with_logits(pred, target)
        p = pred.clamp(eps, 1 - eps)
        # Written out: F.binary_cross_entropy refuses to run under CUDA autocast.
        return -(target * torch.log(p) + (1 - target) * torch.log1p(-p)).mean()
    prob = torch.sigmoid(pred) if logits else pred
    if kind == "mse":
        return F.mse_loss(prob, target)
    if kind == "kl":
        p = _distribution(target, eps)  # (B, N)
        q = _distribution(prob, eps)  # (B, N)
        return (p * (p.log() - q.log())).sum(dim=1).mean()
    raise ValueError(f"map loss must be 'bce', 'kl' or 'mse', got {kind!r}")


def _distribution(maps: Tensor, eps: float) -> Tensor:
    flat = maps.flatten(1).clamp_min(0) + eps  # (B, N)
    return flat / flat.sum(dim=1, keepdim=True)


def outside_mass(maps: Tensor, gaze: Tensor, eps: float = 1e-6) -> Tensor:
    """Share of each map's mass outside the gaze, ``sum H (1 - G) / sum H``: (B,) in [0, 1].

    ``maps`` (B, 1, H, W) non-negative, ``gaze`` (B, 1, H, W) in [0, 1]. An all-zero map
    has no mass to place and scores 0. Computed in float32.
    """
    if maps.shape != gaze.shape:
        raise ValueError(f"map shapes differ: {tuple(maps.shape)} vs {tuple(gaze.shape)}")
    h = maps.float().flatten(1).clamp_min(0)  # (B, N)
    outside = 1 - gaze.float().flatten(1)  # (B, N)
    return (h * outside).sum(dim=1) / (h.sum(dim=1) + eps)


def outside_penalty(maps: Tensor, gaze: Tensor) -> Tensor:
    """``mean_pixels ((1 - G) H)^2`` of each map: (B,). Computed in float32."""
    if maps.shape != gaze.shape:
        raise ValueError(f"map shapes differ: {tuple(maps.shape)} vs {tuple(gaze.shape)}")
    return ((1 - gaze.float()) * maps.float()).flatten(1).pow(2).mean(dim=1)


def generator_gaze_loss(maps: Tensor, gaze: Tensor, cfg: LossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """``L_H(H, G) = L_s(H, G) + mass_weight mass(H, G) + outside_weight out(H, G)`` (the
    module docstring) and its unweighted optional terms for logging."""
    total = map_loss(maps, gaze, cfg.map_loss, eps=cfg.eps)
    parts = {}
    if cfg.mass_weight > 0:
        parts["gen_mass"] = outside_mass(maps, gaze, cfg.eps).mean()
        total = total + cfg.mass_weight * parts["gen_mass"]
    if cfg.outside_weight > 0:
        parts["gen_outside"] = outside_penalty(maps, gaze).mean()
        total = total + cfg.outside_weight * parts["gen_outside"]
    return total, parts


def log_probability_gradient(logits: Tensor, cls_loss: str) -> Tensor:
    """``d (sum_k log p_k) / d logits`` (B, K), ``p`` the scores of ``cls_loss``:
    ``1 - sigmoid(z)`` for ``bce`` (a sigmoid per class), ``1 - K softmax(z)`` for ``ce``.
    Differentiable (it depends on the parameters through the logits)."""
    logits = logits.float()
    if cls_loss == "bce":
        return 1 - torch.sigmoid(logits)
    if cls_loss == "ce":
        return 1 - logits.shape[1] * torch.softmax(logits, dim=1)
    raise ValueError(f"classification loss must be 'bce' or 'ce', got {cls_loss!r}")


def rrr_penalty(attribution: Tensor, gaze: Tensor) -> Tensor:
    """Ross et al.'s ``sum_pixels ((1 - G) A)^2`` of each image: (B,). ``attribution``
    (B, C, H, W) is summed over channels' squares; ``gaze`` (B, 1, H, W) in [0, 1]."""
    if attribution.shape[0] != gaze.shape[0] or attribution.shape[2:] != gaze.shape[2:]:
        raise ValueError(f"attribution {tuple(attribution.shape)} and gaze {tuple(gaze.shape)} differ")
    return ((1 - gaze.float()) * attribution.float()).pow(2).flatten(1).sum(dim=1)


def objective(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    variant: str,
    cfg: LossConfig | None = None,
) -> LossOutput:
    """Run ``variant``'s objective on one batch: forward, generator, loss terms.

    ``batch`` holds ``image`` (B, 1, H, W) in [0, 1], ``gaze`` (B, 1, H, W) in [0, 1]
    and ``label`` (B,) class indices (or (B, K) one-hot). The generator explains the
    true class. The model's train/eval mode is the caller's.

    One traced forward gives the class logits, the mask and, through
    :func:`cxrgaze.explain.generator_maps` (``traced_forward``), the generator map ``H``:
    the same function as evaluation and serving use. Each image's map is its own (in
    train mode given the batch's batch-norm statistics, which the generator's backward
    holds constant), and the running statistics are updated once.
    """
    cfg = cfg or LossConfig()
    spec = parse_variant(variant)
    image, gaze, label = batch["image"], batch["gaze"], batch["label"]
    target = label if label.ndim == 1 else label.argmax(dim=1)  # (B,)

    w = spec.term_weights(cfg.gamma, cfg.alpha, cfg.rrr_weight)
    gamma, w_mask_gaze, w_gen_gaze, w_mask_gen, w_rrr = w.cls, w.mask_gaze, w.gen_gaze, w.mask_gen, w.rrr
    need_mask = w_mask_gaze > 0 or w_mask_gen > 0
    need_map = spec.rule is not None and (w_gen_gaze > 0 or w_mask_gen > 0)
    train_map = w_gen_gaze > 0 or (w_mask_gen > 0 and not cfg.detach_generator_target)
    traced = need_map or w_rrr > 0

    x = image.detach().requires_grad_(True) if traced else image
    tr, mask_logits, logits = _forward(model, x, variant, traced, need_mask)

    l_cls = classification_loss(logits, label, cfg.cls_loss)
    total = gamma * l_cls
    terms = {"cls": l_cls}
    h = None
    if need_map:  # (B, 1, H, W), from the loss's own traced forward
        h = generator_maps(model, x, target, spec.rule, create_graph=train_map, traced_forward=(tr, logits))
    if w_mask_gaze > 0:
        terms["mask_gaze"] = map_loss(mask_logits, gaze, cfg.map_loss, logits=True, eps=cfg.eps)
        total = total + w_mask_gaze * terms["mask_gaze"]
    if w_gen_gaze > 0:
        terms["gen_gaze"], parts = generator_gaze_loss(h, gaze, cfg)
        terms.update(parts)
        total = total + w_gen_gaze * terms["gen_gaze"]
    if w_mask_gen > 0:
        goal = h.detach() if cfg.detach_generator_target else h
        terms["mask_gen"] = map_loss(mask_logits, goal, cfg.map_loss, logits=True, eps=cfg.eps)
        total = total + w_mask_gen * terms["mask_gen"]
    if w_rrr > 0:
        terms["rrr"] = _rrr_term(tr, logits, x, target, gaze, spec.rule, cfg.cls_loss)
        total = total + w_rrr * terms["rrr"]
    terms = {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}
    return LossOutput(total, terms, logits, mask_logits, h)


def _forward(
    model: nn.Module, x: Tensor, variant: str, traced: bool, need_mask: bool
) -> tuple[Trace | None, Tensor | None, Tensor]:
    """``(trace or None, mask logits or None, class logits)`` of one forward of ``x``,
    traced when a generator map or the rrr attribution will be taken from it, through
    the decoder only when a mask term needs it."""
    with trace(model) if traced else contextlib.nullcontext() as tr:
        if need_mask:
            mask_logits, logits = split_outputs(model(x))
            if mask_logits is None:
                raise ValueError(f"variant {variant!r} needs a model with a decoder")
        else:
            mask_logits, logits = None, class_logits(model, x)
    return tr, mask_logits, logits


def _rrr_term(
    tr: Trace, logits: Tensor, x: Tensor, target: Tensor, gaze: Tensor, rule: str, cls_loss: str
) -> Tensor:
    """``R(A, G)`` averaged over the batch: ``A`` the attribution of each image's summed
    log-probabilities, from the same traced forward."""
    with torch.enable_grad():
        attribution = tr.attribute(logits, x, target, rule, create_graph=True,
                                   output_grad=log_probability_gradient(logits, cls_loss))
    return rrr_penalty(attribution, gaze).mean()


def compute_loss(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    variant: str,
    cfg: LossConfig | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(total loss, detached terms)`` of ``variant`` on ``batch``; see :func:`objective`."""
    out = objective(model, batch, variant, cfg)
    return out.total, out.terms
