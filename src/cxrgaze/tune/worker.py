"""One tuning worker: runs trials of one study in this process until the study holds
``tune.n_trials`` (:func:`run_worker`); the same call on other processes or machines
shares the work.

A trial trains the variant for ``tune.epochs`` with the sampled loss weights merged into
its config, reports each epoch's ``val_selection`` to the median pruner
(:class:`_PruningCallback`) and returns the best one. Its MLflow run is kept by
:class:`cxrgaze.experiment.trials.StudyRuns`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import optuna
import torch
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from cxrgaze.config import SPACE_TARGETS, ConfigError, TuneConfig, resolve_run_config, storage_kind, variant_space
from cxrgaze.errors import reason
from cxrgaze.experiment.training import run_params
from cxrgaze.experiment.trials import StudyRuns
from cxrgaze.runtime import resolve_device
from cxrgaze.tracking import flatten
from cxrgaze.train import train
from cxrgaze.tune.overrides import as_overrides, merge_overrides
from cxrgaze.tune.storage import (CONFIG_ATTR, MAX_RETRY, PARENT_RUN_ATTR, TRIAL_RUN_ATTR, claim_trial,
                                  display_storage, fail_dead_workers_trials, gate, held, live_trials, open_study,
                                  trial_sampler, worker_status)

UNTRACKED_KEYS = ("train.device", "train.eval_batch_size")
"""Settings that do not change a trial's result and may differ between workers."""


