"""Code tests for the gaze heatmaps: the reference method, its options and the target grid."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from cxrgaze.data.dicom import ResizeMap
from cxrgaze.data.gaze import inside_image, static_heatmap, static_heatmap_resized

SHAPE = (120, 90)  # (H, W)
X = np.array([20.0, 60.0, 61.0, 45.0])
Y = np.array([30.0, 80.0, 80.0, 100.0])


def test_equals_the_reference_formula_for_integer_fixations():
    counts = np.zeros(SHAPE)
    for x, y in zip(X.astype(int), Y.astype(int)):
        counts[y, x] += 1
    expected = gaussian_filter(counts, sigma=7)
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(static_heatmap(X, Y, SHAPE, sigma=7), expected, atol=1e-6)


def test_range_dtype_and_shape():
    heat = static_heatmap(X, Y, SHAPE, sigma=5)
    assert heat.dtype == np.float32 and heat.shape == SHAPE
    assert heat.min() == 0.0 and heat.max() == pytest.approx(1.0)


def test_peak_at_a_single_fixation():
    heat = static_heatmap([33], [71], SHAPE, sigma=4)
    assert np.unravel_index(heat.argmax(), SHAPE) == (71, 33)


def test_fixations_outside_the_image_are_dropped():
    inside = static_heatmap(X, Y, SHAPE, sigma=5)
    with_outside = static_heatmap(np.r_[X, -3, 95, 10], np.r_[Y, 10, 10, 120], SHAPE, sigma=5)
    np.testing.assert_array_equal(inside, with_outside)
    assert inside_image(np.array([-0.5, 89.4, 89.5]), np.array([0, 0, 0]), SHAPE).tolist() == [True, True, False]
    assert static_heatmap([-10, 200], [5, 5], SHAPE, sigma=5).max() == 0.0  # nothing inside: all zeros


def test_duration_weighting_changes_the_map():
    plain = static_heatmap([20, 70], [60, 60], SHAPE, sigma=6)
    weighted = static_heatmap([20, 70], [60, 60], SHAPE, sigma=6, weights=[0.1, 1.0])
    assert plain[60, 20] == pytest.approx(plain[60, 70], abs=1e-6)
    assert weighted[60, 70] == pytest.approx(1.0) and weighted[60, 20] < 0.2


def test_larger_sigma_spreads_the_map():
    assert static_heatmap([45], [60], SHAPE, sigma=20).mean() > static_heatmap([45], [60], SHAPE, sigma=5).mean()


@pytest.mark.parametrize("mode", ["stretch", "pad"])
@pytest.mark.parametrize("shape, sigma", [((400, 300), 64), ((300, 460), 24), ((256, 256), 6)])
def test_target_resolution_map_is_close_to_the_full_resolution_map(mode, shape, sigma):
    # target sigmas from 1.5 px (drawn on a finer grid) to 14 px (drawn on the target grid)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, shape[1] - 1, 25).round()
    y = rng.uniform(0, shape[0] - 1, 25).round()
    resize_map = ResizeMap.create(shape, 64, mode)
    full = full_resolution_then_resized(x, y, resize_map, sigma)
    ours = static_heatmap_resized(x, y, resize_map, sigma=sigma)
    assert ours.shape == (64, 64) and ours.dtype == np.float32
    assert np.abs(ours - full).max() < 0.002


def full_resolution_then_resized(x, y, resize_map, sigma):
    """The exact route: reference map at full size, resized like the image, min-max again."""
    resized = resize_map.resize(static_heatmap(x, y, resize_map.original_shape, sigma=sigma))  # (S, S)
    (h, w), top, left = resize_map.inner_shape, resize_map.offset_y, resize_map.offset_x
    inner = resized[top:top + h, left:left + w]
    resized[top:top + h, left:left + w] = (inner - inner.min()) / (inner.max() - inner.min())
    return resized


def test_pad_mode_map_is_zero_on_the_padding():
    resize_map = ResizeMap.create((400, 200), 40, "pad")
    heat = static_heatmap_resized([10, 190], [10, 390], resize_map, sigma=30)
    assert heat[:, :resize_map.offset_x].max() == 0 and heat[:, resize_map.offset_x + 20:].max() == 0
    assert heat.max() == pytest.approx(1.0)


def test_resized_map_peaks_at_the_mapped_fixation():
    resize_map = ResizeMap.create((1000, 800), 50, "stretch")
    heat = static_heatmap_resized([400], [300], resize_map, sigma=40)
    tx, ty = resize_map.map_points(np.array([400]), np.array([300]))
    assert np.unravel_index(heat.argmax(), heat.shape) == (round(ty[0]), round(tx[0]))
