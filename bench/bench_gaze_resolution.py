"""How far the target-resolution gaze heatmap is from the full-resolution reference.

Exact route: +1 per fixation on the full-size original, ``gaussian_filter(sigma)``, min-max,
then the same antialiased resize as the image (``ResizeMap.resize``) and min-max again over
the image region (the resize lowers the peak a little). Ours: ``static_heatmap_resized``
(fixations mapped to the target grid, sigma scaled per axis, a finer grid when that sigma
is under 8 px). Prints, per case, the max and mean absolute difference on the [0, 1] scale
and both times. Cases: real-size DICOMs at the reference sigma 150, and the demo profile's
~256 px synthetic images with sigma 14 at 64 px (target sigma 3.5 px).

Run: .venv/bin/python bench/bench_gaze_resolution.py   (about 1-2 minutes on 2 cores)
"""

from __future__ import annotations

import time

import numpy as np

from cxrgaze.data.dicom import ResizeMap
from cxrgaze.data.gaze import static_heatmap, static_heatmap_resized

CASES = (  # (original shape, target size, sigma in original pixels)
    ((3000, 2500), 224, 150.0),
    ((2544, 3056), 224, 150.0),
    ((256, 240), 64, 14.0),
)
SEEDS = (0, 1)


def fixations(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """About 60 fixations in clusters (like a reading of a chest film), a few off the image."""
    rng = np.random.default_rng(seed)
    height, width = shape
    centres = rng.uniform([0.15 * width, 0.1 * height], [0.85 * width, 0.9 * height], size=(6, 2))
    spread = 0.04 * max(shape)
    points = np.concatenate([c + rng.normal(0, spread, size=(10, 2)) for c in centres])  # (60, 2)
    points = np.concatenate([points, [[-40.0, 100.0], [width + 10.0, height / 2]]])  # two outside
    return np.round(points[:, 0]), np.round(points[:, 1])


def resized_reference(full: np.ndarray, resize_map: ResizeMap) -> np.ndarray:
    """The full-size map resized like the image, min-max again over the image region."""
    resized = resize_map.resize(full)  # (S, S)
    (h, w), top, left = resize_map.inner_shape, resize_map.offset_y, resize_map.offset_x
    inner = resized[top:top + h, left:left + w]
    resized[top:top + h, left:left + w] = (inner - inner.min()) / (inner.max() - inner.min())
    return resized


def main() -> None:
    rows = []
    for shape, size, sigma in CASES:
        for seed in SEEDS:
            x, y = fixations(shape, seed)
            t0 = time.perf_counter()
            full = static_heatmap(x, y, shape, sigma)  # (H, W)
            t_full = time.perf_counter() - t0
            for mode in ("stretch", "pad"):
                resize_map = ResizeMap.create(shape, size, mode)
                reference = resized_reference(full, resize_map)
                t0 = time.perf_counter()
                ours = static_heatmap_resized(x, y, resize_map, sigma)
                t_ours = time.perf_counter() - t0
                diff = np.abs(ours - reference)
                name = f"{shape[0]}x{shape[1]}"
                rows.append((name, size, sigma, seed, mode, diff.max(), diff.mean(), t_full, t_ours))
    print("gaze heatmap: target-resolution map vs full-resolution reference map resized")
    print(f"{'original':>10} {'S':>4} {'sigma':>6} {'seed':>4} {'mode':>8} {'max|d|':>8} {'mean|d|':>8} "
          f"{'full ms':>8} {'ours ms':>8}")
    for shape, size, sigma, seed, mode, dmax, dmean, t_full, t_ours in rows:
        print(f"{shape:>10} {size:>4} {sigma:>6g} {seed:>4} {mode:>8} {dmax:8.4f} {dmean:8.5f} "
              f"{1000 * t_full:8.0f} {1000 * t_ours:8.2f}")
    print(f"overall: max |d| {max(r[5] for r in rows):.4f}, mean |d| {np.mean([r[6] for r in rows]):.5f}")


if __name__ == "__main__":
    main()
