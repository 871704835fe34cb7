"""``scores.npz``: the exact keys, a round trip, the scoring rules and the shape checks."""

from __future__ import annotations

import numpy as np
import pytest

from cxrgaze.evaluation.scores import (SplitScores, apply_scoring, load_scores, save_scores, split_from_logits)

CLASSES = ["Normal", "CHF", "pneumonia"]


def make_splits(n_seeds: int = 2, scoring: str = "sigmoid", seed: int = 0) -> dict[str, SplitScores]:
    rng = np.random.default_rng(seed)
    return {split: split_from_logits(rng.integers(0, 3, n), [f"{split}{i}" for i in range(n)],
                                     rng.normal(size=(n_seeds, n, 3)), scoring)
            for split, n in (("val", 7), ("test", 11))}


def test_exact_keys_dtypes_and_round_trip(tmp_path):
    splits = make_splits()
    path = save_scores(tmp_path / "scores.npz", splits, [3, 4], "sigmoid", CLASSES)
    with np.load(path, allow_pickle=False) as npz:  # plain arrays, no pickled objects
        keys = set(npz.files)
        assert npz["scoring"].shape == () and str(npz["scoring"]) == "sigmoid"
        assert npz["test_dicom_ids"].dtype.kind == "U" and npz["classes"].tolist() == CLASSES
        assert npz["test_scores_per_seed"].shape == (2, 11, 3) and npz["test_scores"].dtype == np.float64
        assert npz["val_labels"].dtype == np.int64 and npz["seeds"].tolist() == [3, 4]
    per_split = {"labels", "dicom_ids", "scores", "logits_per_seed", "scores_per_seed"}
    assert keys == {"seeds", "scoring", "classes"} | {f"{s}_{k}" for s in ("val", "test") for k in per_split}
    loaded = load_scores(tmp_path)  # a folder: its scores.npz
    assert loaded.scoring == "sigmoid" and loaded.classes == tuple(CLASSES) and loaded.seeds.tolist() == [3, 4]
    for split, data in splits.items():
        for name in per_split:
            np.testing.assert_array_equal(getattr(loaded[split], name), getattr(data, name))


def test_split_from_logits_applies_the_rule_and_averages_seeds():
    logits = np.array([[[0.0, 2.0, -1.0]], [[1.0, 0.0, 0.0]]])  # (S=2, N=1, K=3)
    sig = split_from_logits([1], ["a"], logits, "sigmoid")
    np.testing.assert_allclose(sig.scores_per_seed, 1 / (1 + np.exp(-logits)), atol=1e-15)
    np.testing.assert_allclose(sig.scores, (1 / (1 + np.exp(-logits))).mean(axis=0), atol=1e-15)
    soft = split_from_logits([1], ["a"], logits, "softmax")
    np.testing.assert_allclose(soft.scores_per_seed.sum(axis=-1), 1.0, atol=1e-15)
    np.testing.assert_allclose(soft.scores_per_seed[0, 0], np.exp([0, 2, -1]) / np.exp([0, 2, -1]).sum(), atol=1e-15)
    one = split_from_logits([1], ["a"], logits[0], "sigmoid")  # (N, K): one seed
    assert one.logits_per_seed.shape == (1, 1, 3)
    np.testing.assert_array_equal(one.scores, one.scores_per_seed[0])
    np.testing.assert_allclose(apply_scoring(np.array([-1000.0, 1000.0]), "sigmoid"), [0.0, 1.0])  # no overflow
    with pytest.raises(ValueError, match="scoring"):
        apply_scoring(logits, "probit")


def test_bad_files_are_rejected(tmp_path):
    splits = make_splits()
    with pytest.raises(ValueError, match="scoring"):
        save_scores(tmp_path / "a.npz", splits, [0, 1], "tanh", CLASSES)
    with pytest.raises(ValueError, match=r"val_logits_per_seed has shape \(2, 7, 3\), expected \(3, 7, 3\)"):
        save_scores(tmp_path / "a.npz", splits, [0, 1, 2], "sigmoid", CLASSES)
    with pytest.raises(ValueError, match="no val split"):
        save_scores(tmp_path / "a.npz", {"test": splits["test"]}, [0, 1], "sigmoid", CLASSES)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a scores file"):
        load_scores(tmp_path / "other.npz")
