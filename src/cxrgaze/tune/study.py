"""A whole study: :func:`run_study` runs ``tune.workers`` worker processes on this machine
until the variant's study holds ``tune.n_trials`` trials, then summarises it
(:class:`StudyResult`) on its MLflow parent run; :func:`tune_variants` does so for each
variant and :func:`write_metrics` writes the stage's metrics."""

from __future__ import annotations

import json
import multiprocessing
import os
import warnings
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Iterable, Mapping

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from cxrgaze.config import TUNABLE_VARIANTS, ConfigError, TuneConfig
from cxrgaze.experiment.trials import end_study_run, log_study_figure, log_study_summary
from cxrgaze.tracking import set_experiment
from cxrgaze.tune.overrides import as_overrides
from cxrgaze.tune.storage import PARENT_RUN_ATTR, live_trials, open_study
from cxrgaze.tune.worker import run_worker, worker_process


@dataclass
class StudyResult:
    """Where one study stands: its best trial and how many trials are in each state."""

    variant: str
    study_name: str
    best_value: float | None
    best_params: dict[str, float]
    best_trial: int | None
    states: dict[str, int]
    """Live trials (see :func:`live_trials`) per state name."""
    retried: int
    """Trials of dead workers that were queued again."""
    parent_run_id: str | None

    @property
    def overrides(self) -> dict[str, dict[str, float]]:
        return as_overrides(self.best_params)

    def to_metrics(self) -> dict[str, Any]:
        """The stage's metrics: best value and parameters, trial counts by state."""
        out: dict[str, Any] = {"best_value": self.best_value, "best_trial": self.best_trial}
        out.update({f"best_{k}": v for k, v in self.best_params.items()})
        out.update({f"trials_{s.lower()}": n for s, n in self.states.items()})
        out["trials_retried"] = self.retried
        return out

    def summary(self) -> str:
        counts = ", ".join(f"{n} {s.lower()}" for s, n in self.states.items() if n)
        if self.best_value is None:
            return f"{self.study_name}: no completed trial ({counts or 'no trials'})"
        best = ", ".join(f"{k}={v:.4g}" for k, v in self.best_params.items())
        return f"{self.study_name}: best val selection score {self.best_value:.4f} (trial {self.best_trial}: {best}); {counts}"


def study_result(study: optuna.Study, variant: str) -> StudyResult:
    trials = live_trials(study)
    states = {s.name: sum(t.state == s for t in trials)
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    return StudyResult(variant=variant, study_name=study.study_name,
                       best_value=None if best is None else float(best.value),
                       best_params={} if best is None else dict(best.params),
                       best_trial=None if best is None else best.number, states=states,
                       retried=len(study.get_trials(deepcopy=False)) - len(trials),
                       parent_run_id=study.user_attrs.get(PARENT_RUN_ATTR))


def _log_summary(study: optuna.Study, result: StudyResult) -> None:
    """Best value and parameters, trial counts and figures on the study's parent run (in
    that order: a plot Optuna cannot draw must not cost the numbers)."""
    import matplotlib.pyplot as plt  # plotting only at the end of a study
    from optuna.visualization import matplotlib as optuna_plots  # likewise

    run_id = result.parent_run_id
    if run_id is None:
        return
    metrics = {k: float(v) for k, v in result.to_metrics().items() if v is not None and k != "best_trial"}
    log_study_summary(run_id, metrics, sum(result.states.values()), result.best_trial)
    note = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        figure = optuna_plots.plot_optimization_history(study).figure
        log_study_figure(run_id, figure, "optimization_history.png")
        plt.close(figure)
        if result.states["COMPLETE"] >= 2:
            figure = optuna_plots.plot_param_importances(study).figure
            log_study_figure(run_id, figure, "param_importances.png")
            plt.close(figure)
        else:
            note = f"param_importances.png skipped: needs 2 completed trials, the study has {result.states['COMPLETE']}"
            print(f"{study.study_name}: {note}")
    end_study_run(run_id, note)


def _reap(procs: list[multiprocessing.process.BaseProcess]) -> None:
    """Join ``procs`` as each exits, in whatever order: a worker killed while an earlier one
    still runs must not stay a zombie (its trial would look running and the others would
    wait for it forever)."""
    pending = {proc.sentinel: proc for proc in procs}
    while pending:
        for sentinel in wait(list(pending)):
            pending.pop(sentinel).join()


def run_study(params: Mapping[str, Any], cfg: TuneConfig, variant: str, prepared: str | Path,
              split_csv: str | Path) -> StudyResult:
    """Tune ``variant`` with ``cfg.workers`` processes on this machine until its study holds
    ``cfg.n_trials`` trials; log the summary to the study's MLflow parent run.

    Raises ``RuntimeError`` when a worker process fails or no trial completed.
    """
    if variant not in TUNABLE_VARIANTS:
        raise ConfigError(f"cannot tune {variant!r}: choose from {', '.join(TUNABLE_VARIANTS)}")
    set_experiment()  # created once here, not raced by the workers
    study = open_study(cfg, variant)  # likewise the study
    if cfg.workers == 1:
        run_worker(params, cfg, variant, prepared, split_csv)
    else:
        context = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // cfg.workers)
        procs = [context.Process(target=worker_process, name=f"tune-{variant}-{k}",
                                 args=(dict(params), cfg, variant, str(prepared), str(split_csv), threads))
                 for k in range(cfg.workers)]
        for proc in procs:
            proc.start()
        _reap(procs)
        failed = [f"{p.name} (exit {p.exitcode})" for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"tune worker(s) failed: {', '.join(failed)}; see their output above")
    result = study_result(study, variant)
    _log_summary(study, result)
    print(result.summary())
    if result.best_value is None:
        raise RuntimeError(f"{result.summary()}: nothing to hand to training; see the failed trials above")
    return result


def tune_variants(params: Mapping[str, Any], cfg: TuneConfig, variants: Iterable[str], prepared: str | Path,
                  split_csv: str | Path) -> dict[str, StudyResult]:
    """:func:`run_study` for each variant, in order."""
    return {v: run_study(params, cfg, v, prepared, split_csv) for v in variants}


def write_metrics(path: str | Path, results: Mapping[str, StudyResult]) -> Path:
    """The stage's metrics JSON: per variant, best value and parameters, trials by state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({v: r.to_metrics() for v, r in results.items()}, indent=2, sort_keys=True) + "\n")
    return path
