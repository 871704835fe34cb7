"""Backward rules of the heatmap generators, one per activation kind, and the one
autograd Function that applies them.

With ``g`` the gradient arriving at an activation and ``x`` the activation's input:

============  ===============================  ==========================================
rule          backward at an activation        name
============  ===============================  ==========================================
``grad``      ``f'(x) * g``                    plain gradient (saliency)
``deconv``    ``relu(g)``                      DeconvNet (Zeiler & Fergus 2014)
``gbp``       ``relu(g) * f'(x) * [x > 0]``    guided backpropagation (Springenberg 2015)
============  ===============================  ==========================================

For ReLU these are exactly the published rules. For SiLU (EfficientNet's activation)
``f'(x) = s + x s (1 - s)`` with ``s = sigmoid(x)``, so guided backpropagation keeps
positive signal at units that were on (``x > 0``) and weights it by the unit's own
derivative; DeconvNet ignores the forward pass entirely.

Sigmoid gates (squeeze-and-excitation, ``x * sigmoid(s)``): for ``gbp`` and ``deconv``
the gate is a *switch* recorded in the forward pass. The backward signal through the
product is scaled by the gate's value (the true derivative of the product with respect
to ``x``), and nothing flows back into the gate's own branch. This is how both methods
treat the switches of a ReLU network: guided backpropagation applies the ReLU on/off
mask of the forward pass and DeconvNet the max-pooling switches, and neither
differentiates the switch (for ReLU that derivative is zero anyway). An SE gate is a
soft, channel-wise switch; its branch goes through a global average pool, so its
gradient is the same at every pixel of a channel and could only add a blur, not
localisation. The plain ``grad`` rule keeps the true derivative of the gate. A sigmoid
used as a main-path activation (not as a gate) therefore passes nothing under
``gbp``/``deconv``; the encoders used here use sigmoid only as SE gates.

Every backward here is differentiable once more (tensor ops, or a Function with its
derivative written out), so with ``create_graph=True`` the generator's map can be
differentiated with respect to the parameters (second order). The true derivative is
the default: the rule is used only while a generator's gradient call is in progress
(see ``tracing.Trace``), so a loss on the same forward gets plain gradients.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from cxrgaze.variants import GENERATOR_RULES

Rule = Literal["grad", "gbp", "deconv"]
RULES: tuple[str, ...] = GENERATOR_RULES
"""The rules implemented here: the ones a variant name may carry (:mod:`cxrgaze.variants`)."""
if set(get_args(Rule)) != set(RULES):  # pragma: no cover - a rule added in one place only
    raise ImportError(f"cxrgaze.explain.rules implements {get_args(Rule)}, cxrgaze.variants names {RULES}")

_aten = torch.ops.aten


class Switch:
    """Which rule the recorded activations of one trace apply in backward.

    ``rule is None`` (the default) means the true derivative; ``generating`` is true
    while a generator's gradient call runs. Shared by reference with every node the
    trace recorded, so it is seen by autograd's worker threads too.
    """

    __slots__ = ("rule", "generating")

    def __init__(self) -> None:
        self.rule: str | None = None
        self.generating = False


class Kind:
    """One activation kind: how to compute it, what to save, its true backward.

    The saved tensor (input or output) is positive exactly where the input is, so it
    gives guided backpropagation's forward mask ``[x > 0]``.
    """

    name = ""
    saves_output = True
    is_gate = False

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_(self, x: Tensor) -> Tensor:
        """In-place forward."""
        raise NotImplementedError

    def true_backward(self, g: Tensor, saved: Tensor) -> Tensor:
        """``f'(x) * g`` from the saved tensor (input or output), differentiably."""
        raise NotImplementedError

    def backward(self, g: Tensor, saved: Tensor, rule: str | None) -> Tensor | None:
        """The backward of ``rule`` (``None``: true derivative) for incoming gradient ``g``."""
        if rule is None or rule == "grad":
            return self.true_backward(g, saved)
        if self.is_gate:
            return None  # a switch: no signal into the gate's branch
        if rule == "deconv":
            return torch.relu(g)
        if rule == "gbp":
            return _aten.threshold_backward(self.true_backward(torch.relu(g), saved), saved, 0)
        raise ValueError(f"unknown rule {rule!r}")


class ReLU(Kind):
    name = "relu"

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def forward_(self, x: Tensor) -> Tensor:
        return torch.relu_(x)

    def true_backward(self, g: Tensor, saved: Tensor) -> Tensor:
        return _aten.threshold_backward(g, saved, 0)

    def backward(self, g: Tensor, saved: Tensor, rule: str | None) -> Tensor | None:
        if rule == "gbp":  # [y > 0] is [x > 0] and f'(x) = [x > 0]: one mask does both
            return _aten.threshold_backward(torch.relu(g), saved, 0)
        return super().backward(g, saved, rule)


