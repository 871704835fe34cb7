"""Chest-radiograph phantoms for the synthetic dataset (see :mod:`cxrgaze.data.synth`).

A phantom is drawn in display space (0 dark = air, 1 bright = bone / burned-in text) as a
PA view in the radiological convention: the patient's right lung is on the image's left.
The image is a handful of smooth analytic shapes (body, lungs cut by the diaphragm
domes, heart, mediastinum and spine, posterior ribs, clavicles, hila, lung texture) laid
out by an :class:`~cxrgaze.data.synth.anatomy.Anatomy`, plus the class signal:

- ``CHF``: a larger cardiothoracic ratio (0.50-0.60 against 0.38-0.50) and a haze that
  rises toward both lung bases (and, fainter, around the hila);
- ``pneumonia``: one patchy opacity in the mid or lower zone of one lung;
- ``Normal``: neither.

The smooth anatomy is drawn at most ``WORK_SIDE`` pixels a side and upsampled, so a
~2500x3000 benchmark image costs little more than the noise drawn at full size. All
arithmetic is float64, so quantising to 12 bits gives the same integers on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cxrgaze.data.synth.anatomy import Anatomy, Box, anatomy_boxes, box_from_pixels, heart_mask, lung_masks, sigmoid

WORK_SIDE = 512
"""Longest side (pixels) at which the smooth anatomy is drawn before upsampling."""


@dataclass
class Phantom:
    """A rendered image with what the gaze model and the box table need."""

    image: np.ndarray  # (H, W) float64 display values in [0, 1]
    boxes: dict[str, Box]  # anatomy and finding boxes, full-size pixels
    lungs: np.ndarray  # (h, w) bool lung field at working resolution
    scale: tuple[float, float]  # full-size pixels per working pixel, (y, x)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian-filtered noise."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect", truncate=3.0)
    return field / (field.std() + 1e-12)


@dataclass(frozen=True)
class _Grid:
    """The working-resolution grid of one image and the soft anatomy masks drawn on it."""

    h: int
    w: int
    v: np.ndarray  # (h, 1) row centres, fractions of the height
    u: np.ndarray  # (1, w) column centres, fractions of the width
    edge: float  # about one working pixel of soft edge
    d: np.ndarray  # (1, w) distance from the midline
    right: np.ndarray  # (h, w) right lung (image left)
    left: np.ndarray  # (h, w) left lung (image right)
    heart: np.ndarray  # (h, w)

    @property
    def lungs(self) -> np.ndarray:
        return self.right + self.left

    @classmethod
    def create(cls, a: Anatomy, height: int, width: int) -> _Grid:
        k = min(1.0, WORK_SIDE / max(height, width))
        h, w = max(8, round(height * k)), max(8, round(width * k))
        v = ((np.arange(h) + 0.5) / h)[:, None]  # (h, 1): terms of one coordinate stay 1-D
        u = ((np.arange(w) + 0.5) / w)[None, :]  # (1, w)
        edge = 1.2 / h
        right, left = lung_masks(a, u, v, edge)
        return cls(h, w, v, u, edge, np.abs(u - a.cx), right, left, heart_mask(a, u, v, edge))


def render(a: Anatomy, height: int, width: int, rng: np.random.Generator) -> Phantom:
    """Draw ``a`` as a ``height`` x ``width`` image in display space, with its boxes."""
    g = _Grid.create(a, height, width)
    lungs = g.lungs
    img, body = _soft_tissue(a, g, lungs)
    _add_ribs(img, a, g, lungs)
    _add_clavicles(img, a, g)
    _add_hila_and_markings(img, a, g, lungs, rng)
    if a.gas_bubble:  # gastric air under the left hemidiaphragm
        gx, gy = a.cx + 0.6 * a.thorax, a.dome_left + 0.04
        img -= 0.12 * sigmoid((1.0 - np.sqrt(((g.u - gx) / 0.07) ** 2 + ((g.v - gy) / 0.035) ** 2)) / 0.1) * body
    boxes = anatomy_boxes(a, g.right > 0.5, g.left > 0.5, height, width)
    if a.haze > 0:  # CHF: haze rising toward both bases, fainter around the hila
        _add_haze(img, a, g, lungs, rng)
        boxes["finding: cardiomegaly"] = boxes["cardiac silhouette"]
        for name in ("right", "left"):
            x1, x2, _, y2 = boxes[f"{name} lung"]
            y1 = round((max(a.dome_right, a.dome_left) - 0.20) * height)
            boxes[f"finding: {name} basal haze"] = (x1, x2, y1, y2)
    if a.opacity is not None:  # pneumonia: a patchy opacity in one lung
        boxes["finding: opacity"] = _add_opacity(img, a.opacity, g, rng, height, width)
    img = _to_display(img, a, g, height, width, rng)
    return Phantom(np.clip(img, 0.0, 1.0), boxes, lungs > 0.5, (height / g.h, width / g.w))


def _soft_tissue(a: Anatomy, g: _Grid, lungs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The body, mediastinum and spine with the lungs darkened (except behind the heart): (img, body)."""
    u, v, d = g.u, g.v, g.d
    body_half = 0.10 + (a.thorax + 0.075 - 0.10) * sigmoid((v - 0.07) / 0.03) + 0.02 * v
    body = sigmoid((body_half - d) / (2 * g.edge))
    knob = np.exp(-(((u - a.cx - a.mediastinum - 0.005) / 0.03) ** 2 + ((v - a.apex - 0.16) / 0.035) ** 2))
    shadow = np.maximum(g.heart, knob)  # what hides the lung behind it
    img = 0.04 + body * (0.50 + 0.14 * v)
    img += body * 0.10 * sigmoid((a.mediastinum + 0.01 - d) / 0.01)  # mediastinum
    spine = sigmoid((0.03 - d) / 0.004) * (0.07 + 0.02 * np.cos(2 * np.pi * v / 0.042))
    img += spine * sigmoid((v - 0.02) / 0.01)
    img -= a.lung_dark * lungs * (1.0 - 0.85 * shadow)
    return img, body


