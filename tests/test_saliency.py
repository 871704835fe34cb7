"""Heatmap-vs-gaze metrics against values worked out by hand on tiny maps."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cxrgaze.evaluation.saliency import (
    auc_judd,
    average_by_map,
    box_mass,
    cc,
    kl,
    mean_scores,
    nss,
    saliency_scores,
    sim,
    sim_benchmark,
)

RNG = np.random.default_rng(0)
G = RNG.random((6, 5))  # a generic non-negative gaze map
S = RNG.random((6, 5))
FIX = np.array([[0, 0], [3, 2], [4, 5], [1.4, 3.6]])  # x, y


def test_cc_by_hand():
    s = np.array([[1.0, 2.0], [3.0, 4.0]])
    # centred s = (-1.5, -0.5, 0.5, 1.5); centred g = (-0.25, -0.25, -0.25, 0.75)
    # sum of products 1.5; sums of squares 5 and 0.75 -> 1.5 / sqrt(3.75) = sqrt(0.6)
    assert cc(s, np.array([[0.0, 0.0], [0.0, 1.0]])) == pytest.approx(math.sqrt(0.6))
    # centred g = (0.5, -0.5, -0.5, 0.5): products -0.75 + 0.25 - 0.25 + 0.75 = 0
    assert cc(s, np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.0, abs=1e-12)


def test_kl_and_sim_by_hand():
    s = np.ones((2, 2))  # p = 0.25 everywhere
    g = np.array([[1.0, 0.0], [0.0, 1.0]])  # q = (0.5, 0, 0, 0.5)
    # KL = 2 * 0.5 * log(0.5 / 0.25) = log 2; the q = 0 terms vanish
    assert kl(s, g) == pytest.approx(math.log(2))
    # SIM = min(0.25, 0.5) + 0 + 0 + min(0.25, 0.5) = 0.5
    assert sim(s, g) == pytest.approx(0.5)


def test_sim_benchmark_by_hand():
    s = np.array([[1.0, 2.0], [3.0, 4.0]])
    g = np.array([[0.0, 0.0], [0.0, 1.0]])  # q = (0, 0, 0, 1)
    # benchmark: min-max (0, 1/3, 2/3, 1), sum 2 -> (0, 1/6, 1/3, 1/2); min with q -> 1/2
    assert sim_benchmark(s, g) == pytest.approx(0.5)
    # paper: s / 10 = (0.1, 0.2, 0.3, 0.4); min with q -> 0.4
    assert sim(s, g) == pytest.approx(0.4)
    s9 = np.arange(1.0, 10.0).reshape(3, 3)  # 1..9
    g9 = np.zeros((3, 3))
    g9[2, 2] = 3.0  # all the gaze on the pixel where s = 9
    # benchmark: (k - 1) / 8 / (36 / 8) = (k - 1) / 36, at k = 9: 8/36; paper: 9/45
    assert sim_benchmark(s9, g9) == pytest.approx(2 / 9)
    assert sim(s9, g9) == pytest.approx(1 / 5)
    # the benchmark's version ignores an offset, the paper's does not
    assert sim_benchmark(s9 + 5.0, g9) == pytest.approx(2 / 9)
    assert sim(s9 + 5.0, g9) == pytest.approx(14 / 90)  # 14 / (45 + 45)
    # any real values: rescaled first
    assert sim_benchmark(s9 - 100.0, g9) == pytest.approx(2 / 9)
    assert sim_benchmark(G, G) == pytest.approx(1.0)


def test_constant_map_scores():
    """What each metric gives a constant map, and why (see the module docstring)."""
    g = np.zeros((3, 3))
    g[1, 1] = 2.0  # q: all the mass on the centre pixel
    centre = [[1, 1]]
    for c in (0.7, 3.0):
        s = np.full((3, 3), c)
        assert math.isnan(cc(s, g))  # no variance
        # p = 1/9 everywhere: KL = 1 * log(eps + 1 / (1/9 + eps)) = log 9
        assert kl(s, g) == pytest.approx(math.log(9))
        assert sim(s, g) == pytest.approx(1 / 9)  # min(1/9, 1) on the centre, 0 elsewhere
        assert math.isnan(sim_benchmark(s, g))  # min-max: 0 / 0
        assert math.isnan(nss(s, centre))  # std 0
        assert auc_judd(s, centre) == pytest.approx(0.5)  # TP = FP = 1 at the one threshold
        assert box_mass(s, [[0, 2, 0, 0]]) == pytest.approx(3 / 9)  # the top row's share of pixels
    zero = np.zeros((3, 3))
    assert sim_benchmark(zero, g) == 0.0  # the benchmark leaves an all-zero map as it is
    assert math.isnan(sim(zero, g))
    # a constant gaze map: the benchmark's SIM is NaN, the paper's the uniform overlap
    assert math.isnan(sim_benchmark(S, np.ones_like(S)))
    assert sim(np.ones((2, 2)), np.ones((2, 2))) == pytest.approx(1.0)
    scores = saliency_scores(np.full((3, 3), 0.7), g, centre)
    assert math.isnan(scores["cc"]) and math.isnan(scores["sim_benchmark"]) and math.isnan(scores["nss"])
    assert scores["sim"] == pytest.approx(1 / 9) and scores["auc_judd"] == pytest.approx(0.5)


def test_kl_of_an_all_zero_map_is_large_but_finite():
    # p = 0: log(eps + 0.5 / eps) ~ log(2^51) per unit of q
    value = kl(np.zeros((2, 2)), np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert value == pytest.approx(math.log(0.5 / np.finfo(float).eps), rel=1e-6)


def test_nss_by_hand():
    s = np.array([[0.0, 0.0], [0.0, 4.0]])
    # mean 1; deviations (-1, -1, -1, 3), squares 12, sample std sqrt(12 / 3) = 2
    # z = (-0.5, -0.5, -0.5, 1.5)
    assert nss(s, [[1, 1]]) == pytest.approx(1.5)
    assert nss(s, [[1, 1], [0, 0]]) == pytest.approx(0.5)
    # (1.2, 0.9) rounds to the pixel (1, 1) already fixated: counted once
    assert nss(s, [[1, 1], [1.2, 0.9]]) == pytest.approx(1.5)
    # outside the image: clipped to the nearest border pixel
    assert nss(s, [[5, 7]]) == pytest.approx(1.5)
    assert nss(s, [[-3, 0.2]]) == pytest.approx(-0.5)
    # x = column, y = row: (x=1, y=0) is the top-right pixel
    assert nss(s, [[1, 0]]) == pytest.approx(-0.5)


def test_auc_judd_by_hand():
    s = np.arange(1.0, 10.0).reshape(3, 3)  # [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    fix = [[2, 2], [1, 1]]  # values 9 and 5; 9 pixels, 2 fixated, 7 others
    # t = 9: TP 1/2, FP 0/7; t = 5: TP 2/2, FP 3/7 (6, 7, 8)
    # curve (0, 0), (0, 1/2), (3/7, 1), (1, 1): 3/7 * 3/4 + 4/7 * 1 = 25/28
    assert auc_judd(s, fix) == pytest.approx(25 / 28)


def test_auc_judd_ties_use_the_at_or_above_rule():
    s = np.array([[1.0, 1.0], [0.0, 0.0]])
    # both fixated pixels share the threshold 1: TP 2/2, FP 0/2 -> curve (0,0), (0,1), (1,1)
    # (the benchmark's rank-based TP rate without jitter would give 0.75)
    assert auc_judd(s, [[0, 0], [1, 0]]) == pytest.approx(1.0)


def test_auc_judd_peak_at_fixations_and_uniform_map():
    peak = np.zeros((5, 5))
    peak[1, 3] = peak[4, 0] = 2.0
    assert auc_judd(peak, [[3, 1], [0, 4]]) == pytest.approx(1.0)
    # a constant map: one threshold with TP = FP = 1 -> the diagonal
    assert auc_judd(np.full((5, 5), 0.3), [[3, 1], [0, 4]]) == pytest.approx(0.5)
    assert math.isnan(nss(np.full((5, 5), 0.3), [[3, 1]]))


def test_identities():
    assert cc(G, G) == pytest.approx(1.0)
    assert kl(G, G) == pytest.approx(0.0, abs=1e-12)
    assert sim(G, G) == pytest.approx(1.0)
    assert sim_benchmark(G, G) == pytest.approx(1.0)


def test_scale_invariance():
    boxes = np.array([[0.5, 2.5, 1, 3]])
    base = saliency_scores(S, G, FIX, boxes)
    for factor in (1e-3, 7.0):
        scaled = saliency_scores(S * factor, G * factor, FIX, boxes)
        assert scaled.keys() == base.keys()
        for key in base:
            assert scaled[key] == pytest.approx(base[key], rel=1e-9, abs=1e-12), key


def test_undefined_cases_are_nan():
    assert math.isnan(cc(np.ones((3, 3)), G[:3, :3]))
    assert math.isnan(cc(G[:3, :3], np.ones((3, 3))))
    assert math.isnan(sim(np.zeros((3, 3)), G[:3, :3]))
    assert math.isnan(nss(S, np.empty((0, 2))))
    assert math.isnan(auc_judd(S, np.empty((0, 2))))
    assert math.isnan(auc_judd(np.eye(2), [[0, 0], [0, 1], [1, 0], [1, 1]]))  # no negatives
    assert math.isnan(box_mass(np.zeros((3, 3)), [[0, 1, 0, 1]]))
    assert math.isnan(box_mass(S, np.empty((0, 4))))


def test_box_mass_by_hand():
    s = np.ones((3, 3))
    assert box_mass(s, [[0, 1, 0, 0]]) == pytest.approx(2 / 9)
    # two 2 x 2 boxes overlapping at pixel (1, 1): the union has 7 pixels, not 8
    assert box_mass(s, [[0, 1, 0, 1], [1, 2, 1, 2]]) == pytest.approx(7 / 9)
    # pixel centres: x in [0.4, 1.6] holds the column 1 only; corners in any order
    assert box_mass(s, [[1.6, 0.4, 2, 0]]) == pytest.approx(3 / 9)
    weighted = np.zeros((4, 4))
    weighted[1:3, 2] = [1.0, 3.0]
    assert box_mass(weighted, [[2, 2, 1, 2]]) == pytest.approx(1.0)
    assert box_mass(weighted, [[2, 3, 2, 3]]) == pytest.approx(0.75)


def test_saliency_scores_keys():
    assert list(saliency_scores(S, G, FIX)) == ["cc", "kl", "sim", "sim_benchmark", "nss", "auc_judd"]
    assert "box_mass" in saliency_scores(S, G, FIX, boxes=[[0, 1, 0, 1]])


def test_mean_scores_skips_nan_and_counts():
    out = mean_scores([
        {"cc": 1.0, "kl": math.nan},
        {"cc": 0.0, "kl": 2.0, "box_mass": 0.5},
        {"cc": 0.5, "kl": 4.0},
    ])
    assert out["cc"] == pytest.approx(0.5)
    assert out["kl"] == pytest.approx(3.0)
    assert out["box_mass"] == pytest.approx(0.5)
    assert out["n"] == 3
    empty = mean_scores([{"nss": math.nan}])
    assert math.isnan(empty["nss"]) and empty["n"] == 1


def test_average_by_map_counts_nan():
    table = pd.DataFrame({
        "dicom_id": ["a", "b", "c", "a", "b", "c"],
        "map": ["gen", "gen", "gen", "cam", "cam", "cam"],
        "cc": [0.2, math.nan, 0.4, 1.0, 0.0, 0.5],
        "nss": [math.nan, math.nan, math.nan, 1.0, 2.0, math.inf],
    })
    out = average_by_map(table, prefix="test_sal_")
    assert list(out)[:6] == ["test_sal_gen_cc", "test_sal_gen_cc_n", "test_sal_gen_cc_nan",
                             "test_sal_gen_nss", "test_sal_gen_nss_n", "test_sal_gen_nss_nan"]
    assert out["test_sal_gen_cc"] == pytest.approx(0.3)
    assert (out["test_sal_gen_cc_n"], out["test_sal_gen_cc_nan"]) == (2.0, 1.0)
    assert math.isnan(out["test_sal_gen_nss"])  # nothing finite: NaN, with the count saying why
    assert (out["test_sal_gen_nss_n"], out["test_sal_gen_nss_nan"]) == (0.0, 3.0)
    assert out["test_sal_cam_cc"] == pytest.approx(0.5)
    assert (out["test_sal_cam_cc_n"], out["test_sal_cam_cc_nan"]) == (3.0, 0.0)
    assert out["test_sal_cam_nss"] == pytest.approx(1.5)  # inf counted as not finite
    assert (out["test_sal_cam_nss_n"], out["test_sal_cam_nss_nan"]) == (2.0, 1.0)
    assert len(out) == 2 * 2 * 3
    assert "gen_cc" in average_by_map(table)  # no prefix


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shapes differ"):
        cc(np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="negative"):
        kl(-np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        nss(np.ones(4), [[0, 0]])
