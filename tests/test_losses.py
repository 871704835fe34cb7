"""Objectives of every variant: finite, reach the right parameters, fall, edge cases."""

from __future__ import annotations

import copy

import pytest
import torch

from cxrgaze.config import ConfigError, LossConfig, ModelConfig, TrainConfig
from cxrgaze.explain import RULES, UnsupportedActivation, generator_maps
from cxrgaze.losses import VARIANTS, classification_loss, compute_loss, map_loss, objective, parse_variant
from cxrgaze.models import build_model

# A tiny EfficientNet-family encoder (SiLU, squeeze-excite, depthwise convs): fast on CPU.
TINY = ModelConfig(encoder="tu-tinynet_e", dropout=0.0)
SIZE = 32





def make_batch(seed: int = 0, n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    centre = torch.randint(8, SIZE - 8, (n, 2), generator=g)
    gaze = torch.exp(-((yy - centre[:, :1, None]) ** 2 + (xx - centre[:, 1:, None]) ** 2) / 40.0)
    return {
        "image": torch.rand(n, 1, SIZE, SIZE, generator=g),
        "gaze": gaze.unsqueeze(1).float(),  # (B, 1, H, W) in [0, 1]
        "label": torch.arange(n) % 3,
    }


_MODELS: dict[str, torch.nn.Module] = {}


def model_for(variant: str) -> torch.nn.Module:
    """A fresh copy of one seeded model per architecture (built once per session)."""
    kind = "unet" if parse_variant(variant).has_decoder else "baseline"
    if kind not in _MODELS:
        torch.manual_seed(0)
        _MODELS[kind] = build_model(TINY, variant=kind)
    return copy.deepcopy(_MODELS[kind]).train()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_every_offered_variant_is_accepted_and_builds_the_model_it_says():
    """Each name ``cxrgaze train --variant`` offers is accepted by the training config,
    builds (through ``build_model``, as ``train`` does) a model with a decoder exactly when
    the variant says so, and names a generator rule that the explainer implements."""
    for name in VARIANTS:
        spec = parse_variant(name)
        assert spec.name == name
        assert TrainConfig(variant=name).variant == name
        model = build_model(TINY, variant=name)
        assert model.has_decoder == spec.has_decoder, name
        assert (model.decoder is not None) == spec.has_decoder, name
        assert spec.generator in RULES, name
    assert parse_variant("rrr-gbp").objective == "rrr" and not parse_variant("rrr-gbp").has_decoder
    assert parse_variant("set3-gbp").objective == "set3" and parse_variant("set3-gbp").rule == "gbp"
    assert parse_variant("set1-grad").rule == "grad"
    for bad in ("set4-gbp", "set1-gradcam", "unet-gbp", "rrr", ""):
        with pytest.raises(ValueError, match="unknown variant"):
            parse_variant(bad)
        with pytest.raises(ConfigError, match="unknown variant"):
            TrainConfig(variant=bad)


def _nonzero(g: torch.Tensor | None) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_finite_and_reaches_the_parameters_it_should(variant):
    """The loss is the weighted sum of the terms it logs (weights: the variant's table);
    its non-classification part trains the decoder mask exactly when the variant says it
    trains the mask and reaches the classification head (through the generator's map, a
    second-order path) exactly when it says it trains the generator; it depends on the gaze
    exactly when a term compares something with the gaze."""
    spec, cfg = parse_variant(variant), LossConfig()
    weights = spec.term_weights(cfg.gamma, cfg.alpha, cfg.rrr_weight)._asdict()
    model, batch = model_for(variant), make_batch()
    out = objective(model, batch, variant, cfg)
    loss, terms = out.total, out.terms
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert terms["loss"] == loss.detach() and not any(t.requires_grad for t in terms.values())
    assert set(terms) == {"loss"} | {k for k, w in weights.items() if w > 0}
    torch.testing.assert_close(terms["loss"], sum(weights[k] * terms[k] for k in terms if k != "loss"))

    head = model.classification_head[3].weight
    decoder = [p for n, p in model.named_parameters() if n.startswith(("decoder.", "segmentation_head."))]
    rest = loss - weights["cls"] * classification_loss(out.class_logits, batch["label"], cfg.cls_loss)
    head_grad, *decoder_grads = torch.autograd.grad(rest, [head, *decoder], allow_unused=True, retain_graph=True)
    assert _nonzero(head_grad) == spec.trains_generator, None if head_grad is None else float(head_grad.abs().sum())
    assert any(_nonzero(g) for g in decoder_grads) == spec.trains_mask

    loss.backward()
    for name, p in model.named_parameters():
        in_decoder = name.startswith(("decoder.", "segmentation_head."))
        if in_decoder and not spec.trains_mask:
            assert p.grad is None, name  # e.g. set 1 never looks at the mask
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert head.grad.abs().sum() > 0
    assert next(model.encoder.parameters()).grad.abs().sum() > 0

    other_gaze = dict(batch, gaze=1 - batch["gaze"])
    moved = objective(model_for(variant), other_gaze, variant, cfg).total.detach()
    uses_gaze = weights["mask_gaze"] > 0 or weights["gen_gaze"] > 0 or weights["rrr"] > 0
    assert (not torch.equal(moved, loss.detach())) == uses_gaze, (moved, loss)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_few_steps_reduce_the_loss(variant):
    torch.manual_seed(0)
    model, batch = model_for(variant), make_batch(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = LossConfig(gamma=0.5)
    losses = []
    for _ in range(8):
        loss, _ = compute_loss(model, batch, variant, cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    final, _ = compute_loss(model, batch, variant, cfg)
    assert final.item() < 0.9 * losses[0], (variant, losses, final.item())


def _same_objective(model, batch, a, cfg_a, b, cfg_b):
    model_a, model_b = copy.deepcopy(model), copy.deepcopy(model)
    total_a, _ = compute_loss(model_a, batch, a, cfg_a)
    total_b, _ = compute_loss(model_b, batch, b, cfg_b)
    torch.testing.assert_close(total_a, total_b)
    total_a.backward()
    total_b.backward()
    ga, gb = grads(model_a), grads(model_b)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert (ga[name] is None) == (gb[name] is None), name
        if ga[name] is not None:
            torch.testing.assert_close(ga[name], gb[name], msg=name)


@pytest.mark.parametrize("rule", ["gbp", "deconv"])
def test_alpha_edges_are_the_simpler_objectives(rule):
    model, batch = model_for("unet"), make_batch(2)
    # alpha = 1: set 3 is the static-gaze U-Net; alpha = 0: set 3 is set 1.
    _same_objective(model, batch, f"set3-{rule}", LossConfig(alpha=1.0), "unet", LossConfig())
    _same_objective(model, batch, f"set3-{rule}", LossConfig(alpha=0.0), f"set1-{rule}", LossConfig())


@pytest.mark.parametrize("variant", ["unet", "set1-gbp", "set2-deconv", "set3-gbp"])
def test_gamma_one_is_the_classification_loss(variant):
    model, batch = model_for("unet"), make_batch(3)
    _same_objective(model, batch, variant, LossConfig(gamma=1.0), "baseline", LossConfig(gamma=0.2))
    out = objective(copy.deepcopy(model), batch, variant, LossConfig(gamma=1.0))
    torch.testing.assert_close(out.total, classification_loss(out.class_logits, batch["label"]))


def test_set2_detach_switch_decides_whether_the_generator_is_trained():
    batch = make_batch(4)
    head_grads = {}
    for detach in (True, False):
        model = model_for("set2-gbp")
        loss, _ = compute_loss(model, batch, "set2-gbp", LossConfig(gamma=0.0, detach_generator_target=detach))
        loss.backward()
        # With gamma 0 the head reaches the loss only through the generator's map H.
        head_grads[detach] = model.classification_head[3].weight.grad
        assert model.segmentation_head[0].weight.grad.abs().sum() > 0
    assert head_grads[True] is None or head_grads[True].abs().sum() == 0
    assert head_grads[False] is not None and head_grads[False].abs().sum() > 0


def test_objective_returns_the_maps():
    out = objective(model_for("unet"), make_batch(), "set3-gbp", LossConfig())
    assert out.mask_logits.shape == (4, 1, SIZE, SIZE)
    assert out.generator_map.shape == (4, 1, SIZE, SIZE)
    assert out.generator_map.min() >= 0 and out.generator_map.amax(dim=(1, 2, 3)).eq(1).all()
    assert out.class_logits.shape == (4, 3)


@pytest.mark.parametrize("variant", ["set1-deconv", "set3-gbp"])
def test_objective_map_is_generator_maps_on_one_forward(variant):
    """The objective's map is ``generator_maps`` of the true class (each image's own map),
    from the loss's single forward: running statistics move as after one plain forward."""
    model, batch = model_for("unet"), make_batch(6)
    alone, plain = copy.deepcopy(model), copy.deepcopy(model)
    out = objective(model, batch, variant, LossConfig())
    out.total.backward()
    torch.testing.assert_close(out.generator_map, generator_maps(alone, batch["image"], batch["label"],
                                                                 parse_variant(variant).rule))
    with torch.no_grad():  # the objective's one forward (set 1 has no decoder pass)
        (plain.classify if variant.startswith("set1") else plain)(batch["image"])
    expected = dict(plain.named_buffers())
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_labels_as_indices_or_one_hot_agree():
    logits = torch.randn(5, 3)
    label = torch.tensor([0, 2, 1, 1, 0])
    one_hot = torch.nn.functional.one_hot(label, 3)
    for kind in ("bce", "ce"):
        torch.testing.assert_close(classification_loss(logits, label, kind), classification_loss(logits, one_hot, kind))
    torch.testing.assert_close(
        classification_loss(logits, label, "bce"),
        torch.nn.functional.binary_cross_entropy_with_logits(logits, one_hot.float()),
    )
    torch.testing.assert_close(classification_loss(logits, label, "ce"), torch.nn.functional.cross_entropy(logits, label))


def test_map_losses():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 8, 8, generator=g)
    h = torch.rand(2, 1, 8, 8, generator=g)
    h[:, :, 0, 0] = 1.0  # a normalised heatmap's maximum: BCE must stay finite (clamp)
    h[:, :, 0, 1] = 0.0
    for kind in ("bce", "kl", "mse"):
        value = map_loss(h, target, kind)
        assert torch.isfinite(value) and value >= 0
    assert map_loss(target, target, "kl") < 1e-6
    assert map_loss(target, target, "mse") == 0
    logits = torch.randn(2, 1, 8, 8, generator=g)
    torch.testing.assert_close(
        map_loss(logits, target, "bce", logits=True),
        torch.nn.functional.binary_cross_entropy_with_logits(logits, target),
    )
    torch.testing.assert_close(map_loss(logits, target, "mse", logits=True), map_loss(logits.sigmoid(), target, "mse"))
    h.requires_grad_(True)
    map_loss(h, target, "bce").backward()
    assert torch.isfinite(h.grad).all()
    with pytest.raises(ValueError, match="shapes differ"):
        map_loss(h, target[:, :, :4], "bce")


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_every_map_loss_option_trains(kind):
    model, batch = model_for("unet"), make_batch(5)
    loss, terms = compute_loss(model, batch, "set3-gbp", LossConfig(map_loss=kind, cls_loss="ce"))
    assert torch.isfinite(loss)
    loss.backward()
    assert model.encoder.model.conv_stem.weight.grad.abs().sum() > 0


def test_loss_config_validation():
    with pytest.raises(ConfigError, match="gamma"):
        LossConfig(gamma=1.5)
    with pytest.raises(ConfigError, match="map_loss"):
        LossConfig(map_loss="dice")
    with pytest.raises(ConfigError, match="cls_loss"):
        LossConfig(cls_loss="focal")


def test_unet_variant_needs_a_decoder():
    with pytest.raises(ValueError, match="decoder"):
        compute_loss(model_for("baseline"), make_batch(), "unet", LossConfig())


def test_plain_gradient_row_works_where_guided_rules_cannot():
    model = model_for("unet")
    # Make one activation of the encoder a GELU (no gbp/deconv rule).
    model.encoder.model.bn1.act = torch.nn.GELU()
    loss, _ = compute_loss(model, make_batch(), "set3-grad", LossConfig())
    assert torch.isfinite(loss)
    with pytest.raises(UnsupportedActivation):
        compute_loss(model, make_batch(), "set3-gbp", LossConfig())
