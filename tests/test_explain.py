"""Heatmap generators: the rules, captum agreement, second order, no trace left behind."""

from __future__ import annotations

import contextlib
import copy
import math

import captum.attr as captum_attr  # noqa: E402  (a test dependency: installed by `make test`)
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cxrgaze.config import ModelConfig
from cxrgaze.explain import RULES, UnsupportedActivation, attribute, generator_maps, heatmap, trace
from cxrgaze.explain.ops import BatchNormInputGrad, FrozenStatsInputGrad
from cxrgaze.explain.rules import SiLUBackward
from cxrgaze.models import build_model, class_logits


# --- small networks ------------------------------------------------------------------
class ReLUNet(nn.Module):
    """Conv-ReLU-pool-conv-ReLU-linear; one ReLU module used twice, in place."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))  # (B, 4, 4, 4)
        x = self.relu(self.conv2(x))  # (B, 6, 4, 4)
        return self.fc(x.flatten(1))


class Tiny(nn.Module):
    """4x4 input -> 3 units (one 4x4 filter each) -> activation -> 2 class logits."""

    PATTERNS = torch.zeros(3, 4, 4)
    PATTERNS[0, :2, :2] = 1  # top-left quadrant
    PATTERNS[1, :2, 2:] = 1  # top-right quadrant
    PATTERNS[2, 2:, :] = 1  # bottom half

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=4)
        self.act = act
        self.fc = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(self.PATTERNS.unsqueeze(1))
            self.conv.bias.copy_(torch.tensor([1.0, -0.5, 2.0]))  # pre-activations on a black image
            self.fc.weight.copy_(torch.tensor([[2.0, 3.0, -1.0], [1.0, 1.0, 1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).flatten(1))


class GatedBlock(nn.Module):
    """An EfficientNet block in miniature: conv-BN-SiLU, depthwise conv-BN-SiLU (the same
    SiLU module reused), squeeze-excite with a sigmoid gate, linear head."""

    def __init__(self, detach_gate: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(4)
        self.act = nn.SiLU()
        self.dw = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.se_reduce = nn.Conv2d(4, 2, 1)
        self.se_expand = nn.Conv2d(2, 4, 1)
        self.head = nn.Linear(4, 3)
        self.detach_gate = detach_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.stem(x)))  # (B, 4, H, W)
        x = self.act(self.bn1(self.dw(x)))  # (B, 4, H/2, W/2)
        s = self.se_expand(self.act(self.se_reduce(x.mean((2, 3), keepdim=True))))  # (B, 4, 1, 1)
        gate = torch.sigmoid(s)
        x = x * (gate.detach() if self.detach_gate else gate)
        return self.head(x.mean((2, 3)))


class BNReLUNet(nn.Module):
    """Conv-BN-ReLU-pool, conv-BN-ReLU, linear-BatchNorm1d-ReLU, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 4, 8)
        self.bn3 = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # (B, 4, H/2, W/2)
        x = F.relu(self.bn2(self.conv2(x))).mean(3)  # (B, 6, H/2)
        x = F.relu(self.bn3(self.fc1(F.adaptive_avg_pool1d(x, 4).flatten(1))))  # (B, 8)
        return self.fc2(x)


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def with_batch_statistics_fixed(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """An eval-mode copy of ``model`` whose batch norms normalise with the statistics of
    the batch ``x`` (mean and biased variance of a train-mode forward) as running ones."""
    probe, fixed = copy.deepcopy(model).train(), copy.deepcopy(model).eval()
    stats = []
    hooks = [
        m.register_forward_pre_hook(
            lambda m, inputs: stats.append(
                torch.var_mean(inputs[0], dim=[0, *range(2, inputs[0].ndim)], unbiased=False)
            )
        )
        for m in batch_norms(probe)
    ]
    with torch.no_grad():
        probe(x)
    for h in hooks:
        h.remove()
    assert len(stats) == len(batch_norms(fixed))  # each batch norm runs once per forward
    for m, (var, mean) in zip(batch_norms(fixed), stats):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    return fixed


def frozen_statistics_input_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch reference of the ``grad`` rule in train mode: each image's gradient of
    its own target logit with every batch norm's statistics held constant with respect to
    the input, but still functions of the batch (and so of the parameters). The model runs
    on ``[x; x + d]``, every batch norm normalising both halves with the first half's
    statistics (the first half is the ordinary train-mode forward); the map is the gradient
    of the second half's logits with respect to ``d`` at ``d = 0`` (graph kept)."""
    b = len(x)

    def first_half_statistics(self: nn.modules.batchnorm._BatchNorm, h: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, *[1] * (h.ndim - 2))
        var, mean = torch.var_mean(h[:b], dim=[0, *range(2, h.ndim)], unbiased=False)
        out = (h - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out

    d = torch.zeros_like(x, requires_grad=True)
    modules = batch_norms(model)
    for m in modules:
        m.forward = first_half_statistics.__get__(m)
    try:
        out = model(torch.cat([x, x + d]))
    finally:
        for m in modules:
            del m.forward
    logits = (out[1] if isinstance(out, tuple) else out)[b:]
    (a,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), d, create_graph=True)
    return a


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def hooks_and_attrs(model: nn.Module) -> list:
    """Everything about a model that a generator might leave changed."""
    return [
        (name, type(m), sorted(m.__dict__), len(m._forward_hooks), len(m._forward_pre_hooks),
         len(m._backward_hooks), len(m._backward_pre_hooks))
        for name, m in model.named_modules()
    ]


def plain_input_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    out = model(x)
    logits = out[1] if isinstance(out, tuple) else out
    (g,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), x)
    return g


