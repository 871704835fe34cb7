"""Hyperparameter search of the loss weights with Optuna: ``cxrgaze tune`` and the DVC stage ``tune``.

Set 3's heatmap loss is ``alpha * L(mask, gaze) + (1 - alpha) * L(generator, gaze)``; the
paper treats ``alpha`` as a hyperparameter, and ``gamma`` weighs classification against the
heatmap loss in the U-Net variants. One Optuna study per tuned variant (named
``<tune.study_prefix>-<variant>``) maximises the best ``val_selection`` of a short training
run (``tune.epochs``): the validation macro AUC, less ``train.selection_gaze_weight`` times
the generator map's mass outside the gaze (:func:`cxrgaze.train.validation_record`; the
AUC alone by default), the same score that selects the kept checkpoint. The search covers
the part of ``params.yaml: tune.space`` that the variant uses (:func:`variant_space`, from
:attr:`cxrgaze.variants.Variant.loss_weights`: ``alpha`` for set 3, ``gamma`` for the U-Net
variants, ``mass_weight`` and ``outside_weight`` for sets 1 and 3, ``rrr_weight`` for
``rrr-*``, ``lr`` for all), with a seeded TPE sampler and a median pruner fed the per-epoch
score. Tuning only set 3 over an ``alpha`` range that contains ``unet`` (1) and set 1 (0)
gives set 3 a budget the others lack: for a fair comparison, list every variant in
``tune.variants`` with each one's weights in the space (the ``study`` profile). The best values go to
``outputs/tune/best.yaml`` as per-variant overrides, which the ``train@<variant>`` stages
merge into their config (:func:`load_tuned`, :func:`merge_overrides`); trials never
produce the final models.

Storage (``tune.storage`` or ``--storage``):

* ``sqlite:///optuna.db`` (default): one worker process. Optuna advises against SQLite
  for parallel workers, so ``workers > 1`` is refused.
* ``journal:PATH``: Optuna's journal file, safe for several processes on one machine.
  Optuna 5 has no heartbeat for it: a trial whose process was killed stays RUNNING.
* ``postgresql+psycopg2://USER:PASSWORD@HOST/DB``: workers on several machines.

SQLite and PostgreSQL (``RDBStorage``) record a heartbeat every ``heartbeat_interval``
seconds while a trial runs; a trial silent for ``grace_period`` seconds (its worker died)
is marked FAIL and queued again (:data:`MAX_RETRY` times at most).

Trial budget: ``n_trials`` is the total number of trials a study should hold, whatever
their state (COMPLETE, PRUNED, FAIL, and the RUNNING/WAITING ones under way); a FAIL trial
that was queued again after its worker died is replaced by its retry and not counted. A
rerun therefore adds only the missing trials. Every worker checks the budget and creates
its next trial while holding a lock shared by all workers of the study (a file lock on one
machine, a PostgreSQL advisory lock across machines), so the total is exact: Optuna's own
``MaxTrialsCallback`` checks after a trial and overshoots by up to one trial per worker.

MLflow: one parent run per study (``tune-<variant>``, its id kept as a study user attribute
so that reruns and other workers nest under it) and one child run per trial
(``<variant>-trial-<n>``) with the resolved config as params, per-epoch metrics, and the
trial's final state as tag ``optuna.trial.state``. Run status: COMPLETE -> FINISHED,
PRUNED -> KILLED (stopped early on purpose), FAIL -> FAILED (tag ``cxrgaze.error`` says why).
The parent gets ``best_value``, ``best_<param>``, the trial counts, and the figures
``optimization_history.png`` and ``param_importances.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy
import optuna
import yaml
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from cxrgaze.config import ConfigError, from_mapping
from cxrgaze.variants import VARIANTS, parse_variant
from cxrgaze.errors import reason

SPACE_TARGETS: dict[str, tuple[str, str]] = {
    "alpha": ("loss", "alpha"), "gamma": ("loss", "gamma"), "mass_weight": ("loss", "mass_weight"),
    "outside_weight": ("loss", "outside_weight"), "rrr_weight": ("loss", "rrr_weight"), "lr": ("train", "lr"),
}
"""Search-space names and the ``params.yaml`` section and key each one sets."""

TUNABLE_VARIANTS: tuple[str, ...] = VARIANTS
"""Every variant may be tuned; each searches only the names of ``tune.space`` that it uses
(:func:`variant_space`)."""

MAX_RETRY = 2
"""How many times a trial whose worker died (stale heartbeat) is queued again."""

PARENT_RUN_ATTR = "cxrgaze.mlflow_parent_run_id"
CONFIG_ATTR = "cxrgaze.training_config"
TRIAL_RUN_ATTR = "cxrgaze.mlflow_run_id"
_UNTRACKED_KEYS = ("train.device", "train.eval_batch_size")
"""Settings that do not change a trial's result and may differ between workers."""


