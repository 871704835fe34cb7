"""``scores.npz``: a variant's full-precision class scores, written by evaluation, read by the report.

Keys (``np.savez``, read without pickle), for ``split`` in ``val`` and ``test``:

* ``{split}_labels`` (N,) int64 class indices; ``{split}_dicom_ids`` (N,) str
* ``{split}_logits_per_seed`` (S, N, K) float64: each training seed's class logits
* ``{split}_scores_per_seed`` (S, N, K) float64: those logits through the scoring rule
* ``{split}_scores`` (N, K) float64: the mean over seeds of ``scores_per_seed`` (the seed
  ensemble; equal to the single seed's scores when S = 1)
* ``seeds`` (S,) int64; ``scoring`` 0-d str, ``"sigmoid"`` (per class) or ``"softmax"``;
  ``classes`` (K,) str.

Build a split with :func:`split_from_logits` (applies the scoring rule, averages over seeds),
write with :func:`save_scores`, read with :func:`load_scores` (checks shapes and keys).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrgaze.predict import SCORING

SPLITS = ("val", "test")
SCORINGS = tuple(SCORING.values())
"""The scoring rules (:mod:`cxrgaze.predict`)."""
FILENAME = "scores.npz"


@dataclass(frozen=True)
class SplitScores:
    """One split's cases and scores: ``labels`` (N,) int64, ``dicom_ids`` (N,) str,
    ``scores`` (N, K), ``logits_per_seed`` and ``scores_per_seed`` (S, N, K), float64."""

    labels: np.ndarray
    dicom_ids: np.ndarray
    scores: np.ndarray
    logits_per_seed: np.ndarray
    scores_per_seed: np.ndarray


@dataclass(frozen=True)
class Scores:
    """The content of a ``scores.npz``: ``splits`` (``"val"``, ``"test"`` -> :class:`SplitScores`),
    ``seeds`` (S,) int64, ``scoring`` (``"sigmoid"`` or ``"softmax"``), ``classes`` (K names)."""

    splits: dict[str, SplitScores]
    seeds: np.ndarray
    scoring: str
    classes: tuple[str, ...]

    def __getitem__(self, split: str) -> SplitScores:
        return self.splits[split]


def apply_scoring(logits: np.ndarray, scoring: str) -> np.ndarray:
    """Scores of logits (..., K) in float64: ``sigmoid`` per class or ``softmax`` over the
    last axis, by the one scoring function of :func:`cxrgaze.predict.apply_rule`."""
    import torch  # here: `cxrgaze report` reads scores.npz without loading torch

    from cxrgaze.predict import apply_rule

    return apply_rule(torch.from_numpy(np.asarray(logits, dtype=np.float64)), scoring).numpy()


def split_from_logits(labels: np.ndarray, dicom_ids: Sequence[str], logits_per_seed: np.ndarray,
                      scoring: str) -> SplitScores:
    """A :class:`SplitScores` from ``logits_per_seed`` (S, N, K) (or (N, K) for one seed):
    per-seed scores by ``scoring`` (:func:`apply_scoring`) and their mean over seeds."""
    logits = np.asarray(logits_per_seed, dtype=np.float64)
    logits = logits[None] if logits.ndim == 2 else logits
    per_seed = apply_scoring(logits, scoring)
    return SplitScores(np.asarray(labels, dtype=np.int64), np.asarray(dicom_ids, dtype=str),
                       per_seed.mean(axis=0), logits, per_seed)


def save_scores(path: str | Path, splits: Mapping[str, SplitScores], seeds: Sequence[int], scoring: str,
                classes: Sequence[str]) -> Path:
    """Write ``splits`` (``"val"`` and ``"test"``) to ``path`` (a folder gets ``scores.npz``) in the
    module docstring's format, after :func:`check_scores`; returns the file's path."""
    scores = Scores(dict(splits), np.asarray(seeds, dtype=np.int64), scoring, tuple(classes))
    check_scores(scores)
    path = Path(path)
    path = path / FILENAME if path.is_dir() else path
    arrays: dict[str, np.ndarray] = {"seeds": scores.seeds, "scoring": np.array(scoring, dtype=str),
                                     "classes": np.asarray(scores.classes, dtype=str)}
    for split, data in scores.splits.items():
        arrays.update({f"{split}_{name}": np.asarray(getattr(data, name)) for name in SplitScores.__dataclass_fields__})
    with path.open("wb") as f:  # a file object: np.savez would append ".npz" to another name
        np.savez(f, **arrays)
    return path


def load_scores(path: str | Path) -> Scores:
    """Read a ``scores.npz`` (a folder: its ``scores.npz``) written by :func:`save_scores`,
    checked by :func:`check_scores`. Arrays come back as int64 / str / float64."""
    path = Path(path)
    path = path / FILENAME if path.is_dir() else path
    with np.load(path, allow_pickle=False) as npz:
        try:
            splits = {split: SplitScores(
                labels=npz[f"{split}_labels"].astype(np.int64), dicom_ids=npz[f"{split}_dicom_ids"].astype(str),
                scores=npz[f"{split}_scores"].astype(np.float64),
                logits_per_seed=npz[f"{split}_logits_per_seed"].astype(np.float64),
                scores_per_seed=npz[f"{split}_scores_per_seed"].astype(np.float64)) for split in SPLITS}
            scores = Scores(splits, npz["seeds"].astype(np.int64), str(npz["scoring"][()]),
                            tuple(npz["classes"].astype(str).tolist()))
        except KeyError as exc:
            raise ValueError(f"{path}: not a scores file, {exc.args[0]}") from None
    check_scores(scores, where=str(path))
    return scores


def check_scores(scores: Scores, where: str = "scores") -> None:
    """``ValueError`` unless every split of ``SPLITS`` is there with N labels and ids, (N, K)
    scores and (S, N, K) per-seed arrays, S = len(seeds), K = len(classes), a known scoring."""
    if scores.scoring not in SCORINGS:
        raise ValueError(f"{where}: scoring must be one of {SCORINGS}, got {scores.scoring!r}")
    s, k = len(scores.seeds), len(scores.classes)
    for split in SPLITS:
        if split not in scores.splits:
            raise ValueError(f"{where}: no {split} split")
        data = scores.splits[split]
        n = len(data.labels)
        expected = {"labels": (n,), "dicom_ids": (n,), "scores": (n, k), "logits_per_seed": (s, n, k),
                    "scores_per_seed": (s, n, k)}
        for name, shape in expected.items():
            if np.shape(getattr(data, name)) != shape:
                raise ValueError(f"{where}: {split}_{name} has shape {np.shape(getattr(data, name))}, expected {shape} "
                                 f"(N={n}, S={s} seeds, K={k} classes)")
