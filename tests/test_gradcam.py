"""Grad-CAM through pytorch-grad-cam: shapes, targets, and a model left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrgaze.config import ModelConfig
from cxrgaze.explain.gradcam import gradcam
from cxrgaze.models import build_model

TINY = ModelConfig(encoder="tu-tinynet_e", encoder_weights=None)
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _model(variant: str):
    torch.manual_seed(0)
    return build_model(TINY, variant)


@pytest.mark.parametrize("variant", ["unet", "baseline"])
def test_shape_range_and_predicted_class_by_default(variant):
    model = _model(variant).eval()
    x = torch.rand(3, 1, 64, 96)
    maps = gradcam(model, x)
    assert maps.shape == (3, 64, 96) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0 and maps.max() > 0.5
    with torch.no_grad():
        predicted = model.classify(x).argmax(dim=1)
    np.testing.assert_array_equal(maps, gradcam(model, x, predicted))


def test_target_is_respected():
    model = _model("unet").eval()
    x = torch.rand(2, 1, 128, 128)
    maps = [gradcam(model, x, torch.full((2,), k)) for k in range(3)]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert np.abs(maps[a] - maps[b]).max() > 0.1, (a, b)
    mixed = gradcam(model, x, torch.tensor([2, 0]))
    np.testing.assert_array_equal(mixed[0], maps[2][0])
    np.testing.assert_array_equal(mixed[1], maps[0][1])


def test_model_is_left_as_it_was():
    model = _model("unet")  # train mode, as build_model returns it
    model.encoder.eval()  # a mixed state must come back as it was
    frozen = next(model.classification_head.parameters())
    frozen.requires_grad_(False)
    with_grad = next(model.encoder.parameters())
    with_grad.grad = torch.full_like(with_grad, 0.5)
    modes = {name: m.training for name, m in model.named_modules()}
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 1, 64, 64)
    model.eval()
    with torch.no_grad():
        before = model.classify(x)
    for name, m in model.named_modules():
        m.train(modes[name])

    with torch.no_grad():  # Grad-CAM enables gradients itself
        gradcam(model, x, torch.tensor([1, 2]))

    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires
    for name, m in model.named_modules():
        for attr in HOOK_DICTS:
            assert not getattr(m, attr), (name, attr)
    for key, value in model.state_dict().items():  # BatchNorm running statistics included
        assert torch.equal(value, state[key]), key
    assert torch.equal(with_grad.grad, torch.full_like(with_grad, 0.5))
    assert all(p.grad is None for p in model.parameters() if p is not with_grad)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.classify(x), before)


def test_bad_shapes_raise():
    model = _model("baseline").eval()
    with pytest.raises(ValueError, match="grey"):
        gradcam(model, torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="target"):
        gradcam(model, torch.rand(2, 1, 64, 64), torch.tensor([0]))