# --- the rules -----------------------------------------------------------------------
@pytest.mark.parametrize("rule, method", [("gbp", "GuidedBackprop"), ("deconv", "Deconvolution")])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_equals_captum_on_relu_networks(rule, method, in_channels):
    torch.manual_seed(0)
    net = ReLUNet(in_channels).eval()
    x = torch.randn(4, in_channels, 8, 8)
    target = torch.tensor([0, 1, 2, 1])
    ours = attribute(net, x, target, rule)
    theirs = getattr(captum_attr, method)(copy.deepcopy(net)).attribute(x, target=target)
    assert ours.shape == x.shape
    assert ours.abs().sum() > 0
    torch.testing.assert_close(ours, theirs)


def test_plain_gradient_rule_equals_autograd():
    torch.manual_seed(0)
    net = ReLUNet().eval()
    x, target = torch.randn(3, 1, 8, 8), torch.tensor([2, 0, 1])
    torch.testing.assert_close(attribute(net, x, target, "grad"), plain_input_gradient(net, x, target))


def _maps(c0: float, c1: float, c2: float) -> torch.Tensor:
    return (c0 * Tiny.PATTERNS[0] + c1 * Tiny.PATTERNS[1] + c2 * Tiny.PATTERNS[2]).view(1, 1, 4, 4)


