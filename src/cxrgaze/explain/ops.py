"""Convolution and batch norm whose backward is cheap to differentiate again.

A second-order generator step differentiates the generator's own backward pass. Two
of PyTorch's double-backward formulas dominated that step on CPU:

- grouped (depthwise) convolution: ``_convolution_double_backward`` runs one small
  convolution per group, thousands of calls per EfficientNet step. Here the input
  gradient is written as ``conv_transpose2d``, a first-class op whose own backward
  handles groups natively.
- train-mode batch norm: the double backward of ``native_batch_norm_backward`` is a
  long chain of full-size elementwise ops. :class:`BatchNormInputGrad` has a hand-derived
  derivative of the same quantity with a few fused reductions.

Batch norm inside a generator's gradient call (``switch.generating``): a generator map
belongs to one image. Train-mode batch norm normalises with the batch's mean and
variance, and its true input gradient goes back through them, so the map of image ``i``
would contain the gradients of the other images' logits. While a generator runs, the
batch statistics are therefore constants of the backward: the input gradient is
``g * w * invstd`` per channel, what eval-mode batch norm does with its running
statistics (:class:`FrozenStatsInputGrad`). The forward is unchanged (one shared
forward, the batch's statistics, running statistics updated once), and the derivative
of that map with respect to the parameters is exact, including the dependence of
``invstd`` on the batch. Every rule (``grad`` too) goes through it; outside a
generator's call batch norm's backward is its true gradient.

The values are the true derivatives of the functions computed in every case (the
tests compare with PyTorch's own first and second derivatives); only the way they are
computed changes. Outside a generator's gradient call the backward is PyTorch's own
first-order kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cxrgaze.explain.rules import Switch

_aten = torch.ops.aten


def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class TracedConv2d(torch.autograd.Function):
    """``F.conv2d`` whose input gradient is a differentiable ``conv_transpose2d``."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, switch):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        ctx.switch = switch
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.switch.generating:
            need_w = need_b = False  # a generator asks for the input gradient only
        bias_sizes = [weight.shape[0]] if has_bias else None
        gx = gw = gb = None
        if not torch.is_grad_enabled():
            if need_x or need_w or need_b:
                gx, gw, gb = _aten.convolution_backward(
                    g, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0],
                    groups, [need_x, need_w, need_b],
                )
        else:
            if need_x:
                out_pad = tuple(
                    x.shape[2 + i]
                    - ((g.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                       + dilation[i] * (weight.shape[2 + i] - 1) + 1)
                    for i in range(2)
                )
                gx = F.conv_transpose2d(g, weight, None, stride, padding, out_pad, groups, dilation)
            if need_w or need_b:
                _, gw, gb = _aten.convolution_backward(
                    g, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0],
                    groups, [False, need_w, need_b],
                )
        return gx, gw, gb if has_bias else None, None, None, None, None, None


