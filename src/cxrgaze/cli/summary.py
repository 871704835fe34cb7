"""What the pipeline produced, printed at the end of ``make demo`` (``cxrgaze summary``).

Reads only stage outputs, found where the pipeline's layout puts them
(:mod:`cxrgaze.layout`), so it works after ``dvc repro`` restored them from the cache.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import pandas as pd

from cxrgaze import CLASSES
from cxrgaze.mlflow_ui import results_link
from cxrgaze.layout import MLFLOW_DB, PREPARED, REGISTER_JSON, RESULTS_MD, SPLIT, TRAIN_ROOT
from cxrgaze.tracking import experiment_name
from cxrgaze.variants import VARIANTS


def _section(title: str) -> None:
    print(f"\n== {title}")


def print_summary(root: Path = Path(".")) -> None:
    """Print the data, exclusion, split, training and results reports of the pipeline's
    stage outputs under the project folder ``root``, where present."""
    prepared = root / PREPARED
    if (prepared / "manifest.csv").exists():
        manifest = pd.read_csv(prepared / "manifest.csv", dtype=str)
        _section(f"prepared images: {len(manifest)}  ({prepared})")
        print(manifest["label"].value_counts().rename("images").to_string())
        meta_path = prepared / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            config = meta.get("config") or meta.get("data")
            if config:
                print("config: " + ", ".join(f"{k}={v}" for k, v in config.items()))
    else:
        print(f"no prepared data under {prepared}: run `dvc repro` (or `make demo`)")
        return
    excluded_path = prepared / "excluded.csv"
    if excluded_path.exists():
        excluded = pd.read_csv(excluded_path, dtype=str)
        _section(f"excluded images: {len(excluded)}  ({excluded_path})")
        if len(excluded):
            print(excluded.to_string(index=False))
    split_path = root / SPLIT
    if split_path.exists():
        split = pd.read_csv(split_path, dtype=str)
        _section(f"split (images; patients in the last column)  ({split_path})")
        table = split.groupby(["split", "label"]).size().unstack(fill_value=0)
        table = table[[c for c in CLASSES if c in table.columns]]
        table["patients"] = split.groupby("split")["patient_id"].nunique()
        print(table.reindex(["train", "val", "test"]).to_string())
    _print_training(root / TRAIN_ROOT)
    _print_results(root / RESULTS_MD, root / REGISTER_JSON)
    print("\nBrowse the runs, figures and registered models in MLflow:\n"
          "  .venv/bin/mlflow ui --host 127.0.0.1 --port 5000\n"
          f"  then open {mlflow_ui_link(root / MLFLOW_DB)}\n"
          "Compare stages and parameters with DVC:\n"
          "  .venv/bin/dvc metrics show | .venv/bin/dvc plots show | .venv/bin/dvc params diff")


def mlflow_ui_link(store: Path, base: str = "http://127.0.0.1:5000/") -> str:
    """The link that opens the cxrgaze experiment's results view in MLflow's UI
    (:func:`cxrgaze.mlflow_ui.results_link`); the experiments list when the store has none."""
    experiment = None
    if store.is_file():
        with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
            try:
                row = db.execute("SELECT experiment_id FROM experiments WHERE name = ?",
                                 (experiment_name(),)).fetchone()
            except sqlite3.Error:
                row = None
        experiment = str(row[0]) if row else None
    return results_link(experiment, base)


def _print_results(results_md: Path, register_json: Path) -> None:
    """The report's headline, champion pick and classification tables, and the registry's decision."""
    if results_md.exists():
        _section(f"results  ({results_md}: the full report, with paired tests, calibration, heatmaps, sanity checks)")
        text = results_md.read_text()
        cut = text.find("## Paired comparisons")
        print((text[:cut] if cut >= 0 else text).split("\n", 2)[-1].rstrip())
    if register_json.exists():
        decision = json.loads(register_json.read_text())
        _section(f"model registry  ({register_json})")
        print(f"champion: cxrgaze v{decision.get('champion_version')} - {decision.get('reason')}")
        for variant, why in (decision.get("skipped") or {}).items():
            print(f"not registered: {variant}: {why}")
        for variant, why in (decision.get("refused") or {}).items():
            print(f"refused by the explanation gate: {variant}: {why}")


def _print_training(train_root: Path) -> None:
    """Best validation metrics of every trained variant (mean over seeds), in params order."""
    rows = []
    for path in sorted(train_root.glob("*/seed*/metrics.json")):
        m = json.loads(path.read_text())
        rows.append({"variant": m.get("variant", path.parent.parent.name), "best epoch": m.get("best_epoch", -1) + 1,
                     "epochs": m.get("epochs_run"),
                     **{f"val AUC {c}": m.get(f"val_auc_{c}") for c in ("macro", *CLASSES)}})
    if not rows:
        return
    order = {v: i for i, v in enumerate(VARIANTS)}
    per_seed = pd.DataFrame(rows)
    table = per_seed.groupby("variant").mean().assign(seeds=per_seed.groupby("variant").size())
    table = table.sort_index(key=lambda s: s.map(lambda v: order.get(v, 99))).reset_index()
    _section(f"training: best epoch by validation macro AUC, mean over seeds  ({train_root})")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print("validation carries the synthetic shortcut: test AUC with CIs is what separates variants")