def test_hand_computed_relu_rules():
    # Pre-activations z = (1, -0.5, 2); gradient arriving at the units g = (2, 3, -1).
    net, x, target = Tiny(nn.ReLU()), torch.zeros(1, 1, 4, 4), torch.tensor([0])
    expected = {
        "grad": torch.tensor([[2, 2, 0, 0], [2, 2, 0, 0], [-1, -1, -1, -1], [-1, -1, -1, -1]]),
        "deconv": torch.tensor([[2, 2, 3, 3], [2, 2, 3, 3], [0, 0, 0, 0], [0, 0, 0, 0]]),
        "gbp": torch.tensor([[2, 2, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]),
    }
    for rule, values in expected.items():
        torch.testing.assert_close(attribute(net, x, target, rule), values.float().view(1, 1, 4, 4))


def test_hand_computed_silu_rules():
    def d(z: float) -> float:  # SiLU'(z) = s (1 + z (1 - s))
        s = 1 / (1 + math.exp(-z))
        return s * (1 + z * (1 - s))

    net, x, target = Tiny(nn.SiLU()), torch.zeros(1, 1, 4, 4), torch.tensor([0])
    expected = {
        "grad": _maps(2 * d(1.0), 3 * d(-0.5), -1 * d(2.0)),
        "deconv": _maps(2, 3, 0),  # relu(g): the forward pass plays no part
        "gbp": _maps(2 * d(1.0), 0, 0),  # unit 2 was off (z < 0), unit 3 got negative signal
    }
    for rule, values in expected.items():
        torch.testing.assert_close(attribute(net, x, target, rule), values)


def test_relu6_follows_the_same_rules():
    net, x, target = Tiny(nn.ReLU6()), torch.zeros(1, 1, 4, 4), torch.tensor([0])
    torch.testing.assert_close(attribute(net, x, target, "gbp"), _maps(2, 0, 0))
    with torch.no_grad():
        net.conv.bias.fill_(7.0)  # all units saturated: ReLU6' = 0
    torch.testing.assert_close(attribute(net, x, target, "gbp"), _maps(0, 0, 0))
    torch.testing.assert_close(attribute(net, x, target, "deconv"), _maps(2, 3, 0))


def test_sigmoid_gate_is_a_switch_for_gbp_and_deconv():
    torch.manual_seed(0)
    gated, switched = GatedBlock().eval(), GatedBlock(detach_gate=True).eval()
    switched.load_state_dict(gated.state_dict())
    x, target = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    for rule in ("gbp", "deconv"):
        torch.testing.assert_close(attribute(gated, x, target, rule), attribute(switched, x, target, rule))
    # The plain gradient keeps the gate's own derivative.
    full, without_branch = attribute(gated, x, target, "grad"), attribute(switched, x, target, "grad")
    torch.testing.assert_close(full, plain_input_gradient(gated, x, target))
    assert not torch.allclose(full, without_branch)


def test_efficientnet_encoders_get_their_own_activations_ruled():
    """GBP differs from the plain gradient on SiLU encoders (a ReLU-only GBP would not)."""
    x, target = torch.rand(2, 1, 32, 32), torch.tensor([0, 1])
    for name in ("efficientnet-b0", "timm-efficientnet-b0"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(encoder=name)).eval()
        grad, gbp = attribute(model, x, target, "grad"), attribute(model, x, target, "gbp")
        assert gbp.shape == x.shape
        assert not torch.allclose(heatmap(grad), heatmap(gbp), atol=1e-3)


@pytest.mark.parametrize(
    "act", [nn.GELU(), nn.Tanh(), nn.ELU(), nn.LeakyReLU(), nn.Hardswish(), nn.Softplus()],
    ids=lambda m: type(m).__name__,
)
def test_unsupported_activation_raises(act):
    net = Tiny(act)
    before = hooks_and_attrs(net)
    with pytest.raises(UnsupportedActivation, match="no heatmap-generator rule"):
        attribute(net, torch.zeros(1, 1, 4, 4), torch.tensor([0]), "gbp")
    assert hooks_and_attrs(net) == before
    assert torch._C._len_torch_function_stack() == 0


def test_unsupported_composite_activation_module_raises():
    from timm.layers.activations import HardSwish, Mish

    for act in (Mish(), HardSwish()):
        with pytest.raises(UnsupportedActivation):
            attribute(Tiny(act), torch.zeros(1, 1, 4, 4), torch.tensor([0]), "deconv")


def test_bad_rule_is_an_error():
    with pytest.raises(ValueError, match="rule must be one of") as caught:
        attribute(Tiny(nn.ReLU()), torch.zeros(1, 1, 4, 4), torch.tensor([0]), "guided")
    assert all(rule in str(caught.value) for rule in RULES)  # the message lists what is available


class Blinkered(nn.Module):
    """``net`` that never sees the last three pixel columns of its input."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.ones_like(x)
        keep[..., -3:] = 0
        return self.net(x * keep)


def test_every_rule_a_variant_names_gives_its_own_map_zero_where_the_model_is_blind():
    """Each generator rule (those of ``RULES`` and every offered variant's) explains a
    train-mode network with batch norm, SiLU and a sigmoid gate: a map in [0, 1] with peak
    1 per image, exactly 0 on the pixels the network never sees (a rule that smoothed,
    offset or mixed pixels would leak into them), and unlike every other rule's map (one
    rule silently running another's backward would match it)."""
    from cxrgaze.variants import VARIANTS, parse_variant

    rules = sorted(set(RULES) | {parse_variant(v).generator for v in VARIANTS})
    torch.manual_seed(1)
    net = Blinkered(GatedBlock().double().train())
    x, target = torch.rand(4, 1, 12, 12, dtype=torch.double), torch.tensor([0, 1, 2, 0])
    maps = {rule: generator_maps(net, x, target, rule) for rule in rules}
    for rule, h in maps.items():
        assert h.shape == (4, 1, 12, 12), rule
        assert h.min() >= 0 and h.amax(dim=(1, 2, 3)).eq(1).all(), rule
        assert torch.all(h[..., -3:] == 0), rule
    for a in rules:
        for b in rules:
            if a < b:
                assert correlation(maps[a], maps[b]) < 0.8, (a, b)


# --- heatmaps ------------------------------------------------------------------------
def test_heatmap_is_channel_max_of_abs_scaled_per_image():
    a = torch.zeros(3, 2, 4, 4)
    a[0, 0, 0, 0], a[0, 1, 0, 0], a[0, 1, 3, 3] = 2.0, -4.0, 1.0
    a[1] = -0.5
    h = heatmap(a)  # image 2 is all zero
    assert h.shape == (3, 1, 4, 4)
    assert h[0, 0, 0, 0] == 1.0 and h[0, 0, 3, 3] == 0.25
    assert torch.all(h[1] == 1.0)
    assert torch.all(h[2] == 0.0) and torch.isfinite(h).all()
    assert h.min() >= 0 and h.max() <= 1


# --- a map belongs to one image ------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("network", ["gated-block", "bn-relu"])
def test_map_of_an_image_ignores_the_other_images_targets(network, rule):
    """Same batch (same statistics), other classes explained for the other images: image
    0's map is unchanged. (The full batch-norm backward put the other images' logits into
    it through the batch mean and variance.)"""
    torch.manual_seed(0)
    net = (GatedBlock() if network == "gated-block" else BNReLUNet()).double().train()
    x = torch.randn(8, 1, 8, 8, dtype=torch.double)
    one, other = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.tensor([0, 2, 0, 1, 0, 1, 2, 2])
    a, b = attribute(net, x, one, rule), attribute(net, x, other, rule)
    assert a[0].abs().sum() > 0
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12 * a[0].abs().max())
    torch.testing.assert_close(generator_maps(net, x, one, rule)[0], generator_maps(net, x, other, rule)[0])


@pytest.mark.parametrize("network", ["gated-block", "bn-relu", "tinynet-unet"])
def test_batch_maps_equal_one_image_maps_with_the_batch_statistics_fixed(network):
    """Train-mode maps of a batch = each image's map alone in eval mode, with every batch
    norm's running statistics set to the batch's (mean, biased variance)."""
    torch.manual_seed(0)
    if network == "tinynet-unet":
        model, x = build_model(ModelConfig(encoder="tu-tinynet_e", dropout=0.0)), torch.rand(4, 1, 32, 32)
    else:
        model, x = GatedBlock() if network == "gated-block" else BNReLUNet(), torch.randn(6, 1, 8, 8)
    model, x = model.double().train(), x.double()
    target = torch.arange(len(x)) % 3
    fixed = with_batch_statistics_fixed(model, x)
    for rule in RULES:
        together = attribute(model, x, target, rule)
        alone = torch.cat([attribute(fixed, x[i:i + 1], target[i:i + 1], rule) for i in range(len(x))])
        assert alone.abs().sum() > 0
        torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-10 * alone.abs().max())
        maps = torch.cat([generator_maps(fixed, x[i:i + 1], target[i:i + 1], rule) for i in range(len(x))])
        torch.testing.assert_close(generator_maps(model, x, target, rule), maps, rtol=1e-10, atol=1e-10)


