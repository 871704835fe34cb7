"""Sanity checks of heatmap generators: the cascade, input dependence, no side effects."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxrgaze.config import ModelConfig
from cxrgaze.evaluation.cascade import cascade_randomisation, cascade_steps, reinitialise
from cxrgaze.evaluation.sanity import balanced_subset, generator_map_fn, input_dependence, sanity_check
from cxrgaze.models import build_model

SIZE = 32


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(ModelConfig(encoder="tu-tinynet_e")).eval()


@pytest.fixture(scope="module")
def batch():
    """8 smooth random grey images and classes 0, 1, 2, 0, 1, 2, ..."""
    g = torch.Generator().manual_seed(1)
    x = F.avg_pool2d(torch.rand(8, 1, SIZE + 4, SIZE + 4, generator=g), 5, stride=1)  # (8, 1, 32, 32)
    x = (x - x.amin()) / (x.amax() - x.amin())
    return x, torch.arange(8) % 3


def image_itself(model, images, targets):
    return images


def fixed_pattern(model, images, targets):
    """The same non-constant map for every image, whatever the model."""
    ramp = torch.linspace(0, 1, images.shape[-1])
    return (ramp[None, :] * ramp[:, None]).expand(images.shape[0], 1, -1, -1)


def test_cascade_steps_of_the_tiny_model(tiny):
    steps = cascade_steps(tiny)
    assert [name for name, _ in steps] == ["head"] + [f"stage{k}" for k in range(7, 0, -1)] + ["stem"]
    assert steps[1][1] == ("encoder.model.blocks.6",)
    assert steps[-1][1] == ("encoder.model.conv_stem", "encoder.model.bn1")
    modules = dict(tiny.named_modules())
    covered = {id(p) for _, names in steps for n in names for p in modules[n].parameters()}
    wanted = [*tiny.encoder.parameters(), *tiny.classification_head.parameters()]
    assert all(id(p) in covered for p in wanted)


@pytest.mark.parametrize("encoder, stages", [("efficientnet-b0", 4), ("resnet18", 4)])
def test_cascade_steps_of_other_encoders(encoder, stages):
    steps = cascade_steps(build_model(ModelConfig(encoder=encoder), variant="baseline"))
    assert [name for name, _ in steps] == ["head"] + [f"stage{k}" for k in range(stages, 0, -1)] + ["stem"]


def test_map_that_ignores_the_model_fails(tiny, batch):
    x, y = batch
    result = sanity_check(tiny, image_itself, x, y, n_images=6)
    assert [s.name for s in result.cascade][:2] == ["original", "head"]
    assert all(s.spearman == pytest.approx(1.0) and s.n == 6 for s in result.cascade)
    assert result.cascade_spearman == pytest.approx(1.0)
    assert not result.passed
    assert any(r.startswith("cascade:") for r in result.reasons)
    # the image as its own map: the maps' pairwise correlation is the images'
    assert result.input_pairwise_cc.mean == pytest.approx(result.image_pairwise_cc.mean)


def test_plain_gradient_drops(tiny, batch):
    x, y = batch
    result = sanity_check(tiny, generator_map_fn("grad"), x, y, n_images=6)
    assert result.cascade[0].spearman == pytest.approx(1.0)
    assert result.cascade_spearman < 0.5
    assert result.head_spearman < 0.95
    assert not any(r.startswith("cascade:") for r in result.reasons)
    assert result.cascade[-1].n == 6 and result.cascade[-1].n_nan == 0


def test_input_dependence_of_a_fixed_map_is_one_and_flagged(tiny, batch):
    x, y = batch
    result = sanity_check(tiny, fixed_pattern, x, y, n_images=8, steps=cascade_steps(tiny)[:1])
    assert result.input_pairwise_cc.mean == pytest.approx(1.0)
    # classes 0, 1, 2 have 3, 3, 2 images: 3 + 3 + 1 pairs
    assert (result.input_pairwise_cc.n, result.input_pairwise_cc.n_nan, result.input_pairwise_cc.n_classes) == (7, 0, 3)
    assert not result.passed
    assert any(r.startswith("input:") for r in result.reasons)
    metrics = result.to_metrics("sanity_fixed_")
    assert metrics["sanity_fixed_input_pairwise_cc"] == pytest.approx(1.0)
    assert metrics["sanity_fixed_passed"] == 0.0


def test_constant_maps_are_undefined_and_fail(tiny, batch):
    x, y = batch
    result = sanity_check(tiny, lambda m, a, t: torch.ones_like(a), x, y, n_images=4,
                          steps=cascade_steps(tiny)[:1])
    assert math.isnan(result.cascade_spearman) and result.cascade[-1].n_nan == 4
    assert math.isnan(result.input_pairwise_cc.mean) and result.input_pairwise_cc.n_nan == 1
    assert not result.passed and len(result.reasons) == 2


def test_caller_model_and_rng_untouched(tiny, batch):
    x, y = batch
    model = build_model(ModelConfig(encoder="tu-tinynet_e"), variant="baseline").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cpu_state = torch.get_rng_state()
    curve, _ = cascade_randomisation(model, generator_map_fn("gbp"), x[:3], y[:3], seed=5)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # seeded: the same seed gives the same curve, another seed another one
    again, _ = cascade_randomisation(model, generator_map_fn("gbp"), x[:3], y[:3], seed=5)
    assert [s.spearman for s in again] == [s.spearman for s in curve]
    other, _ = cascade_randomisation(model, generator_map_fn("gbp"), x[:3], y[:3], seed=6)
    assert [s.spearman for s in other] != [s.spearman for s in curve]


def test_reinitialise_draws_every_parameter():
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="tu-tinynet_e"), variant="baseline")
    stage = model.encoder.model.blocks[6]
    with torch.no_grad():
        for p in stage.parameters():
            p.fill_(0.123)
        for module in stage.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.fill_(5.0)
    assert reinitialise(stage) == len(list(stage.parameters()))
    assert all(not torch.all(p == 0.123) for p in stage.parameters())
    bns = [m for m in stage.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(torch.all(m.running_mean == 0) for m in bns)  # BatchNorm: the identity


def test_input_dependence_by_hand():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[4.0, 3.0], [2.0, 1.0]])  # abs maps: Pearson(a, b) = -1
    c = np.array([[1.0, 2.0], [3.0, 5.0]])
    maps = np.stack([a, b, a, c, -a])  # -a counts as a (absolute maps)
    out = input_dependence(maps, [0, 0, 1, 1, 2])
    # class 0: -1; class 2 has one image; class 1: centred a (-1.5, -0.5, 0.5, 1.5),
    # centred c (-1.75, -0.75, 0.25, 2.25): products 6.5, squares 5 and 8.75
    r_ac = 6.5 / math.sqrt(5 * 8.75)
    assert out.by_class[0] == (pytest.approx(-1.0), 1, 0)
    assert out.by_class[1][0] == pytest.approx(r_ac)
    assert 2 not in out.by_class
    assert out.mean == pytest.approx((r_ac - 1.0) / 2)
    assert (out.n, out.n_nan, out.n_classes) == (2, 0, 2)
    same = input_dependence(np.stack([a, -a, np.ones((2, 2))]), torch.tensor([1, 1, 1]))
    assert same.mean == pytest.approx(1.0) and (same.n, same.n_nan) == (1, 2)


def test_generator_map_fn_checks_the_rule():
    assert generator_map_fn("deconv").__name__ == "generator_deconv"
    with pytest.raises(ValueError, match="rule must be one of"):
        generator_map_fn("lrp")


def test_balanced_subset():
    classes = np.array([2, 2, 0, 2, 1, 0, 2])
    assert balanced_subset(classes, 4).tolist() == [2, 4, 0, 5]
    assert sorted(balanced_subset(classes, 100).tolist()) == list(range(7))
    with pytest.raises(ValueError):
        balanced_subset(classes, 0)


def test_to_metrics_keys(tiny, batch):
    x, y = batch
    result = sanity_check(tiny, image_itself, x, y, n_images=3, steps=cascade_steps(tiny)[:2],
                          head_threshold=0.9)
    metrics = result.to_metrics("sanity_generator_")
    assert set(metrics) == {
        "sanity_generator_cascade_spearman", "sanity_generator_cascade_spearman_n",
        "sanity_generator_head_spearman", "sanity_generator_cascade_head_spearman",
        "sanity_generator_cascade_stage7_spearman", "sanity_generator_input_pairwise_cc",
        "sanity_generator_input_pairwise_cc_n", "sanity_generator_input_pairwise_cc_nan",
        "sanity_generator_image_pairwise_cc", "sanity_generator_n_images", "sanity_generator_passed",
    }
    assert all(isinstance(v, float) for v in metrics.values())
    assert any("after head" in r for r in result.reasons)
