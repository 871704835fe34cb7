"""The report as an MLflow run (:func:`log_report`): the headline numbers of every variant as
its metrics and description, the report files as its artifacts; and the paired differences
in each variant's evaluation run (metrics, and a paragraph of its description and its
training run's)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from cxrgaze.experiment.evaluation import evaluation_run, seed_runs
from cxrgaze.report import Report
from cxrgaze.tracking import NOTE_TAG, finite_metrics, flatten, run_tags, same_context, set_experiment


def log_report(report: Report, eval_root: str | Path, paths: dict[str, Path], params: dict | None = None) -> str:
    """Add the paired differences to every variant's evaluation run of this revision and DVC
    experiment (:func:`log_paired`), and log the report files and ``params`` (the report's
    settings) into a run named ``report``; returns that run's id."""
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
            log_paired(found[0], refs)
    headline = report.headline()
    with mlflow.start_run(run_name="report") as run:
        mlflow.set_tags({**run_tags(None, None), "cxrgaze.kind": "report",
                         NOTE_TAG: report_description(headline)})
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
        return _plain(numbers.get(key))

    rows = [f"| {v} | {cell(n, 'test_auc_macro')} [{cell(n, 'test_auc_macro_ci95_low')}, "
            f"{cell(n, 'test_auc_macro_ci95_high')}] | {cell(n, 'val_auc_macro')} | {cell(n, 'test_generator_gaze_cc')} |"
            for v, n in headline.items()]
    return "\n".join([
        "The results of this revision. The full tables (paired tests, calibration, seeds, tuning, heatmaps, "
        "sanity checks) are `results.md` in this run's artifacts; the same numbers are this run's metrics "
        "(`<variant>.test_auc_macro`, ...).", "",
        "| variant | test macro AUC [95% CI] | validation macro AUC | generator map vs gaze (CC, test) |",
        "|---|---|---|---|", *rows])[:5000]


PAIRED_HEADING = "**Paired differences** (test macro AUC, this variant minus the reference, 95 % CI, p):"


def log_paired(run_id: str, refs: dict[str, dict[str, float]]) -> None:
    """Log the paired differences against each reference into an evaluation run, and write
    them into its description and, when that run is of this revision and DVC experiment, its
    training run's, replacing those of an earlier report.
    Through the client, without reopening: the runs' times stay those of their own work."""
    client = MlflowClient()
    now = int(time.time() * 1000)
    metrics = finite_metrics({f"test_auc_macro_diff_vs_{ref}{suffix}": p[key] for ref, p in refs.items()
                              for suffix, key in (("", "difference"), ("_ci95_low", "low"),
                                                  ("_ci95_high", "high"), ("_p_value", "p_value"))})
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    lines = [f"- vs `{ref}`: {_signed(p['difference'])} [{_signed(p['low'])}, {_signed(p['high'])}], "
             f"p = {_plain(p['p_value'])}" for ref, p in refs.items()]
    parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    targets = [run_id, *([parent] if parent and same_context(client.get_run(parent).data.tags) else [])]
    for target in targets:  # (a baseline's training run keeps its own report's differences)
        note = client.get_run(target).data.tags.get(NOTE_TAG, "").split(f"\n\n{PAIRED_HEADING}")[0]
        client.set_tag(target, NOTE_TAG, "\n".join([f"{note}\n\n{PAIRED_HEADING}", *lines]))


def _signed(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.3f}"


def _plain(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"