def test_same_image_in_other_train_mode_batches_gets_the_same_map():
    """Image 0 with two different sets of 63 companions from the same distribution. The
    batch statistics (and so the forward) differ a little between the two batches; the
    maps agree to that. Guided backpropagation's on/off masks flip at units near zero
    when the statistics move, hence its looser bound. (Minimum correlations over these
    seeds: 0.9998 grad, 0.991 gbp, 0.9999 deconv; with the full batch-norm backward, which
    mixes the images, 0.9990, 0.936 and 0.989.)"""
    torch.manual_seed(0)
    net = GatedBlock().double().train()
    bound = {"grad": 0.9995, "gbp": 0.985, "deconv": 0.9995}
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x0 = torch.rand(1, 1, 32, 32, generator=gen, dtype=torch.double)
        first, second = (torch.cat([x0, torch.rand(63, 1, 32, 32, generator=gen, dtype=torch.double)])
                         for _ in range(2))
        target = torch.arange(64) % 3
        for rule in RULES:
            r = correlation(generator_maps(net, first, target, rule)[0], generator_maps(net, second, target, rule)[0])
            assert r > bound[rule], (seed, rule, r)


def test_generator_maps_share_a_traced_forward():
    torch.manual_seed(0)
    model = GatedBlock().double().train()
    x0, target = torch.randn(4, 1, 8, 8, dtype=torch.double), torch.tensor([0, 1, 2, 0])
    expected = generator_maps(copy.deepcopy(model), x0, target, "gbp")
    x = x0.clone().requires_grad_(True)
    with trace(model) as tr:
        logits = model(x)
    h = generator_maps(model, x, target, "gbp", create_graph=True, traced_forward=(tr, logits))
    assert h.shape == (4, 1, 8, 8) and h.requires_grad
    peaks = h.amax(dim=(1, 2, 3))
    assert h.min() >= 0 and (peaks.eq(1) | peaks.eq(0)).all() and peaks.eq(1).any()
    torch.testing.assert_close(h, expected)
    (h.mean() + logits.sum()).backward()  # the loss still runs on the same forward
    assert model.stem.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="requires_grad"):
        generator_maps(model, x0, target, "gbp", traced_forward=(tr, logits))
    with pytest.raises(ValueError, match="rule must be one of"):
        generator_maps(model, x0, target, "guided")


