"""Gaze supervision that can see a small shortcut: the outside-gaze terms of the generator
loss, "right for the right reasons" (rrr-*), and gaze-aware checkpoint selection.

Values are checked by hand on small maps; gradients must reach the parameters; the
selection rule is checked against the history a real training run wrote."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cxrgaze.checkpoint import load_checkpoint
from cxrgaze.config import (ConfigError, LossConfig, ModelConfig, RunConfig, SearchRange, TrainConfig, tune_config,
                            variant_space)
from cxrgaze.explain import trace
from cxrgaze.losses import (compute_loss, generator_gaze_loss, log_probability_gradient, map_loss, objective,
                            outside_mass, outside_penalty, rrr_penalty)
from cxrgaze.models import build_model, class_logits
from cxrgaze.predict import selection_score
from cxrgaze.train import train

TINY = ModelConfig(encoder="tu-tinynet_e", dropout=0.0)


def maps(*rows) -> torch.Tensor:
    """A (1, 1, H, W) map from nested lists."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def test_outside_mass_by_hand():
    h = maps([1.0, 0.0], [0.0, 1.0])
    g = maps([1.0, 0.0], [0.0, 0.0])
    # mass 2; outside the gaze: pixel (1, 1) with weight 1 - 0 = 1 -> 1 / 2
    assert outside_mass(h, g, eps=0).item() == pytest.approx(0.5)
    g_soft = maps([1.0, 0.0], [0.0, 0.5])
    assert outside_mass(h, g_soft, eps=0).item() == pytest.approx(0.25)  # (0 + 0.5) / 2
    assert outside_mass(torch.zeros_like(h), g).item() == 0.0  # no mass to misplace
    assert outside_mass(h, torch.ones_like(h)).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="map shapes differ"):
        outside_mass(h, torch.ones(1, 1, 3, 3))


def test_outside_penalty_and_rrr_penalty_by_hand():
    h = maps([1.0, 0.5], [0.0, 1.0])
    g = maps([1.0, 0.0], [0.0, 0.5])
    # (1-G) H = [[0, 0.5], [0, 0.5]] -> squares 0.25 + 0.25 over 4 pixels
    assert outside_penalty(h, g).item() == pytest.approx(0.125)
    a = maps([2.0, -1.0], [0.0, 3.0])
    # (1-G) A = [[0, -1], [0, 1.5]] -> 1 + 2.25, summed (Ross et al.)
    assert rrr_penalty(a, g).item() == pytest.approx(3.25)
    two_channels = torch.cat([a, a], dim=1)  # channels' squares add up
    assert rrr_penalty(two_channels, g).item() == pytest.approx(6.5)


def test_mass_share_counts_mass_not_pixels_and_ignores_the_maps_scale():
    """What the mass term measures: the share of the map's mass, whatever its scale, that
    lies off the gaze; a blob moved off the gaze moves exactly its share."""
    gaze = torch.zeros(1, 1, 8, 8)
    gaze[..., 2:6, 2:6] = 1.0  # the radiologist looked at the centre
    h = torch.zeros(1, 1, 8, 8)
    h[..., 3:5, 3:5] = 1.0  # mass 4 on the gaze
    h[..., 0, 0] = 2.0  # mass 2 on a corner "marker"
    assert outside_mass(h, gaze, eps=0).item() == pytest.approx(2 / 6)
    assert outside_mass(0.25 * h, gaze, eps=0).item() == pytest.approx(2 / 6)
    assert outside_penalty(0.5 * h, gaze).item() == pytest.approx(0.25 * outside_penalty(h, gaze).item())


def test_generator_gaze_loss_adds_only_the_weighted_terms():
    h, g = maps([1.0, 0.5], [0.0, 1.0]), maps([1.0, 0.0], [0.0, 0.5])
    plain, parts = generator_gaze_loss(h, g, LossConfig())
    assert parts == {} and plain.item() == pytest.approx(map_loss(h, g).item())
    total, parts = generator_gaze_loss(h, g, LossConfig(mass_weight=2.0, outside_weight=10.0))
    assert set(parts) == {"gen_mass", "gen_outside"}
    expected = plain.item() + 2.0 * outside_mass(h, g).item() + 10.0 * 0.125
    assert total.item() == pytest.approx(expected)