def _add_ribs(img: np.ndarray, a: Anatomy, g: _Grid, lungs: np.ndarray) -> None:
    """Posterior ribs arc out from the spine and dip laterally; anterior ribs run the other way."""
    v, d = g.v, g.d
    frac = (v - (-0.08 * d + a.rib_curve * d * d * d)) / a.rib_spacing + a.rib_phase
    frac -= np.floor(frac)
    posterior = np.exp(-(((frac - 0.5) / 0.16) ** 2) ** 2)
    frac = (v + 0.28 * d) / (1.2 * a.rib_spacing) + a.rib_phase
    frac -= np.floor(frac)
    anterior = np.exp(-(((frac - 0.5) / 0.14) ** 2) ** 2) * sigmoid((d - 0.12) / 0.03)
    dome = max(a.dome_right, a.dome_left)
    in_thorax = sigmoid((a.thorax + 0.015 - d) / 0.01) * sigmoid((v - a.apex + 0.06) / 0.01)
    in_thorax *= sigmoid((dome - 0.02 - v) / 0.02) * sigmoid((d - 0.035) / 0.01)
    img += (0.06 * posterior + 0.03 * anterior) * in_thorax * (0.5 + 0.5 * lungs) * (1.0 - 0.6 * g.heart)


def _add_clavicles(img: np.ndarray, a: Anatomy, g: _Grid) -> None:
    """Clavicles: bars from the manubrium up and out to the shoulders."""
    for side in (-1, 1):
        du = side * (g.u - a.cx)
        centre = a.apex + 0.035 - 0.12 * (du - 0.05)
        bar = sigmoid((0.012 - np.abs(g.v - centre)) / 0.004) * sigmoid((du - 0.04) / 0.01)
        img += 0.10 * bar * sigmoid((a.thorax + 0.03 - du) / 0.02)


