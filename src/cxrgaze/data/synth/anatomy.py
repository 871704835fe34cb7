"""The anatomy of a synthetic chest radiograph (see :mod:`cxrgaze.data.synth`): what to draw and where.

An :class:`Anatomy` is a handful of per-image numbers, in fractions of the image width
(u) and height (v), drawn by :func:`sample_anatomy` with the class signal (CHF: a larger
cardiothoracic ratio, 0.50-0.60 against 0.38-0.50, and a basal haze; pneumonia: one
opacity in the mid or lower zone of one lung). The soft masks of the lungs (cut by the
diaphragm domes) and of the heart, and the anatomy boxes of the real release (lungs,
costophrenic angles, cardiac silhouette), are derived from it here; :mod:`.phantom`
draws the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow warnings for large negative ``x``."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


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
            sigmoid((v - a.apex) / edge)
            * sigmoid((diaphragm - v) / edge)
            * sigmoid((lateral - d) / edge)
            * sigmoid((d - a.mediastinum) / edge)
        )
        masks.append(mask)
    return masks[0], masks[1]


def heart_mask(a: Anatomy, u: np.ndarray, v: np.ndarray, edge: float) -> np.ndarray:
    """Soft mask of the cardiac silhouette: an ellipse reaching further to the patient's left."""
    rx = a.ctr * a.thorax
    hcx = a.cx + 0.22 * rx
    r = np.sqrt(((u - hcx) / rx) ** 2 + ((v - a.heart_cy) / a.heart_ry) ** 2)
    return sigmoid((1.0 - r) * min(rx, a.heart_ry) / edge)


def heart_box(a: Anatomy) -> tuple[float, float, float, float]:
    """Cardiac silhouette extent ``(u1, u2, v1, v2)``; its lower edge stops at the diaphragm."""
    rx = a.ctr * a.thorax
    hcx = a.cx + 0.22 * rx
    return hcx - rx, hcx + rx, a.heart_cy - a.heart_ry, min(a.heart_cy + a.heart_ry, a.dome_left)


def box_from_pixels(xs: np.ndarray, ys: np.ndarray, sx: float, sy: float, width: int, height: int) -> Box:
    """Bounding box of working-resolution pixels, in full-size pixels."""
    x1, x2 = int(np.floor(xs.min() * sx)), int(np.ceil((xs.max() + 1) * sx))
    y1, y2 = int(np.floor(ys.min() * sy)), int(np.ceil((ys.max() + 1) * sy))
    return max(0, x1), min(width, x2), max(0, y1), min(height, y2)


def anatomy_boxes(a: Anatomy, right: np.ndarray, left: np.ndarray, height: int, width: int) -> dict[str, Box]:
    """The real release's anatomy boxes: lungs, costophrenic angles, cardiac silhouette."""
    h, w = right.shape
    sx, sy = width / w, height / h
    boxes: dict[str, Box] = {}
    for name, mask, lateral_sign in (("right", right, -1), ("left", left, 1)):
        ys, xs = np.nonzero(mask)
        boxes[f"{name} lung"] = box_from_pixels(xs, ys, sx, sy, width, height)
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