@pytest.mark.parametrize("cls_loss", ["bce", "ce"])
def test_log_probability_gradient_is_the_gradient_of_the_summed_log_probabilities(cls_loss):
    logits = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    log_p = torch.nn.functional.logsigmoid(logits) if cls_loss == "bce" else torch.log_softmax(logits, dim=1)
    (expected,) = torch.autograd.grad(log_p.sum(), logits)
    torch.testing.assert_close(log_probability_gradient(logits.detach(), cls_loss).double(), expected,
                               rtol=1e-6, atol=1e-6)


def _batch(n: int = 4, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.randint(8, size - 8, (n, 2), generator=g)
    gaze = torch.exp(-((yy - centre[:, :1, None]) ** 2 + (xx - centre[:, 1:, None]) ** 2) / 40.0)
    return {"image": torch.rand(n, 1, size, size, generator=g), "gaze": gaze.unsqueeze(1).float(),
            "label": torch.arange(n) % 3}


def _baseline_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY, variant="rrr-grad")


def test_rrr_grad_is_ross_et_al_term_to_second_order():
    """``rrr-grad`` in eval mode (no batch statistics) is exactly
    ``L_cls + l sum ((1 - G) d/dx sum_k log sigmoid(z_k))^2``, with its gradient with respect
    to the parameters taken through the input gradient (double backward)."""
    batch, weight = _batch(), 3e-4
    model = _baseline_model().eval()
    out = objective(model, batch, "rrr-grad", LossConfig(rrr_weight=weight))
    out.total.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = _baseline_model().eval()
    x = batch["image"].clone().requires_grad_(True)
    logits = class_logits(reference, x)
    (dx,) = torch.autograd.grad(torch.nn.functional.logsigmoid(logits).sum(), x, create_graph=True)
    penalty = (((1 - batch["gaze"]) * dx) ** 2).flatten(1).sum(1).mean()
    cls = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nn.functional.one_hot(batch["label"], 3).float())
    total = cls + weight * penalty
    total.backward()
    assert out.terms["rrr"].item() == pytest.approx(penalty.item(), rel=1e-4)
    assert out.total.item() == pytest.approx(total.item(), rel=1e-4)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-3, atol=1e-6, msg=name)
    assert ours["classification_head.3.weight"].abs().sum() > 0


