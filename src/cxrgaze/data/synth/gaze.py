"""Simulated radiologist readings for the synthetic dataset (see :mod:`cxrgaze.data.synth`).

The real experiment showed each image on a 1920x1080 screen, scaled to the screen height
and centred, with the ``image_*_pad`` columns of the master sheet giving the black bars
in screen pixels. A Gazepoint tracker wrote one ``fixations.csv`` row per fixation; the
release maps screen positions back to original pixels exactly as
``map_eye_gaze_from_screen_to_image_coordinates.py`` does::

    X_ORIGINAL = int(width / (1920 - left - right) * (FPOGX * 1920 - left))

(and alike for Y). Fixations that fall on the bars get ``X_ORIGINAL = Y_ORIGINAL = -1``,
the sentinel the reference code meant (its own arithmetic turns -1 into ``int(-w/rw)``,
which is 0 for images smaller than the screen).

A reading here is: a few scanning fixations, then the finding dwelt on (the heart and
both bases for CHF, the opacity for pneumonia) mixed with more scanning of both lungs;
Normal readings scan both lungs and glance at the heart. Fixations never land on the
burned-in marker (nor near it). Now and then a first fixation lands on a bar, off the
image, as happens while an image loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxrgaze.data.schema import GAZE_COLUMNS
from cxrgaze.data.synth.anatomy import Box

SCREEN_W, SCREEN_H = 1920, 1080
SESSION_SIZE = 30
"""Images per reading session (the release's sessions held up to 30)."""

FINDING_FOCUS = {"CHF": 0.72, "pneumonia": 0.66, "Normal": 0.0}
"""Share of a reading's fixations spent inside the finding boxes."""


def screen_pads(height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` bars, in screen pixels, around the displayed image."""
    ratio = min(SCREEN_H / height, SCREEN_W / width)
    shown_h, shown_w = int(height * ratio), int(width * ratio)
    top, left = (SCREEN_H - shown_h) // 2, (SCREEN_W - shown_w) // 2
    return top, SCREEN_H - shown_h - top, left, SCREEN_W - shown_w - left


@dataclass
class Gaze:
    """Fixation positions of one reading, in original pixels; ``on_image`` False for bars."""

    x: np.ndarray  # (N,) float
    y: np.ndarray  # (N,) float
    on_image: np.ndarray  # (N,) bool


def _in_box(x: np.ndarray, y: np.ndarray, box: Box, margin: float = 0.0) -> np.ndarray:
    x1, x2, y1, y2 = box
    return (x >= x1 - margin) & (x <= x2 + margin) & (y >= y1 - margin) & (y <= y2 + margin)


def sample_reading(
    rng: np.random.Generator,
    label: str,
    boxes: dict[str, Box],
    lungs: np.ndarray,
    scale: tuple[float, float],
    height: int,
    width: int,
    marker: Box | None,
) -> Gaze:
    """Fixation positions of one reading of an image (see the module docstring)."""
    n = int(rng.integers(30, 61))
    n_focus = int(round(FINDING_FOCUS[label] * n))
    ys, xs = np.nonzero(lungs)

    def scan(k: int) -> tuple[np.ndarray, np.ndarray]:
        i = rng.integers(0, len(xs), k)
        return (xs[i] + rng.random(k)) * scale[1], (ys[i] + rng.random(k)) * scale[0]

    def within(k: int, box: Box) -> tuple[np.ndarray, np.ndarray]:
        x1, x2, y1, y2 = box
        cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        # concentrated toward the centre, never outside the box
        dx, dy = np.clip(rng.normal(0, 0.45, (2, k)), -0.95, 0.95)
        return cx + hw * dx, cy + hh * dy

    if label == "Normal":
        parts = [scan(n - n // 7), within(n // 7, boxes["cardiac silhouette"])]
    else:
        focus = sorted(name for name in boxes if name.startswith("finding:"))
        weights = np.array([2.0 if "cardiomegaly" in name else 1.0 for name in focus])
        counts = rng.multinomial(n_focus, weights / weights.sum())
        parts = [scan(n - n_focus)] + [within(int(c), boxes[name]) for name, c in zip(focus, counts)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    if marker is not None:  # never on the marker, nor within a marker's width of it
        margin = marker[1] - marker[0]
        keep = ~_in_box(x, y, marker, margin)
        x, y = x[keep], y[keep]
    x, y = np.clip(x, 0.5, width - 0.5), np.clip(y, 0.5, height - 0.5)

    # an opening survey top to bottom, then the rest in random order
    order = rng.permutation(len(x))
    n_survey = min(len(x), int(rng.integers(4, 9)))
    survey = np.sort(order[:n_survey])
    survey = survey[np.argsort(y[survey])]
    order = np.concatenate([survey, order[n_survey:]])
    x, y = x[order], y[order]
    on_image = np.ones(len(x), bool)
    if rng.random() < 0.25:  # a glance at the bar while the image appears
        x, y, on_image = np.r_[-1.0, x], np.r_[-1.0, y], np.r_[False, on_image]
    return Gaze(x, y, on_image)


def to_screen(gaze: Gaze, height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """``FPOGX, FPOGY, X_ORIGINAL, Y_ORIGINAL`` of a reading, consistent with the pads."""
    top, bottom, left, right = screen_pads(height, width)
    shown_w, shown_h = SCREEN_W - left - right, SCREEN_H - top - bottom
    eye_x = left + gaze.x * shown_w / width
    eye_y = top + gaze.y * shown_h / height
    off = ~gaze.on_image
    if off.any():  # somewhere on a bar (or, without bars, just off the top edge)
        k = int(off.sum())
        if left > 8:
            eye_x[off] = rng.uniform(0.2, 0.8, k) * left
            eye_y[off] = rng.uniform(0.3, 0.7, k) * SCREEN_H
        else:
            eye_x[off] = rng.uniform(0.3, 0.7, k) * SCREEN_W
            eye_y[off] = rng.uniform(0.1, 0.9, k) * max(top, 1)
    fx, fy = np.round(eye_x / SCREEN_W, 5), np.round(eye_y / SCREEN_H, 5)
    sx, sy = fx * SCREEN_W, fy * SCREEN_H
    inside = (sx > left) & (sx < SCREEN_W - right) & (sy > top) & (sy < SCREEN_H - bottom)
    x_orig = np.where(inside, (width / shown_w * (sx - left)).astype(np.int64), -1)
    y_orig = np.where(inside, (height / shown_h * (sy - top)).astype(np.int64), -1)
    return fx, fy, x_orig, y_orig


def calibration_reading(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """A calibration screen (a dot at the centre): ``FPOGX, FPOGY, X_ORIGINAL, Y_ORIGINAL``.

    The release keeps these readings under a DICOM_ID that is not in the master sheet;
    its mapping, finding no DICOM, treats the whole screen as the image.
    """
    k = int(rng.integers(3, 7))
    fx = np.round((SCREEN_W / 2 + rng.normal(0, 12, k)) / SCREEN_W, 5)
    fy = np.round((SCREEN_H / 2 + rng.normal(0, 12, k)) / SCREEN_H, 5)
    return fx, fy, (fx * SCREEN_W).astype(np.int64), (fy * SCREEN_H).astype(np.int64)


Reading = tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""``(DICOM_ID, FPOGX, FPOGY, X_ORIGINAL, Y_ORIGINAL)`` of one image shown in a session."""


def _f5(values: np.ndarray) -> np.ndarray:
    return np.char.mod("%.5f", values)


@dataclass
class _Session:
    """The running state of one reading session: clock, counters, last gaze point, the reader's constants."""

    session_id: int
    t: float  # when the next image appears, seconds
    tick0: int
    blinks_per_min: int
    pupil_mm: np.ndarray  # (2,) left, right
    fix_id: int = 0
    blink_id: int = 0
    last: tuple[float, float] = (0.5, 0.5)

    @classmethod
    def start(cls, session_id: int, rng: np.random.Generator) -> _Session:
        t = rng.uniform(3.0, 10.0)
        tick0 = int(rng.integers(10**12, 5 * 10**12))
        blinks_per_min = int(rng.integers(6, 22))
        pupil_mm = rng.normal(4.0, 0.4, 2)
        return cls(session_id, t, tick0, blinks_per_min, pupil_mm)


def session_rows(session_id: int, readings: list[Reading], rng: np.random.Generator) -> list[list[str]]:
    """``fixations.csv`` rows (all ``GAZE_COLUMNS``, as text) of one session's readings.

    Times run on through the session: each fixation starts after the previous one ended
    plus a saccade, and each image after the previous one plus a pause for dictation.
    ``Time (in secs)`` is when the tracker reported the fixation, at its end.
    """
    session = _Session.start(session_id, rng)
    rows: list[list[str]] = []
    for media_id, reading in enumerate(readings):
        cols = _reading_columns(session, media_id, reading, rng)
        rows.extend(np.stack([cols[c] for c in GAZE_COLUMNS], axis=1).tolist())
    return rows


def _reading_columns(session: _Session, media_id: int, reading: Reading,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every ``GAZE_COLUMNS`` column (text arrays) of one image's reading; advances ``session``."""
    dicom_id, fx, fy, xo, yo = reading
    n = len(fx)
    dur = 0.1 + 0.7 * rng.beta(2.0, 5.0, n)
    gap = 0.02 + rng.exponential(0.04, n)
    start = session.t + np.cumsum(gap) + np.r_[0.0, np.cumsum(dur[:-1])]
    end = start + dur
    session.t = float(end[-1]) + rng.uniform(3.0, 12.0)
    px, py = np.r_[session.last[0], fx[:-1]] * SCREEN_W, np.r_[session.last[1], fy[:-1]] * SCREEN_H
    dx, dy = fx * SCREEN_W - px, fy * SCREEN_H - py
    session.last = (float(fx[-1]), float(fy[-1]))
    cols = {
        "SESSION_ID": np.full(n, str(session.session_id)),
        "MEDIA_ID": np.full(n, str(media_id)),
        "DICOM_ID": np.full(n, dicom_id),
        "CNT": (end * 60).astype(np.int64).astype(str),
        "Time (in secs)": _f5(end),
        "TIMETICK(f=10000000)": (session.tick0 + np.round(end * 1e7).astype(np.int64)).astype(str),
        "FPOGX": _f5(fx),
        "FPOGY": _f5(fy),
        "FPOGS": _f5(start),
        "FPOGD": _f5(dur),
        "FPOGID": np.arange(session.fix_id + 1, session.fix_id + n + 1).astype(str),
        "FPOGV": np.full(n, "1"),
        **_eye_columns(session, fx, fy, rng),
        "SACCADE_MAG": _f5(np.hypot(dx, dy)),
        "SACCADE_DIR": _f5(np.mod(np.degrees(np.arctan2(-dy, dx)), 360.0)),
        "VID_FRAME": np.full(n, "0"),
        "X_ORIGINAL": xo.astype(str),
        "Y_ORIGINAL": yo.astype(str),
    }
    session.fix_id += n
    return cols


def _eye_columns(session: _Session, fx: np.ndarray, fy: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The tracker's per-eye columns ``BPOGX`` ... ``RPMMV`` of one reading (blinks and pupils)."""
    n = len(fx)
    blink = rng.random(n) < 0.06
    bkid = np.where(blink, session.blink_id + np.cumsum(blink), 0)
    session.blink_id += int(blink.sum())
    return {
        "BPOGX": _f5(fx + rng.normal(0, 0.002, n)),
        "BPOGY": _f5(fy + rng.normal(0, 0.003, n)),
        "BPOGV": np.full(n, "1"),
        "LPCX": _f5(rng.normal(0.41, 0.01, n)),
        "LPCY": _f5(rng.normal(0.55, 0.01, n)),
        "LPD": _f5(rng.normal(26.0, 1.2, n)),
        "LPS": _f5(rng.normal(1.0, 0.02, n)),
        "LPV": np.full(n, "1"),
        "RPCX": _f5(rng.normal(0.59, 0.01, n)),
        "RPCY": _f5(rng.normal(0.55, 0.01, n)),
        "RPD": _f5(rng.normal(26.0, 1.2, n)),
        "RPS": _f5(rng.normal(1.0, 0.02, n)),
        "RPV": np.full(n, "1"),
        "BKID": bkid.astype(str),
        "BKDUR": _f5(np.where(blink, rng.uniform(0.08, 0.3, n), 0.0)),
        "BKPMIN": np.full(n, str(session.blinks_per_min)),
        "LPMM": _f5(session.pupil_mm[0] + rng.normal(0, 0.05, n)),
        "LPMMV": np.full(n, "1"),
        "RPMM": _f5(session.pupil_mm[1] + rng.normal(0, 0.05, n)),
        "RPMMV": np.full(n, "1"),
    }


def fixation_rows(
    readings: list[Reading], calibration: bool, rng: np.random.Generator
) -> tuple[list[list[str]], list[str]]:
    """All ``fixations.csv`` rows: the readings shuffled into sessions of ``SESSION_SIZE``.

    With ``calibration``, each session also shows one calibration screen, kept (as in the
    release) under the id of the image before it without its last five characters: a
    DICOM_ID that is not in the master sheet. Returns the rows and those ids.
    """
    shown = [readings[i] for i in rng.permutation(len(readings))]
    rows: list[list[str]] = []
    orphans: list[str] = []
    for session, start in enumerate(range(0, len(shown), SESSION_SIZE), start=1):
        batch = shown[start:start + SESSION_SIZE]
        if calibration:
            at = int(rng.integers(0, len(batch)))
            orphans.append(batch[at][0][:-5])
            batch.insert(at + 1, (orphans[-1], *calibration_reading(rng)))
        rows += session_rows(session, batch, rng)
    return rows, orphans
