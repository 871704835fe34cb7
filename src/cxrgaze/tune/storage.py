"""Where studies live: the Optuna storage of ``tune.storage`` (SQLite, journal file or
PostgreSQL), the stale-trial retry, and the lock that makes the trial budget exact.

SQLite and PostgreSQL (``RDBStorage``) record a heartbeat every ``heartbeat_interval``
seconds while a trial runs; a trial silent for ``grace_period`` seconds (its worker died)
is marked FAIL, its MLflow run ends FAILED, and it is queued again (:data:`MAX_RETRY` times
at most). Optuna 5's ``JournalStorage`` has no heartbeat (it is no ``BaseHeartbeat``):
there each trial records its worker (:data:`WORKER_ATTR`: host, process id and start
time), and a worker checking the budget marks FAIL, and queues again the same way, every
RUNNING trial whose worker on this machine is gone (:func:`fail_dead_workers_trials`).

Every worker checks the budget and creates its next trial while holding a lock shared by
all workers of the study (:func:`gate`: a file lock on one machine, a PostgreSQL advisory
lock across machines).
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy
import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from cxrgaze.config import TuneConfig, storage_kind
from cxrgaze.experiment.trials import end_stale_trial_run
from cxrgaze.outlock import owner_record, process_alive, this_host

MAX_RETRY = 2
"""How many times a trial whose worker died (stale heartbeat, or its process gone) is queued again."""

PARENT_RUN_ATTR = "cxrgaze.mlflow_parent_run_id"
"""Study user attribute: the id of the study's MLflow parent run."""
CONFIG_ATTR = "cxrgaze.training_config"
"""Study user attribute: the training config (less the searched settings) all trials share."""
TRIAL_RUN_ATTR = "cxrgaze.mlflow_run_id"
"""Trial user attribute: the id of the trial's MLflow run."""
WORKER_ATTR = "cxrgaze.worker"
"""Trial user attribute: the worker process running it, ``{"host", "pid", "started"}``
(:func:`cxrgaze.outlock.owner_record`), set before any other worker can see the trial."""


def storage_file(url: str) -> Path:
    """The file of a ``sqlite:///`` or ``journal:`` storage."""
    return Path(url[len("journal:"):] if storage_kind(url) == "journal" else url[len("sqlite:///"):])


def display_storage(url: str) -> str:
    """The storage URL without its password (for logs and MLflow tags)."""
    if storage_kind(url) != "postgresql":
        return url

    return make_url(url).render_as_string(hide_password=True)


def open_storage(cfg: TuneConfig) -> optuna.storages.BaseStorage:
    """The Optuna storage of ``cfg.storage``, with heartbeats and retries where Optuna has them."""
    if storage_kind(cfg.storage) == "journal":
        path = storage_file(cfg.storage)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if storage_kind(cfg.storage) == "sqlite":
        storage_file(cfg.storage).parent.mkdir(parents=True, exist_ok=True)
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


def _retry_stale_trial(study: optuna.Study, trial: FrozenTrial, why: str = "worker stopped sending heartbeats") -> bool:
    """Heartbeat-stale trial (its worker died): end its MLflow run FAILED, queue it again
    unless it was retried :data:`MAX_RETRY` times already; returns whether it was queued."""
    end_stale_trial_run(trial.user_attrs.get(TRIAL_RUN_ATTR), TrialState.FAIL.name, why)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        # Optuna's callback returns without queueing once the retry history is this long.
        retried = len(optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial)) < MAX_RETRY
        # A copy: the callback appends to the trial's own retry-history list, and a storage's
        # cached trial edited so would then count as replaced by a retry (live_trials).
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, copy.deepcopy(trial))
    return retried


def claim_trial(trial: optuna.Trial) -> None:
    """Record this process as ``trial``'s worker (:data:`WORKER_ATTR`)."""
    trial.set_user_attr(WORKER_ATTR, owner_record())


def worker_status(trial: FrozenTrial) -> str:
    """Where the worker of a RUNNING journal trial stands: ``running`` (a live process of this
    machine), ``elsewhere`` (another host: cannot be checked from here) or ``gone`` (a process
    of this machine that no longer runs, or none recorded: every worker records itself while
    it holds the gate, so a trial seen without one lost its worker before it could)."""
    worker = trial.user_attrs.get(WORKER_ATTR)
    if not isinstance(worker, dict) or not isinstance(worker.get("pid"), int):
        return "gone"
    if worker.get("host") != this_host():
        return "elsewhere"
    return "running" if process_alive(worker["pid"], worker.get("started")) else "gone"


def fail_dead_workers_trials(study: optuna.Study) -> list[tuple[int, bool]]:
    """Journal storage: mark the RUNNING trials of dead workers (:func:`worker_status`) FAIL and
    queue them again with the same parameters (as a stale heartbeat does on SQLite and
    PostgreSQL; not once :data:`MAX_RETRY` retries are used up); returns their numbers, each
    with whether it was queued again. Call while holding the gate."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_status(trial) != "gone":
            continue
        worker = trial.user_attrs.get(WORKER_ATTR) or {}
        try:
            if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished meanwhile
        frozen = study._storage.get_trial(trial._trial_id)
        if frozen.state != TrialState.FAIL:
            continue
        why = f"worker process {worker.get('pid', '?')} on {worker.get('host', '?')} is gone"
        failed.append((trial.number, _retry_stale_trial(study, frozen, why)))
    return failed


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


def gate(cfg: TuneConfig, name: str) -> _FileGate | _PostgresGate:
    if storage_kind(cfg.storage) == "postgresql":
        return _PostgresGate(cfg.storage, name)
    return _FileGate(storage_file(cfg.storage), name)


@contextmanager
def held(lock: _FileGate | _PostgresGate) -> Iterator[None]:
    """Hold ``lock`` for the block (releasing it early inside is allowed)."""
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
