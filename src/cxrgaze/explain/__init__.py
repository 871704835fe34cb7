"""Differentiable heatmap generators (plain gradient, guided backpropagation, DeconvNet).

One mechanism, rules plugged in: :func:`trace` records a forward pass so that a
gradient call can apply a rule at every activation (:mod:`cxrgaze.explain.rules`),
:func:`attribute` is the one-call form, :func:`heatmap` turns an attribution into a
[0, 1] map.
"""

from cxrgaze.explain.generators import attribute, heatmap
from cxrgaze.explain.rules import RULES, Rule
from cxrgaze.explain.tracing import Trace, UnsupportedActivation, trace

__all__ = ["RULES", "Rule", "Trace", "UnsupportedActivation", "attribute", "heatmap", "trace"]
