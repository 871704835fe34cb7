"""DVC stage `register`: register every evaluated model; move `champion` by validation AUC.

Usage (from dvc.yaml):
  python pipelines/register.py EVAL_ROOT PREPARED_DIR SPLIT_CSV DICOM_DIR OUT_JSON TRAIN_ROOT FIGURES_ROOT
Reads params.yaml: register, variants. Writes OUT_JSON with the versions and the decision:
this machine's record, not a DVC output (the registry lives in the MLflow tracking store).
An evaluation that DVC restored (`dvc pull`, the run cache) and no MLflow run of this
store holds is logged first, with its model, from TRAIN_ROOT's checkpoint and
FIGURES_ROOT's figures (:func:`cxrgaze.experiment.evaluation.log_restored_evaluation`).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PARAMS, run_stage  # noqa: E402


def main() -> None:
    from cxrgaze.config import load_params
    from cxrgaze.experiment.evaluation import register_evaluated

    eval_root, prepared, split_csv, dicom_dir, out_json, train_root, figures_root = sys.argv[1:8]
    params = load_params(PARAMS)
    decision = register_evaluated(eval_root, list(params.get("variants") or {}), prepared, split_csv, dicom_dir,
                                  params.get("register"), where=f"{PARAMS}: register",
                                  train_root=train_root, figures_root=figures_root)
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(decision.to_json(), indent=2, sort_keys=True) + "\n")
    print(f"registered versions: {decision.versions}; champion: v{decision.champion_version} ({decision.reason})")
    for variant, why in decision.skipped.items():
        print(f"not registered: {variant}: {why}")


if __name__ == "__main__":
    run_stage("register", main)
