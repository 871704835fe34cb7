"""DVC stage `train@<variant>`: train one variant once per seed, keep its checkpoints.

Usage (from dvc.yaml):
  python pipelines/train.py VARIANT PREPARED_DIR SPLIT_CSV TUNED_YAML OUT_DIR METRICS_JSON
Reads params.yaml: model, loss, train (``train.seeds``: one run per seed), variants;
TUNED_YAML (the `tune` stage's output) may override them for VARIANT (tuned loss weights).

Each seed is its own run in OUT_DIR/seed<S>/ and its own MLflow run (experiment `cxrgaze`,
run name = variant, param train.seed); OUT_DIR/seed<S>/run.json carries its id to the later
stages. METRICS_JSON holds the mean of the seeds' best validation metrics and each
seed's (``seed<S>.*``); METRICS_JSON with .history.csv the per-epoch curves of every seed
(column ``seed``).

OUT_DIR is a persistent DVC output so that a killed `dvc repro` resumes the unfinished run
from its last epoch. A finished run (metrics.json present), one written with another
config, or the folder of a seed no longer listed is discarded first: DVC reruns a stage
only when something it depends on changed, so such leftovers are stale.
"""

import json
import shutil
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PARAMS, run_stage  # noqa: E402


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed{seed}"


def clear_stale(out: Path, config_dict: dict) -> None:
    """Remove a finished run, or an interrupted one with another config, from ``out``."""
    from cxrgaze.train import load_checkpoint

    last = out / "last.pt"
    if (out / "metrics.json").exists():
        print(f"{out}: discarding a finished earlier run")
        shutil.rmtree(out)
    elif last.exists():
        try:
            same = load_checkpoint(last)["config"] == config_dict
        except ValueError as exc:
            print(f"{exc}; starting over")
            same = False
        if same:
            print(f"{out}: resuming an interrupted run from {last}")
        else:
            print(f"{out}: discarding an interrupted run with another config")
            shutil.rmtree(out)


def main() -> None:
    from cxrgaze.config import load_params
    from cxrgaze.experiment import train_tracked
    from cxrgaze.train import resolve_run_config, run_seeds
    from cxrgaze.tune import load_tuned, merge_overrides

    variant, prepared, split_csv, tuned, out_dir, metrics_json = sys.argv[1:7]
    out = Path(out_dir)
    params = merge_overrides(load_params(PARAMS), load_tuned(tuned, variant), variant)
    where = f"{PARAMS} + {tuned}"
    seeds = run_seeds(params, where)
    wanted = {seed_dir(out, s) for s in seeds}
    for stale in (p for p in out.iterdir() if p.is_dir() and p not in wanted) if out.is_dir() else ():
        print(f"{stale}: not a seed of train.seeds; removed")
        shutil.rmtree(stale)
    for leftover in (p for p in out.iterdir() if p.is_file()) if out.is_dir() else ():
        leftover.unlink()  # a run from before train.seeds (checkpoints directly in OUT_DIR)
    per_seed: dict[str, dict] = {}
    histories = []
    for seed in seeds:
        config = resolve_run_config(params, variant, where=where, seed=seed)
        folder = seed_dir(out, seed)
        clear_stale(folder, config.as_dict())
        result, run_id = train_tracked(config, prepared, split_csv, folder)
        per_seed[f"seed{seed}"] = json.loads((folder / "metrics.json").read_text())
        histories.append(pd.read_csv(folder / "history.csv").assign(seed=seed))
        print(f"{variant} seed {seed}: best epoch {result.best_epoch + 1}, val macro AUC "
              f"{result.best.get('val_auc_macro', float('nan')):.4f}, MLflow run {run_id}")
    numeric = pd.DataFrame(per_seed.values()).select_dtypes("number")
    summary = {"variant": variant, "n_seeds": len(seeds), **numeric.mean().round(6).to_dict(), **per_seed}
    Path(metrics_json).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics_json).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    pd.concat(histories).to_csv(Path(metrics_json).with_suffix(".history.csv"), index=False, lineterminator="\n")


if __name__ == "__main__":
    run_stage(f"train@{sys.argv[1] if len(sys.argv) > 1 else '?'}", main)
