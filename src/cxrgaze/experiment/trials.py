"""The MLflow runs of tuning: one parent run per Optuna study, one child run per trial.

The parent (``tune-<variant>``; its id is kept as a study user attribute by
:mod:`cxrgaze.tune`, so that reruns and other workers nest under it) gets the storage, the
search space and the budget as tags, and at the end the best value, ``best_<param>``, the
trial counts and the Optuna figures. A trial's child run (``<variant>-trial-<n>``) gets the
resolved training config as params, per-epoch metrics under the training runs' names
(``epoch_val_auc_macro``, ``epoch_val_selection``, ``epoch_train_loss``...), the value Optuna
maximised as ``objective`` (the best epoch's ``val_selection``) with ``best_val_selection``,
``best_val_auc_macro``, ``best_val_outside_mass`` and ``best_epoch`` (1-based), and its final
state as tag ``optuna.trial.state``. Run status: COMPLETE and PRUNED -> FINISHED (a pruned
trial stopped early on purpose, tag ``cxrgaze.pruned`` says why; it did not fail), FAIL ->
FAILED (tag ``cxrgaze.error`` says why), KILLED only for an interrupted worker.
"""

from __future__ import annotations

from typing import Any, Mapping

from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from cxrgaze.experiment.training import EPOCH_PREFIX
from cxrgaze.tracking import EpochLogger, run_exists, run_tags, set_experiment


class StudyRuns:
    """The runs of one study, created through one client in experiment ``cxrgaze``."""

    def __init__(self, variant: str, device: str, tags: Mapping[str, str]) -> None:
        self.variant = variant
        self.client = MlflowClient()
        self.experiment_id = set_experiment()
        self.tags = {**run_tags(variant=variant, device=device), **tags}

    def open_parent(self, run_id: str | None) -> str:
        """The study's parent run: ``run_id`` reopened when it still exists, else a new run
        (the caller stores a new id in the study at once, then tags the run)."""
        if run_id and run_exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        return self.client.create_run(self.experiment_id, run_name=f"tune-{self.variant}", tags=self.tags).info.run_id

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def start_trial(self, parent_run_id: str, number: int) -> str:
        """A child run for trial ``number`` (the caller stores its id in the trial at once,
        then logs the params: a worker killed in between leaves a run the retry can find)."""
        return self.client.create_run(
            self.experiment_id, run_name=f"{self.variant}-trial-{number}",
            tags={**self.tags, "mlflow.parentRunId": parent_run_id, "optuna.trial.number": str(number)},
        ).info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """The trial's training config as params."""
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])

    @staticmethod
    def epoch_logger(run_id: str) -> EpochLogger:
        """The training callback that logs each epoch of the trial into its run, under the
        names training runs use (``epoch_val_auc_macro``, ``epoch_train_loss``...)."""
        return EpochLogger(run_id, prefix=EPOCH_PREFIX)

    def end_trial(self, run_id: str, state: str, status: str, metrics: Mapping[str, float] | None = None,
                  tags: Mapping[str, str] | None = None) -> None:
        """Log the trial's final metrics and tags, tag its Optuna state, end the run with ``status``."""
        for key, value in (metrics or {}).items():
            self.client.log_metric(run_id, key, value)
        for key, value in (tags or {}).items():
            self.client.set_tag(run_id, key, value)
        self.client.set_tag(run_id, "optuna.trial.state", state)
        self.client.set_terminated(run_id, status)


def end_stale_trial_run(run_id: str | None, state: str, why: str = "worker stopped sending heartbeats") -> None:
    """A trial whose worker died (stopped sending heartbeats, or its process is gone): its
    run ends FAILED, saying ``why``."""
    if run_id and run_exists(run_id):
        client = MlflowClient()
        client.set_tag(run_id, "optuna.trial.state", state)
        client.set_tag(run_id, "cxrgaze.error", why)
        client.set_terminated(run_id, "FAILED")


def log_study_summary(run_id: str, metrics: Mapping[str, float], step: int, best_trial: int | None) -> None:
    """Best value and parameters and the trial counts (at ``step`` = trials so far) on the
    study's parent run."""
    client = MlflowClient()
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=step)
    if best_trial is not None:
        client.set_tag(run_id, "optuna.best_trial", str(best_trial))


def log_study_figure(run_id: str, figure: Any, name: str) -> None:
    """A matplotlib figure (an Optuna plot) as artifact ``name`` of the parent run."""
    MlflowClient().log_figure(run_id, figure, name)


def end_study_run(run_id: str, note: str | None = None) -> None:
    """End the parent run FINISHED, with an optional ``cxrgaze.note`` tag."""
    client = MlflowClient()
    if note:
        client.set_tag(run_id, "cxrgaze.note", note)
    client.set_terminated(run_id, "FINISHED")