@dataclass(frozen=True)
class SearchRange:
    """One dimension of the search space (``tune.space.<name>``)."""

    low: float
    high: float
    log: bool = False
    """Sample on a log scale (learning rates); needs ``low > 0``."""

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ConfigError(f"search range needs low < high, got [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ConfigError(f"a log-scale search range needs low > 0, got {self.low}")


@dataclass(frozen=True)
class TuneConfig:
    """The search (``params.yaml: tune``); the training config comes from model/loss/train/variants."""

    storage: str = "sqlite:///optuna.db"
    """``sqlite:///FILE``, ``journal:FILE`` or ``postgresql+psycopg2://...`` (see the module doc)."""
    study_prefix: str = "cxrgaze"
    """Study name = ``<study_prefix>-<variant>``; a new prefix starts new studies."""
    variants: tuple[str, ...] = ("set3-gbp", "set3-deconv")
    n_trials: int = 20
    """Total trials wanted per study; a rerun adds only the missing ones."""
    epochs: int = 10
    """Training epochs of one trial (replaces ``train.epochs``)."""
    workers: int = 1
    """Worker processes on this machine; more than 1 needs a journal or PostgreSQL storage."""
    seed: int = 0
    """TPE seed: trial ``n`` is sampled with a seed made of ``seed`` and ``n`` (see :func:`trial_sampler`)."""
    space: Mapping[str, SearchRange] = field(default_factory=lambda: {"alpha": SearchRange(0.0, 1.0)})
    n_startup_trials: int = 5
    """Median pruner: no pruning until this many trials have completed."""
    n_warmup_steps: int = 1
    """Median pruner: no pruning in a trial's first epochs (0-based epochs below this)."""
    heartbeat_interval: int = 10
    """Seconds between heartbeats of a running trial (SQLite/PostgreSQL)."""
    grace_period: int = 60
    """Seconds without a heartbeat after which a trial counts as dead and is retried."""

    def __post_init__(self) -> None:
        storage_kind(self.storage)
        if not self.variants or not set(self.variants) <= set(TUNABLE_VARIANTS):
            raise ConfigError(f"tune.variants must be a non-empty list of {', '.join(TUNABLE_VARIANTS)}; got {list(self.variants)}")
        for name in ("n_trials", "epochs", "workers", "heartbeat_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tune.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_startup_trials < 0 or self.n_warmup_steps < 0:
            raise ConfigError("tune.n_startup_trials and tune.n_warmup_steps must be non-negative")
        if self.grace_period <= self.heartbeat_interval:
            raise ConfigError(f"tune.grace_period ({self.grace_period}) must exceed tune.heartbeat_interval "
                              f"({self.heartbeat_interval})")
        if not self.space:
            raise ConfigError(f"tune.space is empty; search at least one of {', '.join(SPACE_TARGETS)}")
        unknown = sorted(set(self.space) - set(SPACE_TARGETS))
        if unknown:
            raise ConfigError(f"tune.space: unknown name(s) {', '.join(unknown)}; choose from {', '.join(SPACE_TARGETS)}")
        for name in ("alpha", "gamma"):
            if name in self.space and not 0.0 <= self.space[name].low < self.space[name].high <= 1.0:
                raise ConfigError(f"tune.space.{name} must lie within [0, 1]")
        for name in ("mass_weight", "outside_weight", "rrr_weight"):
            if name in self.space and self.space[name].low < 0:
                raise ConfigError(f"tune.space.{name} must be non-negative")
        for variant in self.variants:
            if self.space and not variant_space(self.space, variant):
                raise ConfigError(f"tune.variants: {variant} uses none of tune.space ({', '.join(self.space)}); "
                                  "its loss has no such weight")
        if self.workers > 1 and storage_kind(self.storage) == "sqlite":
            raise ConfigError(f"{self.workers} workers on SQLite storage {self.storage}: Optuna advises against SQLite for "
                              "parallel workers; use journal:optuna.journal (one machine) or "
                              "postgresql+psycopg2://USER:PASSWORD@HOST/DB (several machines)")


def variant_space(space: Mapping[str, SearchRange], variant: str) -> dict[str, SearchRange]:
    """The part of ``space`` that ``variant`` uses: a loss weight only where the variant's
    objective has it (:attr:`cxrgaze.variants.Variant.loss_weights`), ``lr`` always. So one
    ``tune.space`` gives every variant the same budget over its own weights."""
    weights = set(parse_variant(variant).loss_weights)
    return {name: r for name, r in space.items() if SPACE_TARGETS[name][0] != "loss" or name in weights}


def tune_config(params: Mapping[str, Any], where: str = "params.yaml", **overrides: Any) -> TuneConfig:
    """The :class:`TuneConfig` of a params mapping's ``tune`` section; ``overrides`` that are
    not None (command-line flags) replace its values before validation."""
    section = dict(params.get("tune") or {})
    section.update({k: v for k, v in overrides.items() if v is not None})
    if "space" in section:
        space = section["space"]
        if not isinstance(space, Mapping) or not all(isinstance(spec, Mapping) for spec in space.values()):
            raise ConfigError(f"{where}: tune.space must map names to {{low, high, log}}")
        section["space"] = {}
        for name, spec in space.items():
            try:
                section["space"][name] = from_mapping(SearchRange, spec, where=f"{where}: tune.space.{name}")
            except ConfigError as exc:
                raise ConfigError(str(exc) if str(exc).startswith(where) else f"{where}: tune.space.{name}: {exc}") from None
    try:
        return from_mapping(TuneConfig, section, where=f"{where}: tune")
    except ConfigError as exc:
        raise ConfigError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None


def storage_kind(url: str) -> str:
    """``sqlite``, ``journal`` or ``postgresql``; anything else is a :class:`ConfigError`."""
    if url.startswith("journal:") and len(url) > len("journal:"):
        return "journal"
    if url.startswith("sqlite:///") and url[len("sqlite:///"):] not in ("", ":memory:"):
        return "sqlite"
    if url.split("://", 1)[0].split("+", 1)[0] == "postgresql" and "://" in url:
        return "postgresql"
    raise ConfigError(f"tune.storage {url!r}: use sqlite:///FILE, journal:FILE or postgresql+psycopg2://USER:PASSWORD@HOST/DB")


def _storage_file(url: str) -> Path:
    """The file of a ``sqlite:///`` or ``journal:`` storage."""
    return Path(url[len("journal:"):] if storage_kind(url) == "journal" else url[len("sqlite:///"):])


def display_storage(url: str) -> str:
    """The storage URL without its password (for logs and MLflow tags)."""
    if storage_kind(url) != "postgresql":
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_storage(cfg: TuneConfig) -> optuna.storages.BaseStorage:
    """The Optuna storage of ``cfg.storage``, with heartbeats and retries where Optuna has them."""
    if storage_kind(cfg.storage) == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = _storage_file(cfg.storage)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if storage_kind(cfg.storage) == "sqlite":
        _storage_file(cfg.storage).parent.mkdir(parents=True, exist_ok=True)
        return _rdb_storage(cfg)
    # Optuna creates its tables on first use; two machines doing it at once collide.
    gate = _PostgresGate(cfg.storage, "cxrgaze: optuna tables")
    gate.acquire()
    try:
        return _rdb_storage(cfg)
    finally:
        gate.close()


def _rdb_storage(cfg: TuneConfig) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.storages.RDBStorage(cfg.storage, heartbeat_interval=cfg.heartbeat_interval,
                                          grace_period=cfg.grace_period,
                                          heartbeat_stale_trial_callback=_retry_stale_trial)


def _retry_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Heartbeat-stale trial (its worker died): end its MLflow run FAILED, queue it again."""
    from mlflow.tracking import MlflowClient

    from cxrgaze.tracking import run_exists

    run_id = trial.user_attrs.get(TRIAL_RUN_ATTR)
    if run_id and run_exists(run_id):
        client = MlflowClient()
        client.set_tag(run_id, "optuna.trial.state", TrialState.FAIL.name)
        client.set_tag(run_id, "cxrgaze.error", "worker stopped sending heartbeats")
        client.set_terminated(run_id, "FAILED")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


def study_name(cfg: TuneConfig, variant: str) -> str:
    return f"{cfg.study_prefix}-{variant}"


def open_study(cfg: TuneConfig, variant: str) -> optuna.Study:
    """Create the variant's study, or load it when it exists (``load_if_exists``)."""
    return optuna.create_study(
        storage=open_storage(cfg), study_name=study_name(cfg, variant), direction="maximize", load_if_exists=True,
        sampler=trial_sampler(cfg.seed, 0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps))


def trial_sampler(seed: int, number: int) -> optuna.samplers.TPESampler:
    """The TPE sampler for trial ``number``, seeded from ``(seed, number)``.

    A sampler seeded once per process would repeat its random start-up proposals in every
    resumed run and in every worker; seeded per trial, a study gives the same trials whether
    it ran at once or in several resumed runs (one worker), and workers never share a seed.
    """
    state = int(numpy.random.SeedSequence([seed, number]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=state)


def live_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials, less those replaced by a retry (a dead worker's FAIL trial)."""
    trials = study.get_trials(deepcopy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        replaced = {n for t in trials for n in optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(t)}
    return [t for t in trials if t.number not in replaced]


# --- overrides: what tuning hands to training -----------------------------------------------


def as_overrides(values: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Search-space values as ``variants.<v>``-shaped overrides: ``{"alpha": 0.6}`` ->
    ``{"loss": {"alpha": 0.6}}``."""
    out: dict[str, dict[str, float]] = {}
    for name, value in values.items():
        section, key = SPACE_TARGETS[name]
        out.setdefault(section, {})[key] = value
    return out


def merge_overrides(params: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]], variant: str) -> dict[str, Any]:
    """A copy of ``params`` whose ``variants.<variant>`` has ``overrides`` merged on top,
    section by section (an override beats the variant's own value)."""
    merged = copy.deepcopy(dict(params))
    variants = dict(merged.get("variants") or {})
    own = dict(variants.get(variant) or {})
    for section, values in overrides.items():
        own[section] = {**(own.get(section) or {}), **values}
    variants[variant] = own
    merged["variants"] = variants
    return merged


def load_tuned(path: str | Path, variant: str) -> dict[str, dict[str, Any]]:
    """The tuned overrides of ``variant`` in a ``best.yaml`` written by :func:`write_best`
    (``{}`` when the variant was not tuned)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no tuning result (run the tune stage first)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    entry = data.get(variant) if isinstance(data, dict) else None
    if entry is None:
        return {}
    if not isinstance(entry, dict) or not all(isinstance(v, dict) for v in entry.values()):
        raise ConfigError(f"{path}: {variant} must map sections (model/loss/train) to overrides")
    return entry


def write_best(path: str | Path, variants: Iterable[str], results: Mapping[str, StudyResult]) -> Path:
    """Write ``best.yaml``: one key per name in ``variants`` (all of ``params.yaml: variants``)
    and in ``results``; the tuned overrides for those in ``results``, an earlier entry of the
    same file for the others, else ``{}``. Each key is a DVC param of its ``train@<variant>`` stage."""
    path = Path(path)
    earlier = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    out = {v: results[v].overrides if v in results else earlier.get(v, {}) for v in dict.fromkeys([*variants, *results])}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("# Written by the tune stage (cxrgaze.tune.write_best): tuned overrides per variant.\n"
                   + yaml.safe_dump(out, sort_keys=False))
    tmp.replace(path)
    return path


# --- results ----------------------------------------------------------------------------------


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


# --- the lock around "is there budget left? -> create the trial" -----------------------------


class _FileGate:
    """An exclusive ``flock`` shared by the processes of one machine (sqlite/journal storages).

    The lock file lives in the temporary folder, keyed by the storage file and study, so
    nothing is left in the project; the OS drops the lock when its process dies.
    """

    def __init__(self, storage_file: Path, name: str) -> None:
        key = hashlib.sha1(f"{storage_file.resolve()}\n{name}".encode()).hexdigest()[:20]
        self._fd = os.open(Path(tempfile.gettempdir()) / f"cxrgaze-tune-{key}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        self._held = False

    def acquire(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._held = True

    def release(self) -> None:
        if self._held:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._held = False

    def close(self) -> None:
        self.release()
        os.close(self._fd)


class _PostgresGate:
    """A PostgreSQL session advisory lock on the study's storage (workers on several machines);
    the server drops it when the worker's connection goes."""

    def __init__(self, url: str, name: str) -> None:
        import sqlalchemy

        self._key = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big", signed=True)
        self._engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
        self._conn = self._engine.connect()
        self._text = sqlalchemy.text
        self._held = False

    def acquire(self) -> None:
        self._conn.execute(self._text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
        self._held = True

    def release(self) -> None:
        if self._held:
            self._conn.execute(self._text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            self._held = False

    def close(self) -> None:
        self.release()
        self._conn.close()
        self._engine.dispose()


def _gate(cfg: TuneConfig, name: str) -> _FileGate | _PostgresGate:
    if storage_kind(cfg.storage) == "postgresql":
        return _PostgresGate(cfg.storage, name)
    return _FileGate(_storage_file(cfg.storage), name)


# --- one worker -------------------------------------------------------------------------------


class _PruningCallback:
    """Training callback: report each epoch's ``val_selection`` (the validation macro AUC,
    less the gaze term when ``train.selection_gaze_weight`` is set); stop a trial the median
    pruner judges worse than the earlier ones."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        value, epoch = record["val_selection"], int(record["epoch"])
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch + 1}: validation selection score {value:.4f} is below the median "
                                     "of earlier trials")


def _training_fingerprint(params: Mapping[str, Any], cfg: TuneConfig, variant: str) -> dict[str, str]:
    """The trial training config with the searched settings left out: trials of one study must share it."""
    from cxrgaze.tracking import flatten
    from cxrgaze.train import resolve_run_config

    config = resolve_run_config(merge_overrides(params, {"train": {"epochs": cfg.epochs}}, variant), variant)
    searched = {".".join(SPACE_TARGETS[name]) for name in variant_space(cfg.space, variant)}
    return {k: v for k, v in flatten(config.as_dict()).items() if k not in searched and k not in _UNTRACKED_KEYS}


class _Worker:
    """Runs trials of one study in this process until the study holds ``cfg.n_trials``."""

    def __init__(self, params: Mapping[str, Any], cfg: TuneConfig, variant: str, prepared: str | Path,
                 split_csv: str | Path) -> None:
        from mlflow.tracking import MlflowClient

        from cxrgaze.runtime import resolve_device
        from cxrgaze.tracking import run_tags, set_experiment
        from cxrgaze.train import resolve_run_config

        self.params, self.cfg, self.variant = params, cfg, variant
        self.prepared, self.split_csv = prepared, split_csv
        self.study = open_study(cfg, variant)
        self.fingerprint = _training_fingerprint(params, cfg, variant)
        self.client = MlflowClient()
        self.experiment_id = set_experiment()
        device = resolve_device(resolve_run_config(params, variant).train.device)
        self.tags = {**run_tags(variant=variant, device=str(device)), "optuna.study": self.study.study_name,
                     "cxrgaze.worker": f"{socket.gethostname()}:{os.getpid()}"}
        self.heartbeat = storage_kind(cfg.storage) != "journal"
        self.gate = _gate(cfg, self.study.study_name)
        self.parent_run_id = ""

    def run(self) -> None:
        try:
            self.gate.acquire()
            try:
                self._check_config()
                self._open_parent_run()
            finally:
                self.gate.release()
            waited = False
            while True:
                self.gate.acquire()
                try:
                    action = self._next_action()
                    if action == "run":
                        # The objective releases the gate as soon as Optuna has created the trial.
                        self.study.optimize(self._objective, n_trials=1, catch=(Exception,))
                finally:
                    self.gate.release()
                if action == "stop":
                    return
                if action == "wait":
                    if not waited:
                        print(f"{self.study.study_name}: all trials started; waiting for those still running "
                              f"(a dead worker's trial is retried {self.cfg.grace_period} s after its last heartbeat)")
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
        from cxrgaze.tracking import run_exists

        run_id = self.study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id and run_exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=f"tune-{self.variant}", tags=self.tags).info.run_id
            self.study.set_user_attr(PARENT_RUN_ATTR, run_id)
        self.client.set_tag(run_id, "optuna.storage", display_storage(self.cfg.storage))
        self.client.set_tag(run_id, "optuna.search_space", json.dumps({k: dataclasses.asdict(v) for k, v in variant_space(self.cfg.space, self.variant).items()}))
        self.client.set_tag(run_id, "optuna.n_trials", str(self.cfg.n_trials))
        self.parent_run_id = run_id

    def _next_action(self) -> str:
        """``run`` a trial (its sampler is seeded here), ``wait`` for trials of other workers
        (they may die and be retried), or ``stop``. Called while holding the gate."""
        if self.heartbeat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
        trials = live_trials(self.study)
        waiting = [t.number for t in trials if t.state == TrialState.WAITING]
        if len(trials) < self.cfg.n_trials or waiting:
            # Optuna runs the first waiting trial, else creates trial number len(all trials).
            number = waiting[0] if waiting else len(self.study.get_trials(deepcopy=False))
            self.study.sampler = trial_sampler(self.cfg.seed, number)
            return "run"
        if self.heartbeat and any(t.state == TrialState.RUNNING for t in trials):
            return "wait"
        return "stop"

    def _objective(self, trial: optuna.Trial) -> float:
        from mlflow.entities import Param

        from cxrgaze.tracking import EpochLogger, flatten
        from cxrgaze.train import resolve_run_config, train

        self.gate.release()
        values = {name: trial.suggest_float(name, r.low, r.high, log=r.log) for name, r in variant_space(self.cfg.space, self.variant).items()}
        overrides = as_overrides(values)
        overrides.setdefault("train", {})["epochs"] = self.cfg.epochs
        config = resolve_run_config(merge_overrides(self.params, overrides, self.variant), self.variant)
        run_id = self.client.create_run(
            self.experiment_id, run_name=f"{self.variant}-trial-{trial.number}",
            tags={**self.tags, "mlflow.parentRunId": self.parent_run_id, "optuna.trial.number": str(trial.number)},
        ).info.run_id
        trial.set_user_attr(TRIAL_RUN_ATTR, run_id)
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in flatten(config.as_dict()).items()])
        state, status = TrialState.FAIL, "FAILED"
        try:
            with tempfile.TemporaryDirectory(prefix=f"cxrgaze-tune-{self.variant}-{trial.number}-") as out:
                result = train(config, self.prepared, self.split_csv, out, callbacks=[EpochLogger(run_id), _PruningCallback(trial)],
                               progress=False, resume=False)
            value = float(result.best.get("val_selection", math.nan))
            if math.isfinite(value):
                state, status = TrialState.COMPLETE, "FINISHED"
                for key in ("val_selection", "val_auc_macro", "val_outside_mass"):
                    self.client.log_metric(run_id, f"best_{key}", float(result.best.get(key, math.nan)))
                self.client.log_metric(run_id, "best_epoch", result.best_epoch)
            else:
                self.client.set_tag(run_id, "cxrgaze.error", "validation selection score is not finite")
            return value
        except optuna.TrialPruned as exc:
            state, status = TrialState.PRUNED, "KILLED"
            self.client.set_tag(run_id, "cxrgaze.pruned", str(exc))
            raise
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            self.client.set_tag(run_id, "cxrgaze.error", reason(exc, 500))
            raise
        finally:
            self.client.set_tag(run_id, "optuna.trial.state", state.name)
            self.client.set_terminated(run_id, status)


def run_worker(params: Mapping[str, Any], cfg: TuneConfig, variant: str, prepared: str | Path,
               split_csv: str | Path) -> None:
    """Run trials of ``variant``'s study in this process until it holds ``cfg.n_trials``
    (the same call on other processes or machines shares the work)."""
    _Worker(params, cfg, variant, prepared, split_csv).run()


def _worker_process(params: dict[str, Any], cfg: TuneConfig, variant: str, prepared: str, split_csv: str,
                    threads: int) -> None:
    """Entry of a spawned worker process: share the CPU cores fairly, then work."""
    import torch

    torch.set_num_threads(threads)
    run_worker(params, cfg, variant, prepared, split_csv)


# --- a whole study ----------------------------------------------------------------------------


def _log_summary(study: optuna.Study, result: StudyResult) -> None:
    """Best value and parameters, trial counts and figures on the study's parent run."""
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient
    from optuna.visualization import matplotlib as optuna_plots

    run_id = result.parent_run_id
    if run_id is None:
        return
    client = MlflowClient()
    step = sum(result.states.values())
    metrics = {k: float(v) for k, v in result.to_metrics().items() if v is not None and k != "best_trial"}
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=step)
    if result.best_trial is not None:
        client.set_tag(run_id, "optuna.best_trial", str(result.best_trial))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        figure = optuna_plots.plot_optimization_history(study).figure
        client.log_figure(run_id, figure, "optimization_history.png")
        plt.close(figure)
        if result.states["COMPLETE"] >= 2:
            figure = optuna_plots.plot_param_importances(study).figure
            client.log_figure(run_id, figure, "param_importances.png")
            plt.close(figure)
        else:
            note = f"param_importances.png skipped: needs 2 completed trials, the study has {result.states['COMPLETE']}"
            client.set_tag(run_id, "cxrgaze.note", note)
            print(f"{study.study_name}: {note}")
    client.set_terminated(run_id, "FINISHED")


def run_study(params: Mapping[str, Any], cfg: TuneConfig, variant: str, prepared: str | Path,
              split_csv: str | Path) -> StudyResult:
    """Tune ``variant`` with ``cfg.workers`` processes on this machine until its study holds
    ``cfg.n_trials`` trials; log the summary to the study's MLflow parent run.

    Raises ``RuntimeError`` when a worker process fails or no trial completed.
    """
    from cxrgaze.tracking import set_experiment

    if variant not in TUNABLE_VARIANTS:
        raise ConfigError(f"cannot tune {variant!r}: choose from {', '.join(TUNABLE_VARIANTS)}")
    set_experiment()  # created once here, not raced by the workers
    study = open_study(cfg, variant)  # likewise the study
    if cfg.workers == 1:
        run_worker(params, cfg, variant, prepared, split_csv)
    else:
        context = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // cfg.workers)
        procs = [context.Process(target=_worker_process, name=f"tune-{variant}-{k}",
                                 args=(dict(params), cfg, variant, str(prepared), str(split_csv), threads))
                 for k in range(cfg.workers)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
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