@pytest.mark.parametrize("variant", ["rrr-grad", "rrr-gbp"])
def test_rrr_penalty_reaches_the_parameters_and_zero_weight_is_the_baseline(variant):
    batch = _batch(seed=1)
    model = _baseline_model()
    model.train()
    with_penalty = copy.deepcopy(model)
    total, terms = compute_loss(with_penalty, batch, variant, LossConfig(rrr_weight=1e-4))
    assert set(terms) == {"loss", "cls", "rrr"} and terms["rrr"] > 0
    # The penalty moves the encoder: its gradient differs from the classification loss's.
    total.backward()
    cls_only = copy.deepcopy(model)
    compute_loss(cls_only, batch, "baseline", LossConfig(gamma=1.0))[0].backward()
    first = next(n for n, _ in model.named_parameters())
    p_pen = dict(with_penalty.named_parameters())[first].grad
    p_cls = dict(cls_only.named_parameters())[first].grad
    assert torch.isfinite(p_pen).all()
    assert (p_pen - p_cls).norm() > 0.1 * p_cls.norm()  # the penalty is a sizeable part of the gradient
    # rrr_weight = 0 is exactly the baseline's loss and gradient.
    zero, base = copy.deepcopy(model), copy.deepcopy(model)
    t0, terms0 = compute_loss(zero, batch, variant, LossConfig(rrr_weight=0.0))
    t1, _ = compute_loss(base, batch, "baseline", LossConfig())
    assert set(terms0) == {"loss", "cls"}
    torch.testing.assert_close(t0, t1)
    t0.backward()
    t1.backward()
    for (name, a), (_, b) in zip(zero.named_parameters(), base.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_rrr_per_image_attribution_does_not_mix_images():
    """Image i's penalty is its own: changing image j leaves image i's attribution (train
    mode: batch statistics held constant in the generator's backward)."""
    model = _baseline_model().train()
    batch = _batch(n=3, seed=2)
    x = batch["image"].clone().requires_grad_(True)
    with trace(model) as tr:
        logits = class_logits(model, x)
    a = tr.attribute(logits, x, batch["label"], "gbp", output_grad=log_probability_gradient(logits, "bce"))
    # Row 0 equals the attribution of image 0's own summed log-probabilities alone.
    weights = log_probability_gradient(logits, "bce").detach()
    weights[1:] = 0
    x2 = batch["image"].clone().requires_grad_(True)
    with trace(model) as tr2:
        logits2 = class_logits(model, x2)
    a0 = tr2.attribute(logits2, x2, batch["label"], "gbp", output_grad=weights)
    torch.testing.assert_close(a[0], a0[0])
    assert a0[1:].abs().sum() == 0


def test_set3_outside_terms_reach_the_encoder_and_are_logged():
    torch.manual_seed(0)
    model = build_model(TINY, variant="set3-gbp").train()
    batch = _batch(seed=3)
    base = copy.deepcopy(model)
    total, terms = compute_loss(model, batch, "set3-gbp", LossConfig(mass_weight=5.0, outside_weight=50.0))
    assert {"gen_mass", "gen_outside"} <= set(terms) and 0 < terms["gen_mass"] <= 1
    total.backward()
    plain_total, plain_terms = compute_loss(base, batch, "set3-gbp", LossConfig())
    assert "gen_mass" not in plain_terms
    plain_total.backward()
    name = "encoder.model.conv_stem.weight"
    grads = dict(model.named_parameters())[name].grad, dict(base.named_parameters())[name].grad
    assert torch.isfinite(grads[0]).all() and not torch.allclose(*grads)


def test_loss_weights_are_validated():
    for key in ("mass_weight", "outside_weight", "rrr_weight"):
        for bad in (-1.0, float("nan"), "x", True):
            with pytest.raises(ConfigError, match=f"loss.{key}"):
                LossConfig(**{key: bad})
    for bad in (-0.5, "high"):
        with pytest.raises(ConfigError, match="selection_gaze_weight"):
            TrainConfig(selection_gaze_weight=bad)


def test_tuning_space_gives_each_variant_its_own_weights():
    space = {"gamma": SearchRange(0.05, 0.95), "mass_weight": SearchRange(0.0, 5.0),
             "rrr_weight": SearchRange(1e-7, 1e-2, log=True)}
    assert sorted(variant_space(space, "set1-deconv")) == ["gamma", "mass_weight"]
    assert sorted(variant_space(space, "set2-gbp")) == ["gamma"]
    assert sorted(variant_space(space, "rrr-gbp")) == ["rrr_weight"]
    params = {"tune": {"variants": ["rrr-grad"], "space": {"rrr_weight": {"low": -1.0, "high": 1.0}}}}
    with pytest.raises(ConfigError, match="rrr_weight must be non-negative"):
        tune_config(params)
    with pytest.raises(ConfigError, match="rrr-grad uses none of tune.space"):
        tune_config({"tune": {"variants": ["rrr-grad"], "space": {"alpha": {"low": 0.0, "high": 1.0}}}})


def test_selection_score():
    assert selection_score(0.9, 0.7, 0.0) == 0.9
    assert selection_score(0.9, 0.7, 0.5) == pytest.approx(0.55)


def test_gaze_aware_selection_keeps_the_epoch_with_the_best_score(tiny_prepared, tmp_path):
    """The same training with selection by AUC and by AUC minus outside mass: identical
    histories (selection does not change training), each keeps the argmax of its own score,
    and best.pt holds that epoch."""
    prepared, split = tiny_prepared
    model = ModelConfig(encoder="tu-tinynet_e", decoder_channels=(32, 16, 16, 8, 8))
    runs = {}
    for weight in (0.0, 50.0):
        cfg = RunConfig(model=model, loss=LossConfig(), train=TrainConfig(
            variant="set1-gbp", epochs=4, batch_size=16, lr=3e-3, device="cpu", selection_gaze_weight=weight))
        runs[weight] = train(cfg, prepared, split, tmp_path / str(weight), progress=False)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "val_selection")} for r in h]  # noqa: E731
    assert strip(runs[0.0].history) == strip(runs[50.0].history)
    for weight, result in runs.items():
        history = result.history
        assert all(0 <= r["val_outside_mass"] <= 1 for r in history)
        scores = [r["val_auc_macro"] - weight * r["val_outside_mass"] for r in history]
        assert [r["val_selection"] for r in history] == pytest.approx(scores)
        assert result.best_epoch == int(np.argmax(scores))
        assert load_checkpoint(tmp_path / str(weight) / "best.pt")["epoch"] == result.best_epoch
        assert result.best["val_selection"] == pytest.approx(max(scores))


