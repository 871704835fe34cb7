"""Writing the report's files: ``results.md``, ``results.json``, ``paired.csv`` and the
headline metrics (:func:`write_report`), and the training curves for ``dvc plots``
(:func:`write_histories`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cxrgaze.report.markdown import to_markdown
from cxrgaze.report.results import PAIRED_COLUMNS, Report


def write_histories(train_root: str | Path, variants: list[str], out_dir: str | Path) -> list[Path]:
    """``out_dir/<variant>.csv``: the per-epoch curves of every seed of each variant (the
    seeds' ``history.csv`` under ``train_root/<variant>/seed<S>/``, with a ``seed`` column),
    for ``dvc plots``; ``epoch`` is 1-based there, as on the console and in MLflow
    (``history.csv`` counts from 0, as the checkpoints do). A file of a variant no longer
    listed is removed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.csv"):
        if stale.stem not in variants:
            stale.unlink()
    paths = []
    for variant in variants:
        found = [p for p in Path(train_root, variant).glob("seed*/history.csv") if p.parent.name[4:].isdigit()]
        if not found:
            raise FileNotFoundError(f"{Path(train_root, variant)}: no seed<S>/history.csv (run `dvc repro train@{variant}`)")
        frames = []
        for path in sorted(found, key=lambda p: int(p.parent.name[4:])):
            table = pd.read_csv(path)
            frames.append(table.assign(epoch=table["epoch"] + 1, seed=int(path.parent.name[4:])))
        paths.append(out_dir / f"{variant}.csv")
        pd.concat(frames).to_csv(paths[-1], index=False, lineterminator="\n")
    return paths


def write_report(report: Report, out_dir: str | Path, headline_json: str | Path | None = None) -> dict[str, Path]:
    """``results.md``, ``results.json`` and ``paired.csv`` (:data:`PAIRED_COLUMNS`) in ``out_dir``;
    the :meth:`Report.headline` into ``headline_json`` (default ``out_dir/headline.json``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "results.md", "json": out_dir / "results.json", "paired": out_dir / "paired.csv",
             "headline": Path(headline_json) if headline_json else out_dir / "headline.json"}
    paths["headline"].parent.mkdir(parents=True, exist_ok=True)
    paths["headline"].write_text(json.dumps(report.headline(), indent=2) + "\n")
    paths["markdown"].write_text(to_markdown(report))
    paths["json"].write_text(json.dumps(report.to_json(), indent=2) + "\n")
    pd.DataFrame(report.comparisons, columns=list(PAIRED_COLUMNS)).to_csv(
        paths["paired"], index=False, float_format="%.6g", lineterminator="\n")
    return paths
