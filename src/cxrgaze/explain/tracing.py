"""One differentiable mechanism for all generators: trace a forward pass once, then take
gradients whose activation backward follows a rule.

Inside ``with trace(model) as tr:`` every activation call (``nn.ReLU``/``F.relu``/
``torch.relu``/``x.relu_()``, ReLU6/hardtanh, ``nn.SiLU``/``F.silu`` and the Swish modules
of timm, ``torch.sigmoid`` gates) is routed through :class:`~cxrgaze.explain.rules.RuleActivation`,
whose forward is the true activation. Its backward is the true derivative, except
while :meth:`Trace.attribute` runs, when it applies the requested rule (and train-mode
batch norm holds the batch's statistics constant, so that a map belongs to one image:
:mod:`cxrgaze.explain.ops`). So one forward
serves both the classification loss (true gradients) and the generator (rule
gradients), and no module is replaced: the routing is a ``TorchFunctionMode`` that ends
with the ``with`` block, plus, for activation modules built from smaller ops (timm's
``Swish``), a forward that is put back in ``finally``.

Activations without a rule (GELU, tanh, Mish, hard-swish, softmax, ...) are recorded,
and a ``gbp``/``deconv`` gradient call on such a trace raises
:class:`UnsupportedActivation` rather than silently giving a plain gradient (``grad``
needs no rule and works). Activations written as custom ``autograd.Function`` s inside a model
cannot be seen by any tracing and are only caught when they are known modules (timm's
``*Me`` activations).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from cxrgaze.explain.ops import traced_batch_norm, traced_conv2d
from cxrgaze.explain.rules import RELU, RULES, SIGMOID, SILU, HardTanh, Kind, Switch, apply_rule_activation


class UnsupportedActivation(TypeError):
    """The model uses an activation for which no generator rule is defined."""


# --- how each activation call is recognised --------------------------------------------
# func -> (kind or factory of kind from the call's arguments, in-place?)
def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


_Parser = Callable[[tuple, dict], tuple[Kind, Tensor, bool]]


def _fixed(kind: Kind, inplace: bool | None = None) -> _Parser:
    def parse(args: tuple, kwargs: dict) -> tuple[Kind, Tensor, bool]:
        place = _arg(args, kwargs, 1, "inplace", False) if inplace is None else inplace
        return kind, args[0], bool(place)

    return parse


def _hardtanh(inplace: bool | None = None) -> _Parser:
    def parse(args: tuple, kwargs: dict) -> tuple[Kind, Tensor, bool]:
        lo = _arg(args, kwargs, 1, "min_val", -1.0)
        hi = _arg(args, kwargs, 2, "max_val", 1.0)
        place = _arg(args, kwargs, 3, "inplace", False) if inplace is None else inplace
        return HardTanh(lo, hi), args[0], bool(place)

    return parse


def _relu6(args: tuple, kwargs: dict) -> tuple[Kind, Tensor, bool]:
    return HardTanh(0.0, 6.0), args[0], bool(_arg(args, kwargs, 1, "inplace", False))


_ROUTES: dict[Any, _Parser] = {
    F.relu: _fixed(RELU),
    F.relu_: _fixed(RELU, True),
    torch.relu: _fixed(RELU, False),
    torch.relu_: _fixed(RELU, True),
    Tensor.relu: _fixed(RELU, False),
    Tensor.relu_: _fixed(RELU, True),
    F.relu6: _relu6,
    F.hardtanh: _hardtanh(),
    F.hardtanh_: _hardtanh(True),
    F.silu: _fixed(SILU),
    torch.sigmoid: _fixed(SIGMOID, False),
    torch.sigmoid_: _fixed(SIGMOID, True),
    Tensor.sigmoid: _fixed(SIGMOID, False),
    Tensor.sigmoid_: _fixed(SIGMOID, True),
    torch.special.expit: _fixed(SIGMOID, False),
}

# Ops traced only so that their generator backward is cheap to differentiate again.
_FAST_OPS: dict[Any, Callable[[tuple, dict, Switch], Tensor | None]] = {
    torch.conv2d: traced_conv2d,
    F.batch_norm: traced_batch_norm,
}

_UNSUPPORTED_FUNCS: dict[Any, str] = {}
for _owner, _names in (
    (F, "gelu elu elu_ selu selu_ celu celu_ leaky_relu leaky_relu_ prelu rrelu rrelu_ softplus "
        "mish hardswish hardsigmoid logsigmoid softsign tanhshrink threshold threshold_ glu tanh "
        "softmax log_softmax softmin"),
    (torch, "tanh tanh_ selu selu_ celu celu_ rrelu rrelu_ prelu threshold threshold_ softmax "
            "log_softmax"),
    (Tensor, "tanh tanh_ softmax log_softmax"),
):
    for _name in _names.split():
        _func = getattr(_owner, _name, None)
        if _func is not None:
            _UNSUPPORTED_FUNCS[_func] = f"{getattr(_owner, '__name__', 'Tensor')}.{_name}"


def _module_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(modules to run as SiLU, modules without a rule) among composite activation modules."""
    as_silu: list[type] = []
    unsupported: list[type] = []
    try:
        # guarded: these classes exist only in timm (which segmentation_models_pytorch installs)
        from timm.layers import activations as ta
        from timm.layers import activations_me as tme
    except ImportError:  # pragma: no cover - timm is a dependency
        return (), ()
    as_silu += [getattr(ta, "Swish"), getattr(tme, "SwishMe")]
    for owner, names in (
        (ta, ("Mish", "HardSwish", "HardSigmoid", "HardMish", "QuickGELU", "GELUTanh")),
        (tme, ("MishMe", "HardSwishMe", "HardSigmoidMe", "HardMishMe")),
    ):
        unsupported += [getattr(owner, n) for n in names if hasattr(owner, n)]
    return tuple(as_silu), tuple(unsupported)


