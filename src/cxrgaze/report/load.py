"""Reading what the pipeline wrote: each variant's evaluation (``metrics.json`` and
``scores.npz`` under ``<eval_root>/<variant>/``, :func:`load_eval`) and the ``tune`` stage's
metrics (:func:`read_tuning`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cxrgaze import CLASSES
from cxrgaze.evaluation.scores import FILENAME as SCORES_FILE
from cxrgaze.evaluation.scores import Scores, load_scores


def load_eval(eval_root: str | Path, variant: str) -> tuple[dict[str, Any], Scores]:
    """The metrics (``metrics.json``, None as NaN) and the scores (``scores.npz``) that
    ``evaluate`` wrote for ``variant``."""
    folder = Path(eval_root) / variant
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        scores = load_scores(folder / SCORES_FILE)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc.filename}: missing (run `dvc repro evaluate@{variant}`)") from None
    return {k: (math.nan if v is None else v) for k, v in metrics.items()}, scores


def read_tuning(tune_json: str | Path | None) -> dict[str, dict[str, Any]]:
    """The ``tune`` stage's metrics (variant -> ``best_value``, ``best_<param>``,
    ``trials_<state>``), or ``{}`` when there is no such file."""
    if tune_json is None or not Path(tune_json).exists():
        return {}
    return json.loads(Path(tune_json).read_text())


def _common_classes(eval_root: str | Path, scores: dict[str, Scores]) -> tuple[str, ...]:
    names = {s.classes for s in scores.values()}
    if len(names) > 1:
        raise ValueError(f"{eval_root}: the variants' scores.npz list different classes: {sorted(names)}")
    return names.pop() if names else CLASSES
