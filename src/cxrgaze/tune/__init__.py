"""Hyperparameter search of the loss weights with Optuna: ``cxrgaze tune`` and the DVC stage ``tune``.

Set 3's heatmap loss is ``alpha * L(mask, gaze) + (1 - alpha) * L(generator, gaze)``; the
paper treats ``alpha`` as a hyperparameter, and ``gamma`` weighs classification against the
heatmap loss in the U-Net variants. One Optuna study per tuned variant (named
``<tune.study_prefix>-<variant>``) maximises the best ``val_selection`` of a short training
run (``tune.epochs``): the validation macro AUC, less ``train.selection_gaze_weight`` times
the generator map's mass outside the gaze (:func:`cxrgaze.train.validation_record`; the
AUC alone by default), the same score that selects the kept checkpoint. The search covers
the part of ``params.yaml: tune.space`` that the variant uses (:func:`cxrgaze.config.variant_space`, from
:attr:`cxrgaze.variants.Variant.loss_weights`: ``alpha`` for set 3, ``gamma`` for the U-Net
variants, ``mass_weight`` and ``outside_weight`` for sets 1 and 3, ``rrr_weight`` for
``rrr-*``, ``lr`` for all), with a seeded TPE sampler and a median pruner fed the per-epoch
score. Tuning only set 3 over an ``alpha`` range that contains ``unet`` (1) and set 1 (0)
gives set 3 a budget the others lack: for a fair comparison, list every variant in
``tune.variants`` with each one's weights in the space (the ``study`` profile). The best values go to
``best.yaml`` (:func:`~cxrgaze.tune.overrides.write_best`) as per-variant overrides, which the ``train@<variant>`` stages
merge into their config (:func:`~cxrgaze.tune.overrides.load_tuned`, :func:`~cxrgaze.tune.overrides.merge_overrides`); trials never
produce the final models.

Storage (``tune.storage`` or ``--storage``):

* ``sqlite:///optuna.db`` (default): one worker process. Optuna advises against SQLite
  for parallel workers, so ``workers > 1`` is refused.
* ``journal:PATH``: Optuna's journal file, safe for several processes on one machine.
  Optuna 5 has no heartbeat for it: each trial records its worker's host and process id
  instead, and a worker that finds a RUNNING trial whose process on this machine is gone
  (killed) marks it FAIL and queues it again, at start and whenever it checks the budget
  (:func:`cxrgaze.tune.storage.fail_dead_workers_trials`).
* ``postgresql+psycopg2://USER:PASSWORD@HOST/DB``: workers on several machines.

SQLite and PostgreSQL (``RDBStorage``) record a heartbeat every ``heartbeat_interval``
seconds while a trial runs; a trial silent for ``grace_period`` seconds (its worker died)
is marked FAIL and queued again (:data:`cxrgaze.tune.storage.MAX_RETRY` times at most).
A worker with no trial left to start waits for the running ones (polling every
``heartbeat_interval`` seconds), to take over a dead worker's retry; on a journal file it
waits only for trials of live workers of this machine.

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
PRUNED -> FINISHED (stopped early on purpose: tag ``cxrgaze.pruned`` says why), FAIL -> FAILED
(tag ``cxrgaze.error`` says why); see :mod:`cxrgaze.experiment.trials`.
The parent gets ``best_value``, ``best_<param>``, the trial counts, and the figures
``optimization_history.png`` and ``param_importances.png``.

Modules: :mod:`~cxrgaze.tune.storage` (storages, heartbeats, the budget lock),
:mod:`~cxrgaze.tune.worker` (one worker's trials), :mod:`~cxrgaze.tune.study` (a whole
study and its summary), :mod:`~cxrgaze.tune.overrides` (what tuning hands to training).
The settings are :class:`cxrgaze.config.TuneConfig`; the MLflow runs are
:mod:`cxrgaze.experiment.trials`. Import from the submodules: the package imports none
of them, so that a DVC stage depends only on the code it runs (``tests/test_dvc_deps.py``).
"""
