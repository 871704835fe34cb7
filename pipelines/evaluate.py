"""DVC stage `evaluate@<variant>`: metrics with CIs, heatmaps vs gaze, sanity checks,
calibration, figures and the servable model of every seed of one variant, each logged
into its seed's MLflow run; then the variant's summary over seeds.

Usage (from dvc.yaml):
  python pipelines/evaluate.py VARIANT PREPARED_DIR SPLIT_CSV TRAIN_DIR OUT_DIR FIGURES_DIR
Reads params.yaml: evaluate. For each TRAIN_DIR/seed<S>/: OUT_DIR/seed<S>/ gets metrics.json,
scores.npz (full-precision logits and scores), predictions.csv, saliency.csv and
sanity.json; FIGURES_DIR/seed<S>/ the PNG figures (`dvc plots show`). OUT_DIR/metrics.json
and OUT_DIR/scores.npz combine the seeds (:func:`cxrgaze.evaluate.combine_seeds`); the
`report` stage puts the headline numbers of every variant into metrics/headline.json, and
`dvc metrics show outputs/eval/<variant>/metrics.json` shows all of one variant's.
The MLflow run that holds an evaluation (and its model) is tagged with the SHA-256 of its
metrics.json: `report` and `register` find it by that (:func:`cxrgaze.experiment.evaluation.evaluation_run`).
"""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PARAMS, run_stage  # noqa: E402


def main() -> None:
    from cxrgaze.config import eval_config, load_params
    from cxrgaze.evaluate import combine_seeds
    from cxrgaze.experiment.evaluation import evaluate_tracked, seed_runs

    variant, prepared, split_csv, train_dir, out_dir, figures_dir = sys.argv[1:7]
    config = eval_config(load_params(PARAMS), where=str(PARAMS))
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)  # no folder of a seed that is gone may survive into the summary
    seeds = []
    for seed, folder in seed_runs(train_dir):
        result, run_id, model_uri = evaluate_tracked(folder, prepared, split_csv, out / folder.name, config,
                                                     figures_dir=Path(figures_dir) / folder.name)
        seeds.append(out / folder.name)
        m = result.metrics
        print(f"{variant} {folder.name}: test macro AUC {m['test_auc_macro']:.3f} "
              f"[{m.get('test_auc_macro_ci95_low', float('nan')):.3f}, {m.get('test_auc_macro_ci95_high', float('nan')):.3f}]"
              f", MLflow run {run_id}, model {model_uri}")
    combine_seeds(variant, seeds, out, config)


if __name__ == "__main__":
    run_stage(f"evaluate@{sys.argv[1] if len(sys.argv) > 1 else '?'}", main)