def traced_conv2d(args: tuple, kwargs: dict, switch: Switch) -> Tensor | None:
    """``F.conv2d(*args, **kwargs)`` through :class:`TracedConv2d`, or ``None`` when the
    call has a form it does not handle (string padding, unbatched input)."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    x, weight, bias, stride, padding, dilation, groups = (
        args[i] if i < len(args) else kwargs.get(n, d) for i, (n, d) in enumerate(zip(names, defaults))
    )
    if isinstance(padding, str) or x.ndim != 4:
        return None
    x, weight, bias = _autocast(x, weight, bias)
    return TracedConv2d.apply(
        x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), int(groups), switch
    )


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast as autocast would inside the op, but outside the Function, so that the casts
    are recorded and the backward sees matching dtypes."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


class TracedBatchNorm(torch.autograd.Function):
    """Train-mode ``F.batch_norm`` whose input gradient is :class:`BatchNormInputGrad`, or,
    inside a generator's gradient call, :class:`FrozenStatsInputGrad` (the batch's
    statistics held constant: no image's map depends on another image's logit).

    ``stats`` is ``(running_mean, running_var)`` (either may be ``None``); they are
    updated in place exactly as by ``F.batch_norm``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stats, momentum, eps, switch):  # type: ignore[override]
        out, mean, invstd = _aten.native_batch_norm(x, weight, bias, *stats, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.switch = eps, switch
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.switch.generating:  # a generator asks for the input gradient only
            gx = None
            if need_x and torch.is_grad_enabled():
                gx = FrozenStatsInputGrad.apply(g, x, weight, mean, invstd)
            elif need_x:
                gx = g * _channel(_scale(weight, invstd, _acc(x)), g)
            return gx, None, None, None, None, None, None
        gx = gw = gb = None
        if torch.is_grad_enabled() and need_x:
            gx = BatchNormInputGrad.apply(g, x, weight, mean, invstd, ctx.eps)
            need_x = False
        if need_x or need_w or need_b:
            gx2, gw, gb = _aten.native_batch_norm_backward(
                g, x, weight, None, None, mean, invstd, True, ctx.eps, [need_x, need_w, need_b]
            )
            gx = gx if gx is not None else gx2
        return gx, gw, gb, None, None, None, None


def traced_batch_norm(args: tuple, kwargs: dict, switch: Switch) -> Tensor | None:
    """``F.batch_norm(*args, **kwargs)`` through :class:`TracedBatchNorm` in train mode,
    or ``None`` (run natively) in eval mode or for inputs that are not (B, C, ...)."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = (None, None, None, None, None, False, 0.1, 1e-5)
    x, rm, rv, weight, bias, training, momentum, eps = (
        args[i] if i < len(args) else kwargs.get(n, d) for i, (n, d) in enumerate(zip(names, defaults))
    )
    if not training or x.ndim < 2:
        return None
    return TracedBatchNorm.apply(x, weight, bias, (rm, rv), float(momentum or 0.0), float(eps), switch)


class BatchNormInputGrad(torch.autograd.Function):
    """The input gradient of train-mode batch norm, with a hand-derived derivative.

    Per channel, with ``xh = (x - mean) * r`` (``r`` the inverse std), ``M`` the number of
    values, ``a = mean(g)``, ``b = mean(g * xh)`` and ``P q = q - mean(q) - xh * mean(q * xh)``
    (the batch-norm backward operator, which is symmetric)::

        gx = w * r * P g

    Given ``v``, the gradient arriving at ``gx``, and ``L = sum(v * gx)``:
    ``dL/dg = w * r * P v``; ``dL/dw = r * (sum(v g) - a sum(v) - b sum(v xh))``; and, with
    ``q = -w r (sum(v xh) / M * g + b * v)`` and ``rho = dL/dw * w / r``,
    ``dL/dx = r * P q - rho * r**2 / M * xh`` (the mean and ``r`` depend on ``x``).
    Differentiable once more, not twice.
    """

    @staticmethod
    def forward(ctx, g, x, weight, mean, invstd, eps):  # type: ignore[override]
        ctx.save_for_backward(g, x, weight, mean, invstd)
        ctx.eps = eps
        (gx,) = _aten.native_batch_norm_backward(
            g, x, weight, None, None, mean, invstd, True, eps, [True, False, False]
        )[:1]
        return gx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v: Tensor):  # type: ignore[override]
        g, x, weight, mean, invstd = ctx.saved_tensors
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        count = x.numel() // x.shape[1]
        acc = _acc(x)

        r = invstd.to(acc)  # (C,)
        w = weight.to(acc) if weight is not None else torch.ones_like(r)
        sum_gxh, sum_g = _channel_sums(g, x, mean, invstd, acc)
        sum_vxh, sum_v = _channel_sums(v, x, mean, invstd, acc)
        sum_vg, _ = _channel_sums(v, g, torch.zeros_like(mean), torch.ones_like(invstd), acc)
        a = sum_g / count
        b = sum_gxh / count  # mean(g * xh)
        dw = r * (sum_vg - a * sum_v - b * sum_vxh)  # (C,)

        def chan(t: Tensor) -> Tensor:  # (C,) -> (1, C, 1, ...) in the activations' dtype
            return _channel(t, x)

        grad_g = grad_x = grad_w = None
        if need_g:
            (grad_g,) = _aten.native_batch_norm_backward(
                v, x, weight, None, None, mean, invstd, True, ctx.eps, [True, False, False]
            )[:1]
        if need_x:
            q = g * chan(-w * r * sum_vxh / count)
            q.addcmul_(v, chan(-w * r * b))
            (grad_x,) = _aten.native_batch_norm_backward(
                q, x, None, None, None, mean, invstd, True, ctx.eps, [True, False, False]
            )[:1]
            coef = -dw * w * r.square() / count  # -rho * r**2 / M * xh = coef * (x - mean)
            grad_x.addcmul_(x, chan(coef)).sub_(chan(coef * mean.to(acc)))
        if need_w and weight is not None:
            grad_w = dw.to(weight.dtype)
        return grad_g, grad_x, grad_w, None, None, None


class FrozenStatsInputGrad(torch.autograd.Function):
    """The input gradient of train-mode batch norm with the batch statistics held
    constant, ``gx = g * w * r`` per channel (``r`` the inverse std), as in eval mode; the
    backward of batch norm inside a generator's gradient call.

    ``r = (var(x) + eps) ** -0.5`` (biased variance over the ``M`` values of a channel) is
    still a function of the batch, and so of the parameters: the derivative keeps that
    dependence, so the second-order gradient of a map is exact. Given ``v``, the gradient
    arriving at ``gx``, and ``L = sum(v * gx)``: ``dL/dg = v * w * r``,
    ``dL/dw = r * sum(v * g)`` and ``dL/dx = -(w * r**3 / M) * sum(v * g) * (x - mean)``
    (sums per channel; ``mean`` does not enter ``gx``). Differentiable once more, not twice.
    """

    @staticmethod
    def forward(ctx, g, x, weight, mean, invstd):  # type: ignore[override]
        ctx.save_for_backward(g, x, weight, mean, invstd)
        return g * _channel(_scale(weight, invstd, _acc(x)), g)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v: Tensor):  # type: ignore[override]
        g, x, weight, mean, invstd = ctx.saved_tensors
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        need_w = need_w and weight is not None
        acc = _acc(x)
        r = invstd.to(acc)  # (C,)
        grad_g = grad_x = grad_w = None
        if need_g:
            grad_g = v * _channel(_scale(weight, invstd, acc), v)
        if need_x or need_w:
            sum_vg, _ = _channel_sums(v, g, torch.zeros_like(mean), torch.ones_like(invstd), acc)
            if need_w:
                grad_w = (r * sum_vg).to(weight.dtype)
            if need_x:
                count = x.numel() // x.shape[1]
                coef = -_scale(weight, invstd, acc) * r.square() * sum_vg / count  # (C,)
                # coef * (x - mean), in one pass
                grad_x = torch.addcmul(_channel(-coef * mean.to(acc), x), x, _channel(coef, x))
        return grad_g, grad_x, grad_w, None, None


def _acc(x: Tensor) -> torch.dtype:
    """The dtype of per-channel sums and scales: ``x``'s, at least float32."""
    return torch.promote_types(x.dtype, torch.float32)


def _scale(weight: Tensor | None, invstd: Tensor, acc: torch.dtype) -> Tensor:
    """Per channel ``w * invstd`` (C,) in ``acc`` (``w = 1`` without affine weight)."""
    r = invstd.to(acc)
    return r if weight is None else weight.to(acc) * r


def _channel(t: Tensor, like: Tensor) -> Tensor:
    """(C,) -> (1, C, 1, ...) broadcastable against ``like``, in ``like``'s dtype."""
    return t.to(like.dtype).view(1, -1, *([1] * (like.ndim - 2)))


def _channel_sums(
    a: Tensor, b: Tensor, centre: Tensor, scale: Tensor, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Per channel ``sum(a * (b - centre) * scale)`` and ``sum(a)`` in one fused pass (the
    weight and bias gradients of batch norm), without a product tensor; in ``acc``."""
    _, s_ab, s_a = _aten.native_batch_norm_backward(
        a, b, None, None, None, centre, scale, True, 0.0, [False, True, True]
    )
    return s_ab.to(acc), s_a.to(acc)