_AS_SILU, _UNSUPPORTED_MODULES = _module_classes()
# efficientnet-pytorch (lukemelas) style swish modules, matched by name and package.
_EXTERNAL_SILU_NAMES = {"Swish", "MemoryEfficientSwish"}


def _runs_as_silu(module: nn.Module) -> bool:
    cls = type(module)
    if isinstance(module, _AS_SILU):
        return True
    return cls.__name__ in _EXTERNAL_SILU_NAMES and cls.__module__.split(".")[0] == "efficientnet_pytorch"


class _Router(TorchFunctionMode):
    """Routes activation calls through the rule Function while a trace is open."""

    def __init__(self, trace: "Trace") -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        fast = _FAST_OPS.get(func)
        if fast is not None and torch.is_grad_enabled():
            out = fast(args, kwargs, self.trace.switch)
            if out is not None:
                return out
        parse = _ROUTES.get(func)
        if parse is not None and torch.is_grad_enabled() and "out" not in kwargs:
            kind, x, inplace = parse(args, kwargs)
            self.trace.recorded += 1
            return apply_rule_activation(kind, x, self.trace.switch, inplace)
        name = _UNSUPPORTED_FUNCS.get(func)
        if name is not None and torch.is_grad_enabled():
            self.trace.unsupported.add(name)  # fine for ``grad``; gbp/deconv will refuse
        return func(*args, **kwargs)


