"""Differentiable heatmap generators (plain gradient, guided backpropagation, DeconvNet).

One mechanism, rules plugged in: :func:`trace` records a forward pass so that a
gradient call can apply a rule at every activation (:mod:`cxrgaze.explain.rules`).
:func:`generator_maps` is the one map function (training objective, evaluation,
serving): the (B, 1, H, W) [0, 1] map of each image, from its own traced forward or from
one the caller shares with a loss. :func:`attribute` gives the raw attribution and
:func:`heatmap` turns an attribution into a [0, 1] map.

A map belongs to one image, in training as in evaluation: image ``i``'s map is the
attribution of its own target logit. In train mode batch norm normalises with the
batch's statistics, and inside the generator's backward they are held constant (input
gradient ``g * w * invstd`` per channel, as eval mode does with running statistics;
:mod:`cxrgaze.explain.ops`), so a map has no gradient of the other images' logits
through the batch mean and variance. The derivative of the map with respect to the
parameters keeps the statistics' dependence on them, so the second-order step is exact.
"""

from cxrgaze.explain.generators import attribute, generator_maps, heatmap
from cxrgaze.explain.rules import RULES, Rule
from cxrgaze.explain.tracing import Trace, UnsupportedActivation, trace

__all__ = [
    "RULES", "Rule", "Trace", "UnsupportedActivation", "attribute", "generator_maps", "heatmap", "trace",
]