@pytest.mark.parametrize("rule", RULES)
def test_train_mode_maps_update_running_statistics_once_and_leave_the_model(rule):
    """A generator (second order, then backward) in train mode: batch norm's running
    statistics move exactly as after one plain forward, and nothing else changes."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="tu-tinynet_e", dropout=0.0)).train()
    plain = copy.deepcopy(model)
    before, params = hooks_and_attrs(model), copy.deepcopy(dict(model.named_parameters()))
    x, target = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 0])
    generator_maps(model, x, target, rule, create_graph=True).mean().backward()
    with torch.no_grad():
        class_logits(plain, x)  # what the generator runs: the encoder and head, no decoder
    assert hooks_and_attrs(model) == before
    assert torch._C._len_torch_function_stack() == 0
    buffers = dict(plain.named_buffers())
    assert any(k.endswith("num_batches_tracked") for k in buffers)
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[key], msg=key)
    for key, value in model.named_parameters():
        torch.testing.assert_close(value, params[key], msg=key)


# --- second order --------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
def test_heatmap_loss_reaches_the_first_layer(rule):
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="efficientnet-b0")).train()
    x, gaze, target = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32), torch.tensor([0, 2])
    h = heatmap(attribute(model, x, target, rule, create_graph=True))
    loss = F.binary_cross_entropy(h.clamp(1e-6, 1 - 1e-6), gaze)
    loss.backward()
    first = model.encoder._conv_stem.weight.grad
    assert first is not None and torch.isfinite(first).all() and first.abs().sum() > 0


@pytest.mark.parametrize("rule", RULES)
def test_second_order_gradient_matches_finite_differences(rule):
    """d/d(theta) of a loss on the generator's map, train-mode BN, SE gate, depthwise conv."""
    torch.manual_seed(0)
    net = GatedBlock().double().train()
    x = torch.randn(3, 1, 6, 6, dtype=torch.double)
    target = torch.tensor([0, 2, 1])
    probe = torch.randn(3, 1, 6, 6, dtype=torch.double)
    names = ["stem.weight", "bn0.weight", "dw.weight", "bn1.bias", "se_reduce.weight", "head.weight"]
    params = tuple(dict(net.named_parameters())[n].detach().clone().requires_grad_(True) for n in names)

    class WithParams(nn.Module):
        def __init__(self, values: tuple[torch.Tensor, ...]) -> None:
            super().__init__()
            self.net, self.values = net, values

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.net, dict(zip(names, self.values)), (inputs,))

    def loss(*values: torch.Tensor) -> torch.Tensor:
        a = attribute(WithParams(values), x, target, rule, create_graph=True)
        return (a * probe).sum() + (a**2).sum()

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("rule", RULES)
def test_second_order_gradient_of_the_maps_matches_finite_differences(rule):
    """d/d(theta) of a loss on ``generator_maps`` (train-mode BatchNorm2d and BatchNorm1d,
    ReLU, max pooling): the batch statistics are constants of the map's backward but
    functions of the parameters, and the derivative keeps them."""
    torch.manual_seed(0)
    net = BNReLUNet().double().train()
    x = torch.randn(4, 1, 8, 8, dtype=torch.double)
    target = torch.tensor([0, 2, 1, 1])
    probe = torch.rand(4, 1, 8, 8, dtype=torch.double)
    names = ["conv1.weight", "bn1.weight", "bn2.weight", "bn2.bias", "fc1.weight", "bn3.weight", "fc2.weight"]
    params = tuple(dict(net.named_parameters())[n].detach().clone().requires_grad_(True) for n in names)

    def loss(*values: torch.Tensor) -> torch.Tensor:
        class WithParams(nn.Module):
            def forward(self, inputs: torch.Tensor) -> torch.Tensor:
                return torch.func.functional_call(net, dict(zip(names, values)), (inputs,))

        h = generator_maps(WithParams(), x, target, rule, create_graph=True)
        return (h * probe).sum() + h.square().sum()

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("network", ["gated-block", "resnet18-unet"])
def test_traced_true_gradients_equal_pytorch_first_and_second_order(network):
    """Outside the rule, a traced forward gives PyTorch's own first and second derivatives
    (train-mode BN, grouped and plain convolutions, SiLU, gates, ReLU decoder); the ``grad``
    map is the input gradient with the batch statistics held constant, and its derivative
    is PyTorch's on a plain reference of that function."""
    torch.manual_seed(0)
    if network == "gated-block":
        model, size = GatedBlock().double().train(), 8
    else:
        model, size = build_model(ModelConfig(encoder="resnet18", dropout=0.0)).double().train(), 32
    x0, target = torch.rand(2, 1, size, size, dtype=torch.double), torch.tensor([0, 2])

    def run(traced: bool):
        model.zero_grad()
        x = x0.clone().requires_grad_(True)
        with trace(model) if traced else contextlib.nullcontext() as tr:
            out = model(x)
        mask, logits = out if isinstance(out, tuple) else (out.sum(), out)
        if traced:
            a = tr.attribute(logits, x, target, "grad", create_graph=True)
        else:
            a = frozen_statistics_input_gradient(model, x, target)
        (logits.square().sum() + mask.mean() + a.square().sum()).backward()
        return a.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]

    (a1, g1), (a2, g2) = run(False), run(True)
    torch.testing.assert_close(a1, a2)
    scale = max(g.abs().max() for g in g1)
    assert max((u - v).abs().max() for u, v in zip(g1, g2)) < 1e-9 * scale


