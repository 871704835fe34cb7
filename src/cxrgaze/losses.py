"""The objectives of the baseline, the U-Net and the paper's experiment sets 1-3.

Notation (DESIGN.md): ``L_cls`` classification loss, ``M`` decoder mask logits, ``G``
gaze heatmap in [0, 1], ``H`` generator heatmap in [0, 1], ``L_s`` a heatmap loss.

============== ===================================================== =================
variant        loss                                                  model
============== ===================================================== =================
``baseline``   ``L_cls``                                             encoder + head
``unet``       ``g L_cls + (1-g) L_s(M, G)``                         U-Net
``set1-R``     ``g L_cls + (1-g) L_s(H, G)``                         U-Net (no decoder pass)
``set2-R``     ``g L_cls + (1-g) L_s(M, H)`` (H detached by default) U-Net
``set3-R``     ``g L_cls + (1-g) (a L_s(M, G) + (1-a) L_s(H, G))``   U-Net
============== ===================================================== =================

``R`` is the generator rule: ``gbp``, ``deconv`` or ``grad`` (plain input gradient, a
"right for the right reasons" row). ``g`` is ``LossConfig.gamma`` and ``a`` ``alpha``.
A term whose weight is 0 is not computed (so ``alpha=1`` is exactly ``unet``,
``alpha=0`` exactly ``set1`` and ``gamma=1`` exactly ``L_cls``).

The forward pass is shared: one traced forward gives the class logits, the mask and
the generator's gradient (``cxrgaze.explain.trace``); the generator's call uses
``create_graph=True`` only where its map is trained (sets 1 and 3, set 2 undetached).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cxrgaze.config import LossConfig
from cxrgaze.explain import RULES, generator_maps, trace
from cxrgaze.models import class_logits, split_outputs

VARIANTS: tuple[str, ...] = (
    "baseline",
    "unet",
    "set1-gbp",
    "set1-deconv",
    "set2-gbp",
    "set2-deconv",
    "set3-gbp",
    "set3-deconv",
    "set3-grad",
)
"""The variants of the pipeline: the paper's table plus a plain-gradient set-3 row.
``parse_variant`` also accepts any ``set{1,2,3}-{gbp,deconv,grad}``."""


@dataclass(frozen=True)
class Variant:
    """A parsed variant name: its objective (``baseline``, ``unet``, ``set1``-``set3``)
    and generator rule (``None`` for baseline and unet)."""

    name: str
    objective: str
    rule: str | None

    @property
    def has_decoder(self) -> bool:
        """Whether the variant's model is a U-Net (everything but ``baseline``)."""
        return self.objective != "baseline"

    @property
    def loss_weights(self) -> tuple[str, ...]:
        """The ``loss`` weights this variant's objective uses (what tuning may search):
        none for ``baseline``, ``gamma`` for ``unet`` and sets 1-2, ``alpha`` and ``gamma``
        for set 3."""
        if self.objective == "baseline":
            return ()
        return ("alpha", "gamma") if self.objective == "set3" else ("gamma",)

    @property
    def trains_mask(self) -> bool:
        """Whether a loss term trains the decoder mask (``unet``, sets 2 and 3); set 1's
        decoder is never trained, so its mask means nothing."""
        return self.objective in ("unet", "set2", "set3")

    @property
    def trains_generator(self) -> bool:
        """Whether a loss term pulls the generator map toward the gaze (sets 1 and 3).
        For ``baseline`` and ``unet`` the generator map is a diagnostic only."""
        return self.objective in ("set1", "set3")


def parse_variant(name: str) -> Variant:
    """``"set3-gbp"`` -> ``Variant("set3-gbp", "set3", "gbp")``; a clear error otherwise."""
    if name in ("baseline", "unet"):
        return Variant(name, name, None)
    objective, _, rule = name.partition("-")
    if objective in ("set1", "set2", "set3") and rule in RULES:
        return Variant(name, objective, rule)
    raise ValueError(
        f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)} "
        f"(or set1/set2/set3 with any of {', '.join(RULES)})"
    )


class LossOutput(NamedTuple):
    """Everything one objective evaluation produced."""

    total: Tensor
    """The scalar to backpropagate."""
    terms: dict[str, Tensor]
    """Detached scalars for logging: ``loss``, ``cls`` and, where computed,
    ``mask_gaze`` (L_s(M, G)), ``gen_gaze`` (L_s(H, G)), ``mask_gen`` (L_s(M, H))."""
    class_logits: Tensor
    """(B, K)"""
    mask_logits: Tensor | None
    """(B, 1, H, W) where the decoder ran."""
    generator_map: Tensor | None
    """(B, 1, H, W) generator heatmap H in [0, 1] where a generator ran."""


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

    gamma = 1.0 if spec.objective == "baseline" else cfg.gamma
    rest = 1.0 - gamma
    w_mask_gaze = rest * {"unet": 1.0, "set3": cfg.alpha}.get(spec.objective, 0.0)
    w_gen_gaze = rest * {"set1": 1.0, "set3": 1.0 - cfg.alpha}.get(spec.objective, 0.0)
    w_mask_gen = rest * (1.0 if spec.objective == "set2" else 0.0)
    need_mask = w_mask_gaze > 0 or w_mask_gen > 0
    need_map = spec.rule is not None and (w_gen_gaze > 0 or w_mask_gen > 0)
    train_map = w_gen_gaze > 0 or (w_mask_gen > 0 and not cfg.detach_generator_target)

    x = image.detach().requires_grad_(True) if need_map else image
    with trace(model) if need_map else contextlib.nullcontext() as tr:
        if need_mask:
            mask_logits, logits = split_outputs(model(x))
            if mask_logits is None:
                raise ValueError(f"variant {variant!r} needs a model with a decoder")
        else:
            mask_logits, logits = None, class_logits(model, x)

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
        terms["gen_gaze"] = map_loss(h, gaze, cfg.map_loss, eps=cfg.eps)
        total = total + w_gen_gaze * terms["gen_gaze"]
    if w_mask_gen > 0:
        goal = h.detach() if cfg.detach_generator_target else h
        terms["mask_gen"] = map_loss(mask_logits, goal, cfg.map_loss, logits=True, eps=cfg.eps)
        total = total + w_mask_gen * terms["mask_gen"]
    terms = {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}
    return LossOutput(total, terms, logits, mask_logits, h)


def compute_loss(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    variant: str,
    cfg: LossConfig | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(total loss, detached terms)`` of ``variant`` on ``batch``; see :func:`objective`."""
    out = objective(model, batch, variant, cfg)
    return out.total, out.terms
