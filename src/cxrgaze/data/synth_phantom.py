"""Chest-radiograph phantoms for the synthetic dataset (see :mod:`cxrgaze.data.synth`).

A phantom is drawn in display space (0 dark = air, 1 bright = bone / burned-in text) as a
PA view in the radiological convention: the patient's right lung is on the image's left.
The anatomy is a handful of smooth analytic shapes (body, lungs cut by the diaphragm
domes, heart, mediastinum and spine, posterior ribs, clavicles, hila, lung texture),
varied per image, plus the class signal:

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

WORK_SIDE = 512
"""Longest side (pixels) at which the smooth anatomy is drawn before upsampling."""

Box = tuple[int, int, int, int]
"""``(x1, x2, y1, y2)`` in pixels of the full-size image, as in ``bounding_boxes.csv``."""


@dataclass(frozen=True)
class Anatomy:
    """One patient's anatomy and findings, in fractions of the image width (u) and height (v)."""

    cx: float  # midline
    thorax: float  # half-width of the thorax at the costophrenic angles
    apex: float  # lung apex level
    dome_right: float  # costophrenic level of the right lung (image left)
    dome_left: float  # costophrenic level of the left lung (image right)
    dome_height: float  # how far the diaphragm domes rise above the costophrenic angles
    mediastinum: float  # half-width of the upper mediastinum
    ctr: float  # cardiothoracic ratio
    heart_cy: float
    heart_ry: float
    lung_dark: float  # how much lighter than soft tissue the lungs are
    rib_spacing: float
    rib_phase: float
    rib_curve: float
    gas_bubble: bool
    haze: float  # CHF basal haze amplitude; 0 when absent
    opacity: tuple[int, float, float, float, float] | None  # (side, u, v, radius, amplitude)
    gamma: float
    noise: float


def sample_anatomy(rng: np.random.Generator, label: str) -> Anatomy:
    """Draw an anatomy for one image of class ``label`` (``Normal``, ``CHF``, ``pneumonia``)."""
    thorax = rng.uniform(0.36, 0.41)
    mediastinum = rng.uniform(0.05, 0.075)
    dome = rng.uniform(0.72, 0.79)
    apex = rng.uniform(0.10, 0.15)
    ctr = rng.uniform(0.50, 0.60) if label == "CHF" else rng.uniform(0.38, 0.49)
    opacity = None
    if label == "pneumonia":
        side = int(rng.choice((-1, 1)))
        u = 0.5 + side * (mediastinum + rng.uniform(0.45, 0.75) * (thorax - mediastinum))
        v = rng.uniform(apex + 0.35 * (dome - apex), dome - 0.10)
        opacity = (side, float(u), float(v), float(rng.uniform(0.055, 0.085)), float(rng.uniform(0.16, 0.23)))
    return Anatomy(
        cx=0.5 + rng.normal(0, 0.012),
        thorax=thorax,
        apex=apex,
        dome_right=dome - rng.uniform(0.0, 0.03),
        dome_left=dome,
        dome_height=rng.uniform(0.07, 0.10),
        mediastinum=mediastinum,
        ctr=ctr,
        heart_cy=dome - rng.uniform(0.10, 0.13),
        heart_ry=rng.uniform(0.12, 0.15),
        lung_dark=rng.uniform(0.26, 0.34),
        rib_spacing=rng.uniform(0.058, 0.07),
        rib_phase=rng.uniform(0, 1),
        rib_curve=rng.uniform(2.2, 3.6),
        gas_bubble=bool(rng.random() < 0.6),
        haze=float(rng.uniform(0.07, 0.11)) if label == "CHF" else 0.0,
        opacity=opacity,
        gamma=rng.uniform(0.85, 1.2),
        noise=rng.uniform(0.012, 0.025),
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian-filtered noise."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect", truncate=3.0)
    return field / (field.std() + 1e-12)