@pytest.mark.parametrize("guided", [False, True])
def test_silu_rule_kernel_derivatives(guided):
    torch.manual_seed(0)
    g = torch.randn(2, 3, 4, 4, dtype=torch.double, requires_grad=True)
    x = torch.randn(2, 3, 4, 4, dtype=torch.double, requires_grad=True)
    s = torch.sigmoid(x)
    expected = (torch.relu(g) * (x > 0) if guided else g) * s * (1 + x * (1 - s))
    torch.testing.assert_close(SiLUBackward.apply(g, x, guided), expected)
    assert torch.autograd.gradcheck(lambda a, b: SiLUBackward.apply(a, b, guided), (g, x), atol=1e-9, rtol=1e-7)


def test_batch_norm_input_gradient_kernel_derivatives():
    torch.manual_seed(0)
    g = torch.randn(2, 3, 3, 3, dtype=torch.double, requires_grad=True)
    x = torch.randn(2, 3, 3, 3, dtype=torch.double, requires_grad=True)
    w = torch.randn(3, dtype=torch.double, requires_grad=True)

    def input_grad(g, x, w):  # mean and inverse std depend on x: the kernel must know
        with torch.no_grad():
            var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        return BatchNormInputGrad.apply(g, x, w, mean, torch.rsqrt(var + 1e-5), 1e-5)

    assert torch.autograd.gradcheck(input_grad, (g, x, w), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("shape", [(2, 3, 3, 3), (5, 3), (2, 3, 4)])
def test_frozen_statistics_input_gradient_kernel_derivatives(shape):
    """``g * w * (var(x) + eps) ** -0.5`` per channel: values, first derivatives (finite
    differences) and the derivatives equal those of the plain-torch formula."""
    torch.manual_seed(0)
    dims = [0, *range(2, len(shape))]
    view = (1, -1, *[1] * (len(shape) - 2))
    g = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    x = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    w = torch.randn(3, dtype=torch.double, requires_grad=True)

    def kernel(g, x, w):  # mean and inverse std depend on x: the kernel must know
        with torch.no_grad():
            var, mean = torch.var_mean(x, dim=dims, unbiased=False)
        return FrozenStatsInputGrad.apply(g, x, w, mean, torch.rsqrt(var + 1e-5))

    def reference(g, x, w):
        return g * w.view(view) * (torch.var(x, dim=dims, unbiased=False, keepdim=True) + 1e-5) ** -0.5

    torch.testing.assert_close(kernel(g, x, w), reference(g, x, w), rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradcheck(kernel, (g, x, w), atol=1e-9, rtol=1e-7)
    assert torch.autograd.gradgradcheck(reference, (g, x, w), atol=1e-9, rtol=1e-7)
    v = torch.randn(*shape, dtype=torch.double)
    ours = torch.autograd.grad(kernel(g, x, w), (g, x, w), v)
    theirs = torch.autograd.grad(reference(g, x, w), (g, x, w), v)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_autocast_bf16_runs_and_stays_close():
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="efficientnet-b0")).train()
    x, target = torch.rand(2, 1, 32, 32), torch.tensor([1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = heatmap(attribute(model, x, target, "gbp", create_graph=True))
        loss = h.float().mean()
    loss.backward()
    assert torch.isfinite(model.encoder._conv_stem.weight.grad).all()


# --- nothing left behind -------------------------------------------------------------
@pytest.mark.parametrize("encoder", ["efficientnet-b0", "timm-efficientnet-b0", "resnet18"])
def test_model_is_unchanged_afterwards(encoder):
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=encoder)).eval()
    fresh = copy.deepcopy(model)
    before, state = hooks_and_attrs(model), copy.deepcopy(model.state_dict())
    x, target = torch.rand(2, 1, 32, 32), torch.tensor([0, 1])
    for rule in RULES:
        heatmap(attribute(model, x, target, rule, create_graph=True)).sum().backward()
    model.zero_grad(set_to_none=True)

    assert hooks_and_attrs(model) == before
    assert torch._C._len_torch_function_stack() == 0
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key])
    torch.testing.assert_close(plain_input_gradient(model, x, target), plain_input_gradient(fresh, x, target))