class HardTanh(Kind):
    """``clamp(x, lo, hi)``; ReLU6 is ``HardTanh(0, 6)``."""

    name = "hardtanh"

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = float(lo), float(hi)

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x, self.lo, self.hi)

    def forward_(self, x: Tensor) -> Tensor:
        return x.clamp_(self.lo, self.hi)

    def true_backward(self, g: Tensor, saved: Tensor) -> Tensor:
        # The output is strictly inside (lo, hi) exactly where the input is.
        return _aten.hardtanh_backward(g, saved, self.lo, self.hi)


class SiLU(Kind):
    """``x * sigmoid(x)`` (Swish); its derivative needs the input."""

    name = "silu"
    saves_output = False

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.silu(x)

    def forward_(self, x: Tensor) -> Tensor:
        return torch.nn.functional.silu(x, inplace=True)

    def true_backward(self, g: Tensor, saved: Tensor) -> Tensor:
        if not torch.is_grad_enabled():  # first order only: the fused kernel
            return _aten.silu_backward(g, saved)
        return SiLUBackward.apply(g, saved, False)

    def backward(self, g: Tensor, saved: Tensor, rule: str | None) -> Tensor | None:
        if rule == "gbp" and torch.is_grad_enabled():
            return SiLUBackward.apply(g, saved, True)
        return super().backward(g, saved, rule)


class SiLUBackward(torch.autograd.Function):
    """``g * f'(x)`` (``guided=False``) or ``relu(g) * f'(x) * [x > 0]`` (``guided=True``)
    for SiLU, with its derivative with respect to ``g`` and ``x``.

    ``aten.silu_backward`` has no derivative, and the formula written in tensor ops
    costs about ten full-size passes and as many saved tensors. Here the masks are
    ``threshold_backward`` calls (no boolean tensors) and the temporaries are updated in
    place. Differentiable once more (what a second-order generator loss needs), not twice.
    """

    @staticmethod
    def forward(ctx, g: Tensor, x: Tensor, guided: bool) -> Tensor:  # type: ignore[override]
        out = _aten.silu_backward(g, x)
        if guided:
            # f'(x) > 0 for x > 0, so relu(g) f'(x) [x > 0] = relu(g f'(x) [x > 0]).
            out = _aten.threshold_backward(out, x, 0).relu_()
        ctx.save_for_backward(g, x, out if guided else None)
        ctx.guided = guided
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        g, x, out = ctx.saved_tensors
        if ctx.guided:  # out > 0 exactly where x > 0 and g > 0: the only live entries
            grad = _aten.threshold_backward(grad, out, 0)
        grad_g = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_g = _aten.silu_backward(grad, x)
        if ctx.needs_input_grad[1]:
            # f''(x) = s (1 - s) (2 + x (1 - 2 s)), s = sigmoid(x)
            s = torch.sigmoid(x)
            t = torch.mul(s, -2.0).add_(1.0).mul_(x).add_(2.0).mul_(grad).mul_(g)
            grad_x = _aten.sigmoid_backward(t, s)
        return grad_g, grad_x, None


class SigmoidGate(Kind):
    """``sigmoid(x)``, supported as a multiplicative gate (see the module docstring)."""

    name = "sigmoid"
    is_gate = True

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x)

    def forward_(self, x: Tensor) -> Tensor:
        return x.sigmoid_()

    def true_backward(self, g: Tensor, saved: Tensor) -> Tensor:
        return _aten.sigmoid_backward(g, saved)


RELU, SILU, SIGMOID = ReLU(), SiLU(), SigmoidGate()


class RuleActivation(torch.autograd.Function):
    """The true activation forward; backward follows the trace's switch.

    Inputs: ``x``; ``keep``, a copy of ``x`` to save when the activation overwrites an
    input that its derivative needs (else ``None``); the :class:`Kind`; the trace's
    :class:`Switch`; and whether to work in place.
    """

    @staticmethod
    def forward(ctx, x, keep, kind, switch, inplace):  # type: ignore[override]
        if inplace:
            y = kind.forward_(x)
            ctx.mark_dirty(x)
        else:
            y = kind.forward(x)
        ctx.kind, ctx.switch = kind, switch
        ctx.save_for_backward(y if kind.saves_output else (x if keep is None else keep))
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        return ctx.kind.backward(g, saved, ctx.switch.rule), None, None, None, None


def apply_rule_activation(kind: Kind, x: Tensor, switch: Switch, inplace: bool = False) -> Tensor:
    """``kind(x)`` recorded so that its backward follows ``switch``.

    In-place calls keep their in-place meaning: ``x`` itself holds the result afterwards.
    """
    keep = x.clone() if inplace and not kind.saves_output else None
    return RuleActivation.apply(x, keep, kind, switch, inplace)