def lung_masks(a: Anatomy, u: np.ndarray, v: np.ndarray, edge: float) -> tuple[np.ndarray, np.ndarray]:
    """Soft masks of the right lung (image left) and left lung (image right)."""
    masks = []
    for side, dome in ((-1, a.dome_right), (1, a.dome_left)):
        rise = np.clip((v - a.apex) / 0.24, 0.0, 1.0)
        widen = 0.93 + 0.07 * np.clip((v - a.apex) / (dome - a.apex), 0.0, 1.0)
        lateral = a.mediastinum + (a.thorax - a.mediastinum) * np.sqrt(rise) * widen  # rounded apex
        d = side * (u - a.cx)  # distance from the midline toward this lung's lateral side
        centre, half = (a.mediastinum + a.thorax) / 2, (a.thorax - a.mediastinum) / 2
        t = np.clip((d - centre) / half, -1.0, 1.0)
        diaphragm = dome - a.dome_height * np.clip(1.0 - ((t + 0.25) / 1.25) ** 2, 0.0, 1.0)
        mask = (
            _sigmoid((v - a.apex) / edge)
            * _sigmoid((diaphragm - v) / edge)
            * _sigmoid((lateral - d) / edge)
            * _sigmoid((d - a.mediastinum) / edge)
        )
        masks.append(mask)
    return masks[0], masks[1]


def heart_mask(a: Anatomy, u: np.ndarray, v: np.ndarray, edge: float) -> np.ndarray:
    """Soft mask of the cardiac silhouette: an ellipse reaching further to the patient's left."""
    rx = a.ctr * a.thorax
    hcx = a.cx + 0.22 * rx
    r = np.sqrt(((u - hcx) / rx) ** 2 + ((v - a.heart_cy) / a.heart_ry) ** 2)
    return _sigmoid((1.0 - r) * min(rx, a.heart_ry) / edge)


def heart_box(a: Anatomy) -> tuple[float, float, float, float]:
    """Cardiac silhouette extent ``(u1, u2, v1, v2)``; its lower edge stops at the diaphragm."""
    rx = a.ctr * a.thorax
    hcx = a.cx + 0.22 * rx
    return hcx - rx, hcx + rx, a.heart_cy - a.heart_ry, min(a.heart_cy + a.heart_ry, a.dome_left)


@dataclass
class Phantom:
    """A rendered image with what the gaze model and the box table need."""

    image: np.ndarray  # (H, W) float64 display values in [0, 1]
    boxes: dict[str, Box]  # anatomy and finding boxes, full-size pixels
    lungs: np.ndarray  # (h, w) bool lung field at working resolution
    scale: tuple[float, float]  # full-size pixels per working pixel, (y, x)


