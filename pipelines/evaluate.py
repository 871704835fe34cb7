"""DVC stage `evaluate@<variant>`: metrics with CIs, heatmaps vs gaze, figures and the
servable model, logged into the variant's MLflow run.

Usage (from dvc.yaml):
  python pipelines/evaluate.py VARIANT PREPARED_DIR SPLIT_CSV DICOM_DIR TRAIN_DIR OUT_DIR FIGURES_DIR METRICS_JSON
Reads params.yaml: evaluate. OUT_DIR gets metrics.json, predictions.csv, saliency.csv,
run.json (the run id and the logged model's URI, for `register`); FIGURES_DIR the
PNG figures (`dvc plots show`).
"""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PARAMS, run_stage  # noqa: E402


def main() -> None:
    from cxrgaze.config import from_mapping, load_params
    from cxrgaze.evaluate import EvalConfig
    from cxrgaze.experiment import evaluate_tracked

    variant, prepared, split_csv, dicom_dir, train_dir, out_dir, figures_dir, metrics_json = sys.argv[1:9]
    config = from_mapping(EvalConfig, load_params(PARAMS).get("evaluate"), where=f"{PARAMS}: evaluate")
    result, run_id, model_uri = evaluate_tracked(train_dir, prepared, split_csv, dicom_dir, out_dir, config,
                                                      figures_dir=figures_dir)
    Path(metrics_json).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(out_dir) / "metrics.json", metrics_json)
    m = result.metrics
    print(f"{variant}: test macro AUC {m['test_auc_macro']:.3f} "
          f"[{m.get('test_auc_macro_ci95_low', float('nan')):.3f}, {m.get('test_auc_macro_ci95_high', float('nan')):.3f}]"
          f", MLflow run {run_id}, model {model_uri}")


if __name__ == "__main__":
    run_stage(f"evaluate@{sys.argv[1] if len(sys.argv) > 1 else '?'}", main)