def test_model_is_unchanged_after_an_exception_inside():
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="timm-efficientnet-b0")).eval()  # patched Swish forwards
    fresh = copy.deepcopy(model)
    before = hooks_and_attrs(model)
    x, target = torch.rand(2, 1, 32, 32), torch.tensor([0, 1])

    with pytest.raises(RuntimeError, match="boom"):
        with trace(model):
            model(x)
            raise RuntimeError("boom")
    with pytest.raises(ValueError):  # inside the model's forward
        attribute(model, torch.rand(2, 3, 32, 32), target, "gbp")
    with pytest.raises(RuntimeError):  # inside the gradient call: class index out of range
        attribute(model, x, torch.tensor([0, 7]), "gbp")

    assert hooks_and_attrs(model) == before
    assert torch._C._len_torch_function_stack() == 0
    torch.testing.assert_close(plain_input_gradient(model, x, target), plain_input_gradient(fresh, x, target))


def test_training_step_after_generator_uses_true_derivatives():
    """A loss backpropagated through a traced forward gets PyTorch's plain gradients."""
    torch.manual_seed(0)
    net = GatedBlock().eval()
    x, target = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    with trace(net) as tr:
        logits = net(x.requires_grad_(True))
    tr.attribute(logits, x, target, "gbp")  # the rule is on only during this call
    (traced,) = torch.autograd.grad(logits.sum(), net.stem.weight)
    (plain,) = torch.autograd.grad(net(x).sum(), net.stem.weight)
    torch.testing.assert_close(traced, plain)


@pytest.mark.parametrize("act", [F.relu, F.silu, F.relu6], ids=["relu", "silu", "relu6"])
def test_in_place_activations_keep_their_meaning_and_derivatives(act):
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 5, 5, dtype=torch.double)
    w = torch.randn(3, 3, 1, 1, dtype=torch.double, requires_grad=True)
    target = torch.tensor([0, 1])

    def run(traced: bool):
        x = x0.clone().requires_grad_(True)
        with trace(nn.Identity()) if traced else contextlib.nullcontext() as tr:
            z = F.conv2d(x, w) * 2.0
            out = act(z, inplace=True)
            assert out is z
            logits = out.mean((2, 3))  # (B, 3)
        if traced:
            a = tr.attribute(logits, x, target, "grad", create_graph=True)
        else:
            (a,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), x, create_graph=True)
        (gw,) = torch.autograd.grad(a.square().sum() + logits.sum(), w)
        return a, gw

    for plain, traced in zip(run(False), run(True)):
        torch.testing.assert_close(plain, traced)


def test_rule_without_traced_forward_is_an_error():
    from cxrgaze.explain import Trace

    net = Tiny(nn.ReLU())
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="not traced"):
        Trace().attribute(net(x), x, torch.tensor([0]), "gbp")