def render(a: Anatomy, height: int, width: int, rng: np.random.Generator) -> Phantom:
    """Draw ``a`` as a ``height`` x ``width`` image in display space, with its boxes."""
    k = min(1.0, WORK_SIDE / max(height, width))
    h, w = max(8, round(height * k)), max(8, round(width * k))
    v = ((np.arange(h) + 0.5) / h)[:, None]  # (h, 1): terms of one coordinate stay 1-D
    u = ((np.arange(w) + 0.5) / w)[None, :]  # (1, w)
    edge = 1.2 / h  # about one working pixel of soft edge
    right, left = lung_masks(a, u, v, edge)
    lungs = right + left
    heart = heart_mask(a, u, v, edge)
    d = np.abs(u - a.cx)

    body_half = 0.10 + (a.thorax + 0.075 - 0.10) * _sigmoid((v - 0.07) / 0.03) + 0.02 * v
    body = _sigmoid((body_half - d) / (2 * edge))
    knob = np.exp(-(((u - a.cx - a.mediastinum - 0.005) / 0.03) ** 2 + ((v - a.apex - 0.16) / 0.035) ** 2))
    shadow = np.maximum(heart, knob)  # what hides the lung behind it
    img = 0.04 + body * (0.50 + 0.14 * v)
    img += body * 0.10 * _sigmoid((a.mediastinum + 0.01 - d) / 0.01)  # mediastinum
    spine = _sigmoid((0.03 - d) / 0.004) * (0.07 + 0.02 * np.cos(2 * np.pi * v / 0.042))
    img += spine * _sigmoid((v - 0.02) / 0.01)
    img -= a.lung_dark * lungs * (1.0 - 0.85 * shadow)

    # posterior ribs arc out from the spine and dip laterally; anterior ribs run the other way
    frac = (v - (-0.08 * d + a.rib_curve * d * d * d)) / a.rib_spacing + a.rib_phase
    frac -= np.floor(frac)
    posterior = np.exp(-(((frac - 0.5) / 0.16) ** 2) ** 2)
    frac = (v + 0.28 * d) / (1.2 * a.rib_spacing) + a.rib_phase
    frac -= np.floor(frac)
    anterior = np.exp(-(((frac - 0.5) / 0.14) ** 2) ** 2) * _sigmoid((d - 0.12) / 0.03)
    dome = max(a.dome_right, a.dome_left)
    in_thorax = _sigmoid((a.thorax + 0.015 - d) / 0.01) * _sigmoid((v - a.apex + 0.06) / 0.01)
    in_thorax *= _sigmoid((dome - 0.02 - v) / 0.02) * _sigmoid((d - 0.035) / 0.01)
    img += (0.06 * posterior + 0.03 * anterior) * in_thorax * (0.5 + 0.5 * lungs) * (1.0 - 0.6 * heart)

    # clavicles: bars from the manubrium up and out to the shoulders
    for side in (-1, 1):
        du = side * (u - a.cx)
        centre = a.apex + 0.035 - 0.12 * (du - 0.05)
        bar = _sigmoid((0.012 - np.abs(v - centre)) / 0.004) * _sigmoid((du - 0.04) / 0.01)
        img += 0.10 * bar * _sigmoid((a.thorax + 0.03 - du) / 0.02)

    # hila and lung markings, denser toward the hila
    markings = np.zeros((h, w))
    for side in (-1, 1):
        hx, hy = a.cx + side * (a.mediastinum + 0.03), a.apex + 0.30
        markings += np.exp(-np.sqrt(((u - hx) / 1.2) ** 2 + (v - hy) ** 2) / 0.10)
        img += 0.06 * np.exp(-(((u - hx) / 0.03) ** 2 + ((v - hy) / 0.06) ** 2)) * lungs
    texture = _smooth_noise(rng, (h, w), sigma=0.008 * h)
    img += (0.012 + 0.03 * markings) * (0.6 + texture) * lungs * (1.0 - heart)

    if a.gas_bubble:  # gastric air under the left hemidiaphragm
        gx, gy = a.cx + 0.6 * a.thorax, a.dome_left + 0.04
        img -= 0.12 * _sigmoid((1.0 - np.sqrt(((u - gx) / 0.07) ** 2 + ((v - gy) / 0.035) ** 2)) / 0.1) * body

    boxes = _anatomy_boxes(a, right > 0.5, left > 0.5, height, width)
    if a.haze > 0:  # CHF: haze rising toward both bases, fainter around the hila
        base = _sigmoid((v - (dome - 0.20)) / 0.035)
        hilar = np.exp(-((d - a.mediastinum - 0.06) / 0.08) ** 2 - ((v - a.apex - 0.3) / 0.12) ** 2)
        haze = a.haze * (base + 0.35 * hilar) * (1.0 + 0.3 * _smooth_noise(rng, (h, w), 0.02 * h))
        img += np.clip(haze, 0, None) * lungs
        boxes["finding: cardiomegaly"] = boxes["cardiac silhouette"]
        for name, mask in (("right", right), ("left", left)):
            x1, x2, _, y2 = boxes[f"{name} lung"]
            y1 = round((dome - 0.20) * height)
            boxes[f"finding: {name} basal haze"] = (x1, x2, y1, y2)
    if a.opacity is not None:  # pneumonia: a patchy opacity in one lung
        side, ou, ov, radius, amp = a.opacity
        r_px = radius * w
        ys = slice(max(0, int(ov * h - 2.5 * r_px)), min(h, int(ov * h + 2.5 * r_px) + 1))
        xs = slice(max(0, int(ou * w - 2.5 * r_px)), min(w, int(ou * w + 2.5 * r_px) + 1))
        r2 = (((u[:, xs] - ou) * w) ** 2 + ((v[ys] - ov) * h) ** 2) / r_px**2
        shape = (ys.stop - ys.start, xs.stop - xs.start)
        patch = np.exp(-1.1 * r2) * np.clip(0.7 + 0.45 * _smooth_noise(rng, shape, r_px / 3.5), 0.1, 1.4)
        patch *= (right if side < 0 else left)[ys, xs]
        img[ys, xs] += amp * patch
        py, px = np.nonzero(patch > 0.25 * patch.max())
        boxes["finding: opacity"] = _box_from_pixels(px + xs.start, py + ys.start, width / w, height / h, width, height)

    img = np.clip(img, 0.0, 1.0) ** a.gamma
    img = 0.03 + 0.87 * img  # leave headroom: the burned-in marker is the brightest thing
    if (h, w) != (height, width):
        img = ndimage.zoom(img, (height / h, width / w), order=1, mode="nearest", grid_mode=True)
        img = img[:height, :width]
    noise = ndimage.gaussian_filter(rng.standard_normal((height, width)), 0.6)
    img += a.noise * noise / (noise.std() + 1e-12)
    return Phantom(np.clip(img, 0.0, 1.0), boxes, lungs > 0.5, (height / h, width / w))


