"""Gaze heatmaps from fixations, the reference way (Karargyris et al. 2021).

Reference method: each fixation adds +1 at its (``X_ORIGINAL``, ``Y_ORIGINAL``) pixel of an
image the size of the original DICOM, fixations outside the image are dropped, then
``scipy.ndimage.gaussian_filter(counts, sigma=150)`` (``mode="reflect"``, sigma in original
pixels) and a min-max scaling to [0, 1]. Options: weight by fixation duration (``FPOGD``)
instead of +1, and another sigma. The reference stored a viridis PNG and read back its grey
luma (targets spanning about 0.12-0.84); here maps are floats in [0, 1].

Coordinates are pixel indices (x = column, y = row) with the pixel-centre convention of
``ResizeMap``: a fixation is inside when its nearest pixel exists, i.e.
``-0.5 <= x < W - 0.5`` and ``-0.5 <= y < H - 0.5``. Fractional positions are splatted
bilinearly onto the four neighbouring pixels, which for integer positions is exactly the
reference's +1 at one pixel.

``static_heatmap_resized`` computes the map on the resized image region with the sigma
scaled per axis (``ResizeMap.map_sigma``), instead of filtering a full-size 3000 x 2500
image with a 1201-tap kernel and resizing; when the scaled sigma would be under
``MIN_GRID_SIGMA`` (8) pixels it draws on an integer multiple of that grid and resizes
like the image. Measured against the exact route
(full-size map, resized like the image, min-max again over the image region) by
``bench/bench_gaze_resolution.py``: at the reference settings (3000 x 2500 and 2544 x 3056
originals, sigma 150, 224 px, both resize modes, 60 clustered fixations) the max absolute
difference is 0.0003 (mean 0.00002) on the [0, 1] scale, below the float16 storage step
near 1 (0.0005), in 4-14 ms instead of 9-14 s per image (2-core CPU); at the demo
settings (256 x 240 originals, sigma 14, 64 px) 0.0009. See BENCHMARKS.md, "Data".
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from cxrgaze.data.dicom import ResizeMap


def inside_image(x: np.ndarray, y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask (N,) of the points whose nearest pixel lies in an image of ``shape`` (H, W)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    height, width = shape
    return np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)


def static_heatmap(
    x: np.ndarray,
    y: np.ndarray,
    shape: tuple[int, int],
    sigma: float | tuple[float, float] = 150.0,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """The reference static heatmap on a grid of ``shape`` (H, W): float32 (H, W) in [0, 1].

    ``x``, ``y`` (N,) are pixel coordinates on that grid; points outside are dropped.
    ``sigma`` is in grid pixels, a scalar or ``(sigma_y, sigma_x)``. ``weights`` (N,) replace
    the +1 per fixation (e.g. ``FPOGD`` durations). All zeros when no point is inside.
    """
    x, y, w = _inside(x, y, shape, weights)
    counts = _splat(x, y, w, shape)  # (H, W)
    return _min_max(gaussian_filter(counts, sigma=sigma, mode="reflect"))


def static_heatmap_resized(
    x: np.ndarray,
    y: np.ndarray,
    resize_map: ResizeMap,
    sigma: float = 150.0,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """The reference static heatmap of an original image, computed near the target grid.

    ``x``, ``y`` are ORIGINAL pixel coordinates and ``sigma`` is in ORIGINAL pixels. The
    map is drawn on the resized image region with the sigma scaled per axis (``stretch``
    scales the axes differently); when that sigma would be under ``MIN_GRID_SIGMA`` target
    pixels, on a finer grid then resized like the image. Returns float32 (S, S) in [0, 1],
    zero on the padding of ``pad`` mode. Differs from "full-size map, then resized" by
    at most 0.0003 at the reference settings (module doc).
    """
    x, y, w = _inside(x, y, resize_map.original_shape, weights)
    grid, scale = _work_grid(resize_map, sigma)
    counts = _splat((x + 0.5) * scale[1] - 0.5, (y + 0.5) * scale[0] - 0.5, w, grid)  # (gh, gw)
    heat = gaussian_filter(counts, sigma=(sigma * scale[0], sigma * scale[1]), mode="reflect")
    return _place(resize_map, _min_max(_to_inner(resize_map, heat)))


MIN_GRID_SIGMA = 8.0
"""Smallest Gaussian sigma, in pixels of the grid it is drawn on, before drawing on a finer
grid: below it the splat and sampling errors grow (0.013 at 4 px, 0.04 at 2 px)."""


def _work_grid(resize_map: ResizeMap, sigma: float) -> tuple[tuple[int, int], tuple[float, float]]:
    """The (gh, gw) grid to draw on and its (y, x) scale from original pixels.

    The resized image region itself, or an integer multiple of it (capped at the original
    size) so that the scaled sigma is at least ``MIN_GRID_SIGMA`` grid pixels.
    """
    (h, w), (height, width) = resize_map.inner_shape, resize_map.original_shape
    factor = max(1, math.ceil(MIN_GRID_SIGMA / max(min(resize_map.map_sigma(sigma)), 1e-9)))
    grid = (min(h * factor, max(height, h)), min(w * factor, max(width, w)))
    return grid, (grid[0] / height, grid[1] / width)


def _to_inner(resize_map: ResizeMap, heat: np.ndarray) -> np.ndarray:
    """A map on the work grid -> the (h, w) resized image region (antialiased, as the image)."""
    h, w = resize_map.inner_shape
    if heat.shape == (h, w):
        return heat
    image = Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32))
    return np.asarray(image.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def _inside(x, y, shape, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop points outside ``shape``; weights default to 1 and non-finite or negative ones to 0."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if not len(x) == len(y) == len(w):
        raise ValueError(f"x, y and weights must have one value per fixation, got {len(x)}, {len(y)}, {len(w)}")
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    keep = inside_image(x, y, shape)
    return x[keep], y[keep], w[keep]


def _splat(x: np.ndarray, y: np.ndarray, w: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear splat of weighted points onto an (H, W) float64 grid; mass is kept at the borders."""
    height, width = shape
    counts = np.zeros((height, width), np.float64)  # (H, W)
    if len(x) == 0:
        return counts
    x = np.clip(x, 0.0, width - 1.0)
    y = np.clip(y, 0.0, height - 1.0)
    x0 = np.floor(x).astype(np.int64)
    y0 = np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0
    x1 = np.minimum(x0 + 1, width - 1)
    y1 = np.minimum(y0 + 1, height - 1)
    np.add.at(counts, (y0, x0), w * (1 - fy) * (1 - fx))
    np.add.at(counts, (y0, x1), w * (1 - fy) * fx)
    np.add.at(counts, (y1, x0), w * fy * (1 - fx))
    np.add.at(counts, (y1, x1), w * fy * fx)
    return counts


def _min_max(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] as float32; all zeros when constant (no fixation)."""
    low, high = float(values.min()), float(values.max())
    if not high > low:
        return np.zeros(values.shape, np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def _place(resize_map: ResizeMap, inner: np.ndarray) -> np.ndarray:
    """Put an (h, w) map on the (S, S) grid at the map's offset (zeros on the padding)."""
    if inner.shape == (resize_map.size, resize_map.size):
        return inner
    out = np.zeros((resize_map.size, resize_map.size), np.float32)  # (S, S)
    h, w = resize_map.inner_shape
    out[resize_map.offset_y:resize_map.offset_y + h, resize_map.offset_x:resize_map.offset_x + w] = inner
    return out