def _add_hila_and_markings(img: np.ndarray, a: Anatomy, g: _Grid, lungs: np.ndarray, rng: np.random.Generator) -> None:
    """Hila and lung markings, denser toward the hila (draws the texture noise)."""
    u, v = g.u, g.v
    markings = np.zeros((g.h, g.w))
    for side in (-1, 1):
        hx, hy = a.cx + side * (a.mediastinum + 0.03), a.apex + 0.30
        markings += np.exp(-np.sqrt(((u - hx) / 1.2) ** 2 + (v - hy) ** 2) / 0.10)
        img += 0.06 * np.exp(-(((u - hx) / 0.03) ** 2 + ((v - hy) / 0.06) ** 2)) * lungs
    texture = _smooth_noise(rng, (g.h, g.w), sigma=0.008 * g.h)
    img += (0.012 + 0.03 * markings) * (0.6 + texture) * lungs * (1.0 - g.heart)


def _add_haze(img: np.ndarray, a: Anatomy, g: _Grid, lungs: np.ndarray, rng: np.random.Generator) -> None:
    """CHF: a haze rising toward both bases, fainter around the hila (draws its noise)."""
    v, d = g.v, g.d
    base = sigmoid((v - (max(a.dome_right, a.dome_left) - 0.20)) / 0.035)
    hilar = np.exp(-((d - a.mediastinum - 0.06) / 0.08) ** 2 - ((v - a.apex - 0.3) / 0.12) ** 2)
    haze = a.haze * (base + 0.35 * hilar) * (1.0 + 0.3 * _smooth_noise(rng, (g.h, g.w), 0.02 * g.h))
    img += np.clip(haze, 0, None) * lungs


def _add_opacity(img: np.ndarray, opacity: tuple[int, float, float, float, float], g: _Grid,
                 rng: np.random.Generator, height: int, width: int) -> Box:
    """Pneumonia: a patchy opacity in one lung (draws its noise); returns its box in full-size pixels."""
    side, ou, ov, radius, amp = opacity
    h, w = g.h, g.w
    r_px = radius * w
    ys = slice(max(0, int(ov * h - 2.5 * r_px)), min(h, int(ov * h + 2.5 * r_px) + 1))
    xs = slice(max(0, int(ou * w - 2.5 * r_px)), min(w, int(ou * w + 2.5 * r_px) + 1))
    r2 = (((g.u[:, xs] - ou) * w) ** 2 + ((g.v[ys] - ov) * h) ** 2) / r_px**2
    shape = (ys.stop - ys.start, xs.stop - xs.start)
    patch = np.exp(-1.1 * r2) * np.clip(0.7 + 0.45 * _smooth_noise(rng, shape, r_px / 3.5), 0.1, 1.4)
    patch *= (g.right if side < 0 else g.left)[ys, xs]
    img[ys, xs] += amp * patch
    py, px = np.nonzero(patch > 0.25 * patch.max())
    return box_from_pixels(px + xs.start, py + ys.start, width / w, height / h, width, height)


def _to_display(img: np.ndarray, a: Anatomy, g: _Grid, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Gamma, headroom for the marker, upsampling to full size and full-size noise (not yet clipped)."""
    img = np.clip(img, 0.0, 1.0) ** a.gamma
    img = 0.03 + 0.87 * img  # leave headroom: the burned-in marker is the brightest thing
    if (g.h, g.w) != (height, width):
        img = ndimage.zoom(img, (height / g.h, width / g.w), order=1, mode="nearest", grid_mode=True)
        img = img[:height, :width]
    noise = ndimage.gaussian_filter(rng.standard_normal((height, width)), 0.6)
    return img + a.noise * noise / (noise.std() + 1e-12)