def _box_from_pixels(xs: np.ndarray, ys: np.ndarray, sx: float, sy: float, width: int, height: int) -> Box:
    """Bounding box of working-resolution pixels, in full-size pixels."""
    x1, x2 = int(np.floor(xs.min() * sx)), int(np.ceil((xs.max() + 1) * sx))
    y1, y2 = int(np.floor(ys.min() * sy)), int(np.ceil((ys.max() + 1) * sy))
    return max(0, x1), min(width, x2), max(0, y1), min(height, y2)


def _anatomy_boxes(a: Anatomy, right: np.ndarray, left: np.ndarray, height: int, width: int) -> dict[str, Box]:
    """The real release's anatomy boxes: lungs, costophrenic angles, cardiac silhouette."""
    h, w = right.shape
    sx, sy = width / w, height / h
    boxes: dict[str, Box] = {}
    for name, mask, lateral_sign in (("right", right, -1), ("left", left, 1)):
        ys, xs = np.nonzero(mask)
        boxes[f"{name} lung"] = _box_from_pixels(xs, ys, sx, sy, width, height)
        # the costophrenic angle: the lowest, most lateral corner of the lung field
        score = ys / h + lateral_sign * 0.6 * xs / w
        i = int(np.argmax(score))
        cu, cv = (xs[i] + 0.5) / w, (ys[i] + 0.5) / h
        bw, bh = 0.09, 0.07
        u1 = cu - (0.6 * bw if lateral_sign > 0 else 0.4 * bw)
        boxes[f"{name} costophrenic angle"] = (
            max(0, round(u1 * width)), min(width, round((u1 + bw) * width)),
            max(0, round((cv - 0.8 * bh) * height)), min(height, round((cv + 0.2 * bh) * height)),
        )
    u1, u2, v1, v2 = heart_box(a)
    boxes["cardiac silhouette"] = (round(u1 * width), round(u2 * width), round(v1 * height), round(v2 * height))
    return boxes
