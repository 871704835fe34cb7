"""The report as an MLflow run (:func:`log_report`): the headline numbers of every variant as
its metrics and description, the report files as its artifacts; and the paired differences
in each variant's evaluation run."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow

from cxrgaze.experiment.evaluation import evaluation_run, seed_runs
from cxrgaze.report import Report
from cxrgaze.tracking import finite_metrics, flatten, resumed_run, run_tags, set_experiment


def log_report(report: Report, eval_root: str | Path, paths: dict[str, Path], params: dict | None = None) -> str:
    """Log the paired differences into every variant's evaluation run of this revision and
    DVC experiment, and the report files and ``params`` (the report's settings) into a run
    named ``report``; returns that run's id."""
    set_experiment()
    for variant, refs in report.paired.items():
        runs = seed_runs(Path(eval_root) / variant)
        if len(runs) > 1:  # the differences are the seed ensemble's: no single seed's run has them
            print(f"report: {variant} has {len(runs)} seeds; its paired differences are in the report run only")
            continue
        for _, folder in runs:
            found = evaluation_run(folder)
            if found is None or not found[2]:
                print(f"report: no run of this revision and DVC experiment in {mlflow.get_tracking_uri()} holds the "
                      f"evaluation of {variant}; its paired differences are in the report run only")
                continue
            with resumed_run(found[0]):
                for ref, p in refs.items():
                    mlflow.log_metrics(finite_metrics({f"test_auc_macro_diff_vs_{ref}": p["difference"],
                                                       f"test_auc_macro_diff_vs_{ref}_ci95_low": p["low"],
                                                       f"test_auc_macro_diff_vs_{ref}_ci95_high": p["high"],
                                                       f"test_auc_macro_diff_vs_{ref}_p_value": p["p_value"]}))
    headline = report.headline()
    with mlflow.start_run(run_name="report") as run:
        mlflow.set_tags({**run_tags(None, None), "cxrgaze.kind": "report",
                         "mlflow.note.content": report_description(headline)})
        if params:
            mlflow.log_params(flatten(params))
        mlflow.log_metrics(finite_metrics({f"{variant}.{key}": value for variant, numbers in headline.items()
                                           for key, value in numbers.items()}))
        mlflow.log_metrics(finite_metrics({f"{variant}.test_auc_macro_diff_vs_{ref}": p["difference"]
                                           for variant, refs in report.paired.items() for ref, p in refs.items()}))
        for path in paths.values():
            mlflow.log_artifact(str(path))
        return run.info.run_id


def report_description(headline: dict[str, dict[str, float]]) -> str:
    """The report run's description (what the UI shows first): the headline table and where
    the full report is."""
    def cell(numbers: dict[str, float], key: str) -> str:
        value = numbers.get(key)
        return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"

    rows = [f"| {v} | {cell(n, 'test_auc_macro')} [{cell(n, 'test_auc_macro_ci95_low')}, "
            f"{cell(n, 'test_auc_macro_ci95_high')}] | {cell(n, 'val_auc_macro')} | {cell(n, 'test_generator_gaze_cc')} |"
            for v, n in headline.items()]
    return "\n".join([
        "The results of this revision. The full tables (paired tests, calibration, seeds, tuning, heatmaps, "
        "sanity checks) are `results.md` in this run's artifacts; the same numbers are this run's metrics "
        "(`<variant>.test_auc_macro`, ...).", "",
        "| variant | test macro AUC [95% CI] | validation macro AUC | generator map vs gaze (CC, test) |",
        "|---|---|---|---|", *rows])[:5000]