class Trace:
    """The activations recorded by one traced forward pass (see :func:`trace`)."""

    def __init__(self) -> None:
        self.switch = Switch()
        self.recorded = 0
        """Number of activation calls routed through the rule Function."""
        self.unsupported: set[str] = set()
        """Activations seen that have no rule: ``gbp``/``deconv`` refuse to run."""

    def attribute(
        self,
        class_logits: Tensor,
        inputs: Tensor,
        target: Tensor,
        rule: str,
        create_graph: bool = False,
        output_grad: Tensor | None = None,
    ) -> Tensor:
        """Gradient of the ``target`` class logits with respect to ``inputs`` under ``rule``.

        Row ``i`` of the result is the attribution of image ``i``'s own logit: train-mode
        batch norm, which normalises with the batch's statistics, holds them constant in
        this backward (:mod:`cxrgaze.explain.ops`), so the gradient of the summed logits
        has no cross-image terms. For maps use :func:`cxrgaze.explain.generator_maps`.

        ``class_logits`` (B, K) must come from a forward of ``inputs`` traced by this
        object (``grad`` runs on any forward, but only a traced one holds train-mode batch
        statistics constant). The graph is kept (``retain_graph``)
        so that a loss on the same forward can still be backpropagated. With
        ``create_graph=True`` the result is differentiable with respect to the parameters.
        Returns a tensor shaped like ``inputs``.

        ``output_grad`` (B, K), instead of ``target``: the gradient of a per-image function of
        the logits with respect to them (row ``i``: ``d f_i / d logits_i``), so that the result
        is the attribution of ``f_i``; for example ``1 - sigmoid(logits)`` attributes the summed
        log-probabilities of a per-class sigmoid ("right for the right reasons",
        :func:`cxrgaze.losses.log_probability_gradient`). It may depend on the parameters:
        with ``create_graph=True`` that dependence is differentiated too.
        """
        self._check_request(rule, class_logits, output_grad)
        if output_grad is None:
            index = target.to(class_logits.device, torch.long).view(-1, 1)  # (B, 1)
            selected, grad_outputs = class_logits.gather(1, index).sum(), None
        else:
            selected, grad_outputs = class_logits, output_grad.to(class_logits.dtype)
        self.switch.rule = None if rule == "grad" else rule
        self.switch.generating = True
        try:
            (grad,) = torch.autograd.grad(
                selected, inputs, grad_outputs=grad_outputs, create_graph=create_graph, retain_graph=True
            )
        finally:
            self.switch.rule = None
            self.switch.generating = False
        return grad

    def _check_request(self, rule: str, class_logits: Tensor, output_grad: Tensor | None) -> None:
        """Refuse an :meth:`attribute` call this trace cannot answer: an unknown rule, a
        ``gbp``/``deconv`` rule on an activation without one or on an untraced forward,
        logits not (B, K), an ``output_grad`` not shaped like them."""
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        if rule != "grad" and self.unsupported:
            raise UnsupportedActivation(
                f"{', '.join(sorted(self.unsupported))}: no heatmap-generator rule for {rule!r} "
                "(supported: ReLU, ReLU6/hardtanh, SiLU/Swish, sigmoid gates)"
            )
        if rule != "grad" and self.recorded == 0:
            raise RuntimeError(
                f"rule {rule!r}: the forward pass was not traced (or has no activation); "
                "run the model inside `with trace(model) as tr:`"
            )
        if class_logits.ndim != 2:
            raise ValueError(f"class logits must be (B, K), got {tuple(class_logits.shape)}")
        if output_grad is not None and output_grad.shape != class_logits.shape:
            raise ValueError(f"output_grad must be shaped like the logits {tuple(class_logits.shape)}, "
                             f"got {tuple(output_grad.shape)}")


@contextlib.contextmanager
def trace(model: nn.Module) -> Iterator[Trace]:
    """Trace the forward passes run inside the block so that generators can use them.

    >>> with trace(model) as tr:
    ...     mask_logits, class_logits = model(x)      # true forward, one pass
    >>> h = tr.attribute(class_logits, x, y, "gbp", create_graph=True)
    >>> loss = bce(class_logits, y) + map_loss(h, gaze); loss.backward()  # true gradients

    Convolutions and train-mode batch norm are traced too, so that the generator's
    backward is cheap to differentiate (:mod:`cxrgaze.explain.ops`); in the generator's
    backward, batch norm holds the batch's statistics constant, so each image's map
    depends on that image alone (the forward, its statistics and the running-statistics
    update are PyTorch's). Leaves no trace on ``model``: no hooks, no replaced modules,
    also when the block raises.
    """
    tr = Trace()
    for module in model.modules():
        if isinstance(module, _UNSUPPORTED_MODULES):
            tr.unsupported.add(f"{type(module).__module__}.{type(module).__name__}")
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for module in model.modules():
            if _runs_as_silu(module):
                patched.append((module, module.__dict__.get("forward")))
                # Same values as Swish's ``x * x.sigmoid()``, but one activation call.
                module.forward = functools.partial(
                    _silu_forward, inplace=bool(getattr(module, "inplace", False))
                )
        with _Router(tr):
            yield tr
    finally:
        for module, previous in reversed(patched):
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def _silu_forward(x: Tensor, inplace: bool = False) -> Tensor:
    return F.silu(x, inplace=inplace)
