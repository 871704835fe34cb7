"""DVC stage `train@<variant>`: train one variant, keep its checkpoints.

Usage (from dvc.yaml):
  python pipelines/train.py VARIANT PREPARED_DIR SPLIT_CSV TUNED_YAML OUT_DIR METRICS_JSON
Reads params.yaml: model, loss, train, variants; TUNED_YAML (the `tune` stage's output) may
override them for VARIANT (set 3's tuned alpha).

The run is tracked in MLflow (experiment `cxrgaze`, run name = variant); OUT_DIR/run.json
carries its id to the later stages.

OUT_DIR is a persistent DVC output so that a killed `dvc repro` resumes the unfinished run
from its last epoch. A finished run (OUT_DIR/metrics.json present) or one written with
another config is discarded first: DVC reruns a stage only when something it depends on
changed, so such leftovers are stale.
"""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PARAMS, run_stage  # noqa: E402


def main() -> None:
    from cxrgaze.config import load_params
    from cxrgaze.experiment import train_tracked
    from cxrgaze.train import load_checkpoint, resolve_run_config
    from cxrgaze.tune import load_tuned, merge_overrides

    variant, prepared, split_csv, tuned, out_dir, metrics_json = sys.argv[1:7]
    out = Path(out_dir)
    params = merge_overrides(load_params(PARAMS), load_tuned(tuned, variant), variant)
    config = resolve_run_config(params, variant, where=f"{PARAMS} + {tuned}")
    last = out / "last.pt"
    if (out / "metrics.json").exists():
        print(f"{out}: discarding a finished earlier run")
        shutil.rmtree(out)
    elif last.exists():
        try:
            same = load_checkpoint(last)["config"] == config.as_dict()
        except ValueError as exc:
            print(f"{exc}; starting over")
            same = False
        if same:
            print(f"{out}: resuming an interrupted run from {last}")
        else:
            print(f"{out}: discarding an interrupted run with another config")
            shutil.rmtree(out)
    result, run_id = train_tracked(config, prepared, split_csv, out)
    Path(metrics_json).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "metrics.json", metrics_json)
    shutil.copyfile(out / "history.csv", Path(metrics_json).with_suffix(".history.csv"))
    print(f"{variant}: best epoch {result.best_epoch + 1}, val macro AUC "
          f"{result.best.get('val_auc_macro', float('nan')):.4f}, MLflow run {run_id}")


if __name__ == "__main__":
    run_stage(f"train@{sys.argv[1] if len(sys.argv) > 1 else '?'}", main)