def test_selection_follows_the_gaze_term_when_it_disagrees_with_auc(tiny_prepared, tmp_path, monkeypatch):
    """Scripted validation: AUC peaks in epoch 2, AUC minus 1 x outside mass in epoch 3.
    Selection by AUC keeps epoch 2, gaze-aware selection epoch 3 (and best.pt holds it)."""
    import cxrgaze.train.loop as train_module

    aucs, masses = iter([0.80, 0.95, 0.90]), iter([0.90, 0.90, 0.50])

    def scripted(model, data, device, config):
        auc, mass = next(aucs), next(masses)
        return {"val_auc_macro": auc, "val_outside_mass": mass,
                "val_selection": selection_score(auc, mass, config.train.selection_gaze_weight)}

    prepared, split = tiny_prepared
    for weight, expected in ((0.0, 1), (1.0, 2)):
        aucs, masses = iter([0.80, 0.95, 0.90]), iter([0.90, 0.90, 0.50])
        monkeypatch.setattr(train_module, "validation_record", scripted)
        cfg = RunConfig(model=TINY, loss=LossConfig(), train=TrainConfig(
            variant="baseline", epochs=3, batch_size=16, device="cpu", selection_gaze_weight=weight))
        result = train(cfg, prepared, split, tmp_path / str(weight), progress=False)
        assert result.best_epoch == expected, weight
        assert load_checkpoint(tmp_path / str(weight) / "best.pt")["epoch"] == expected


def test_validation_outside_mass_explains_the_true_class_with_the_variants_generator(tiny_prepared):
    """``validation_record``'s mass is ``outside_mass`` of ``generator_maps`` (eval mode,
    true labels, the variant's rule; guided backprop for baseline)."""
    from cxrgaze.data.dataset import load_split
    from cxrgaze.explain import generator_maps
    from cxrgaze.train import validation_record

    prepared, split = tiny_prepared
    data = load_split(prepared, split, "val")
    for variant, rule in (("rrr-grad", "grad"), ("baseline", "gbp")):
        torch.manual_seed(0)
        model = build_model(TINY, variant=variant)
        config = RunConfig(model=TINY, train=TrainConfig(variant=variant, device="cpu", selection_gaze_weight=0.5))
        record = validation_record(model, data, torch.device("cpu"), config)
        images, gaze = data.images.float(), data.gaze.float()  # stored as float16
        expected = outside_mass(generator_maps(model.eval(), images, data.labels, rule), gaze).mean().item()
        assert record["val_outside_mass"] == pytest.approx(expected, rel=1e-5)
        assert record["val_selection"] == pytest.approx(record["val_auc_macro"] - 0.5 * expected)


def test_evaluation_reports_the_selection_score_of_the_kept_checkpoint(tiny_prepared, tmp_path):
    """``evaluate`` recomputes ``val_outside_mass`` and ``val_selection`` of the kept
    checkpoint (what ``register.metric: val_selection`` promotes by), equal to training's."""
    from cxrgaze.config import EvalConfig
    from cxrgaze.evaluate import evaluate

    prepared, split = tiny_prepared
    cfg = RunConfig(model=TINY, loss=LossConfig(), train=TrainConfig(
        variant="rrr-grad", epochs=2, batch_size=16, device="cpu", selection_gaze_weight=0.5))
    result = train(cfg, prepared, split, tmp_path / "train", progress=False)
    metrics = evaluate(tmp_path / "train" / "best.pt", prepared, split, tmp_path / "eval",
                       EvalConfig(n_resamples=100, sanity_images=2, device="cpu"), progress=False).metrics
    assert metrics["val_auc_macro"] == pytest.approx(result.best["val_auc_macro"], abs=1e-6)
    assert metrics["val_outside_mass"] == pytest.approx(result.best["val_outside_mass"], rel=1e-5)
    assert metrics["val_selection"] == pytest.approx(result.best["val_selection"], rel=1e-5)
    assert metrics["val_selection"] == pytest.approx(metrics["val_auc_macro"] - 0.5 * metrics["val_outside_mass"])