class _PruningCallback:
    """Training callback: report each epoch's ``val_selection`` (the validation macro AUC,
    less the gaze term when ``train.selection_gaze_weight`` is set); stop a trial the
    median pruner judges worse than the earlier ones."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        value, epoch = record["val_selection"], int(record["epoch"])
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch + 1}: validation selection score {value:.4f} is below the median "
                                     "of earlier trials")


def training_fingerprint(params: Mapping[str, Any], cfg: TuneConfig, variant: str) -> dict[str, str]:
    """The trial training config with the searched settings left out: trials of one study must share it."""
    config = resolve_run_config(merge_overrides(params, {"train": {"epochs": cfg.epochs}}, variant), variant)
    searched = {".".join(SPACE_TARGETS[name]) for name in variant_space(cfg.space, variant)}
    return {k: v for k, v in flatten(config.as_dict()).items() if k not in searched and k not in UNTRACKED_KEYS}


class _Worker:
    """Runs trials of one study in this process until the study holds ``cfg.n_trials``."""

    def __init__(self, params: Mapping[str, Any], cfg: TuneConfig, variant: str, prepared: str | Path,
                 split_csv: str | Path) -> None:
        self.params, self.cfg, self.variant = params, cfg, variant
        self.prepared, self.split_csv = prepared, split_csv
        self.study = open_study(cfg, variant)
        self.fingerprint = training_fingerprint(params, cfg, variant)
        device = resolve_device(resolve_run_config(params, variant).train.device)
        self.runs = StudyRuns(variant, str(device), {"optuna.study": self.study.study_name,
                                                     "cxrgaze.worker": f"{socket.gethostname()}:{os.getpid()}"})
        self.heartbeat = storage_kind(cfg.storage) != "journal"
        self.gate = gate(cfg, self.study.study_name)
        self.parent_run_id = ""

    def run(self) -> None:
        try:
            with held(self.gate):
                self._check_config()
                self._open_parent_run()
            waited = False
            while True:
                with held(self.gate):
                    action = self._next_action()
                    if action == "run":
                        # The objective releases the gate as soon as Optuna has created the trial.
                        self.study.optimize(self._objective, n_trials=1, catch=(Exception,))
                if action == "stop":
                    return
                if action == "wait":
                    if not waited:
                        when = (f"{self.cfg.grace_period} s after its last heartbeat" if self.heartbeat
                                else "once its process is gone")
                        print(f"{self.study.study_name}: all trials started; waiting for those still running "
                              f"(a dead worker's trial is retried {when})")
                    waited = True
                    time.sleep(self.cfg.heartbeat_interval)
        finally:
            self.gate.close()

    def _check_config(self) -> None:
        stored = self.study.user_attrs.get(CONFIG_ATTR)
        if stored is None:
            self.study.set_user_attr(CONFIG_ATTR, self.fingerprint)
            return
        changed = sorted(k for k in set(stored) | set(self.fingerprint) if stored.get(k) != self.fingerprint.get(k))
        if changed:
            diff = ", ".join(f"{k}: {stored.get(k)} -> {self.fingerprint.get(k)}" for k in changed[:4])
            raise ConfigError(f"study {self.study.study_name} in {display_storage(self.cfg.storage)} was run with another "
                              f"training config ({diff}{', ...' if len(changed) > 4 else ''}); choose a new "
                              "tune.study_prefix to start a new study, or delete the old one")

    def _open_parent_run(self) -> None:
        existing = self.study.user_attrs.get(PARENT_RUN_ATTR)
        run_id = self.runs.open_parent(existing)
        if run_id != existing:
            self.study.set_user_attr(PARENT_RUN_ATTR, run_id)
        space = {k: dataclasses.asdict(v) for k, v in variant_space(self.cfg.space, self.variant).items()}
        self.runs.set_tags(run_id, {"optuna.storage": display_storage(self.cfg.storage),
                                    "optuna.search_space": json.dumps(space), "optuna.n_trials": str(self.cfg.n_trials)})
        self.parent_run_id = run_id

    def _next_action(self) -> str:
        """``run`` a trial (its sampler is seeded here), ``wait`` for trials of other workers
        (they may die and be retried), or ``stop``. Called while holding the gate. Dead
        workers' trials are failed and queued again first: by heartbeat (SQLite, PostgreSQL)
        or, on a journal file, by their worker's process (:func:`fail_dead_workers_trials`)."""
        if self.heartbeat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
        else:
            for number, retried in fail_dead_workers_trials(self.study):
                outcome = " and queued again" if retried else f", not retried (MAX_RETRY={MAX_RETRY} reached)"
                print(f"{self.study.study_name}: trial {number} lost its worker (process gone); marked FAIL{outcome}")
        trials = live_trials(self.study)
        waiting = [t.number for t in trials if t.state == TrialState.WAITING]
        if len(trials) < self.cfg.n_trials or waiting:
            # Optuna runs the first waiting trial, else creates trial number len(all trials).
            number = waiting[0] if waiting else len(self.study.get_trials(deepcopy=False))
            self.study.sampler = trial_sampler(self.cfg.seed, number)
            return "run"
        # A journal trial is waited for only where its worker can be watched (this machine).
        if any(t.state == TrialState.RUNNING and (self.heartbeat or worker_status(t) == "running") for t in trials):
            return "wait"
        return "stop"

    def _objective(self, trial: optuna.Trial) -> float:
        claim_trial(trial)  # before the gate opens: other workers then see whose trial it is
        self.gate.release()
        values = {name: trial.suggest_float(name, r.low, r.high, log=r.log)
                  for name, r in variant_space(self.cfg.space, self.variant).items()}
        overrides = as_overrides(values)
        overrides.setdefault("train", {})["epochs"] = self.cfg.epochs
        config = resolve_run_config(merge_overrides(self.params, overrides, self.variant), self.variant)
        run_id = self.runs.start_trial(self.parent_run_id, trial.number)
        trial.set_user_attr(TRIAL_RUN_ATTR, run_id)
        self.runs.log_params(run_id, run_params(config.as_dict()))
        state, status, metrics, tags = TrialState.FAIL, "FAILED", {}, {}
        try:
            with tempfile.TemporaryDirectory(prefix=f"cxrgaze-tune-{self.variant}-{trial.number}-") as out:
                result = train(config, self.prepared, self.split_csv, out, progress=False, resume=False,
                               callbacks=[self.runs.epoch_logger(run_id), _PruningCallback(trial)])
            value = float(result.best.get("val_selection", math.nan))
            if math.isfinite(value):
                state, status = TrialState.COMPLETE, "FINISHED"
                metrics = {"objective": value, **{f"best_{key}": float(result.best.get(key, math.nan))
                                                  for key in ("val_selection", "val_auc_macro", "val_outside_mass")}}
                metrics["best_epoch"] = result.best_epoch + 1  # 1-based, as the console says
            else:
                tags["cxrgaze.error"] = "validation selection score is not finite"
            return value
        except optuna.TrialPruned as exc:
            state, status = TrialState.PRUNED, "FINISHED"  # stopped on purpose: not a failure
            tags["cxrgaze.pruned"] = str(exc)
            raise
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            tags["cxrgaze.error"] = reason(exc, 500)
            raise
        finally:
            self.runs.end_trial(run_id, state.name, status, metrics, tags)


def run_worker(params: Mapping[str, Any], cfg: TuneConfig, variant: str, prepared: str | Path,
               split_csv: str | Path) -> None:
    """Run trials of ``variant``'s study in this process until it holds ``cfg.n_trials``
    (the same call on other processes or machines shares the work)."""
    _Worker(params, cfg, variant, prepared, split_csv).run()


def worker_process(params: dict[str, Any], cfg: TuneConfig, variant: str, prepared: str, split_csv: str,
                   threads: int) -> None:
    """Entry of a spawned worker process: share the CPU cores fairly, then work."""
    torch.set_num_threads(threads)
    run_worker(params, cfg, variant, prepared, split_csv)
