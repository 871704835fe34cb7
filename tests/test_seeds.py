"""A variant's summary over training seeds (`combine_seeds`): the classification numbers are
the seed ensemble's, the spread is over seeds, and the report reads the same scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxrgaze.config import EvalConfig
from cxrgaze.evaluate import combine_seeds
from cxrgaze.evaluation.scores import load_scores, save_scores, split_from_logits
from cxrgaze.metrics import auc_summary

CLASSES = ("Normal", "CHF", "pneumonia")


def write_seed(folder, seed, labels, signal):
    rng = np.random.default_rng(seed)
    splits = {}
    for split, y in labels.items():
        logits = signal * (2 * np.eye(3)[y] - 1) + rng.normal(size=(len(y), 3))
        splits[split] = split_from_logits(y, [f"{split}{i}" for i in range(len(y))], logits, "sigmoid")
    folder.mkdir(parents=True)
    save_scores(folder / "scores.npz", splits, [seed], "sigmoid", CLASSES)
    metrics = {"variant": "unet", **auc_summary(labels["test"], splits["test"].scores, "test_"),
               **auc_summary(labels["val"], splits["val"].scores, "val_"),
               "test_sal_generator_cc": 0.1 * (seed + 1), "sanity_generator_passed": float(seed != 2),
               "test_auc_macro_ci95_low": 0.0, "test_auc_macro_ci95_high": 1.0}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def test_combine_seeds_reports_the_ensemble_and_the_spread(tmp_path):
    rng = np.random.default_rng(0)
    labels = {"val": rng.integers(0, 3, 40), "test": rng.integers(0, 3, 80)}
    dirs = [tmp_path / "unet" / f"seed{s}" for s in range(3)]
    per_seed = [write_seed(d, s, labels, 0.4) for s, d in enumerate(dirs)]
    summary = combine_seeds("unet", dirs, tmp_path / "unet", EvalConfig(n_resamples=200))

    scores = load_scores(tmp_path / "unet")
    assert list(scores.seeds) == [0, 1, 2] and scores["test"].logits_per_seed.shape == (3, 80, 3)
    ensemble = scores["test"].scores
    np.testing.assert_allclose(ensemble, scores["test"].scores_per_seed.mean(axis=0))
    # The headline AUC and its CI belong to the ensemble's scores, not to averaged endpoints.
    assert summary["test_auc_macro"] == pytest.approx(auc_summary(labels["test"], ensemble)["auc_macro"])
    assert summary["test_auc_macro_ci95_low"] < summary["test_auc_macro"] < summary["test_auc_macro_ci95_high"]
    assert summary["test_auc_macro_ci95_low"] != 0.0 and summary["test_auc_macro_ci95_high"] != 1.0
    seed_aucs = [m["test_auc_macro"] for m in per_seed]
    assert summary["test_auc_macro_seed_mean"] == pytest.approx(np.mean(seed_aucs))
    assert summary["test_auc_macro_seed_sd"] == pytest.approx(np.std(seed_aucs, ddof=1))
    # Properties of each seed's model are averaged; the sanity flag becomes the share passed.
    assert summary["test_sal_generator_cc"] == pytest.approx(0.2)
    assert summary["sanity_generator_passed"] == pytest.approx(2 / 3)
    written = json.loads((tmp_path / "unet" / "metrics.json").read_text())
    assert written["n_seeds"] == 3 and written["seeds"] == [0, 1, 2] and written["scoring"] == "sigmoid"


def test_seeds_on_other_cases_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    a = tmp_path / "v" / "seed0"
    b = tmp_path / "v" / "seed1"
    write_seed(a, 0, {"val": rng.integers(0, 3, 10), "test": rng.integers(0, 3, 20)}, 0.4)
    write_seed(b, 1, {"val": rng.integers(0, 3, 10), "test": rng.integers(0, 3, 21)}, 0.4)
    with pytest.raises(ValueError, match="different test cases"):
        combine_seeds("v", [a, b], tmp_path / "v")
