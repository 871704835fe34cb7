"""DVC stage `report`: every variant side by side, with paired tests against unet and baseline.

Usage (from dvc.yaml):
  python pipelines/report.py EVAL_ROOT OUT_DIR TUNE_JSON HEADLINE_JSON TRAIN_ROOT HISTORY_DIR
Reads params.yaml: variants (which and in what order), evaluate (resamples, confidence, seed),
each variant's EVAL_ROOT/<variant>/metrics.json and scores.npz, and TUNE_JSON (the `tune`
stage's metrics: which variants were tuned, with how many trials).
Writes OUT_DIR/results.md, results.json (every number of its tables), paired.csv (one row
per reference, variant and target: macro or class), all committed to git, and
HEADLINE_JSON (a few numbers per variant: the DVC metric that `dvc exp show` compares),
HISTORY_DIR/<variant>.csv (the training curves of every seed in TRAIN_ROOT: DVC plots,
written here rather than by `train@<variant>` so that every output of a training stage is
cached and DVC's run cache can restore it);
logs the report and its settings into an MLflow run `report`, and the macro paired
differences into each variant's evaluation run of this revision and DVC experiment.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PARAMS, run_stage  # noqa: E402


def main() -> None:
    from cxrgaze.config import eval_config, load_params
    from cxrgaze.experiment.report import log_report
    from cxrgaze.report import build_report, read_tuning, write_histories, write_report

    eval_root, out_dir, tune_json, headline_json, train_root, history_dir = sys.argv[1:7]
    params = load_params(PARAMS)
    config = eval_config(params, where=str(PARAMS))
    report = build_report(eval_root, list(params.get("variants") or {}), n_resamples=config.n_resamples,
                          seed=config.seed, confidence=config.confidence, specificity=config.specificity,
                          tuning=read_tuning(tune_json))
    paths = write_report(report, out_dir, headline_json)
    write_histories(train_root, report.variants, history_dir)
    log_report(report, eval_root, paths, params={"evaluate": params.get("evaluate"),  # not tune.storage: it may hold a password
                                                 "tune": {k: v for k, v in (params.get("tune") or {}).items()
                                                          if k != "storage"},
                                                 "report": {"variants": ",".join(report.variants)}})
    print(paths["markdown"].read_text())


if __name__ == "__main__":
    run_stage("report", main)
