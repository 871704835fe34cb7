"""Tracked steps, one home for every MLflow run: training, evaluation, tuning trials, report.

The library's :func:`cxrgaze.train.train`, :func:`cxrgaze.evaluate.evaluate` and
:mod:`cxrgaze.tune` know nothing of MLflow; the CLI, the DVC stages and the tuning workers
go through these:

- :mod:`~cxrgaze.experiment.training`: :func:`train_tracked` (run ``<variant>``).
- :mod:`~cxrgaze.experiment.evaluation`: :func:`evaluate_tracked` (into the training run),
  :func:`evaluation_run` (the ``report`` and ``register`` stages find an evaluation's run by
  its ``metrics.json``, so no stage output holds a run id), :func:`register_evaluated`.
- :mod:`~cxrgaze.experiment.trials`: a parent run per Optuna study, a child run per trial.
- :mod:`~cxrgaze.experiment.report`: :func:`log_report` (run ``report``).
- :mod:`~cxrgaze.experiment.delivery`: a training run's records through tracking outages
  (:class:`TrackingGuard`: queued in the output folder, sent when the server answers again).

:mod:`cxrgaze.tracking` holds the shared pieces (tags, run lookup, ``run.json``);
:mod:`cxrgaze.registry` and :mod:`cxrgaze.serving` own the registry and the pyfunc model.

Import from the submodules: the package imports none of them, so that a DVC stage depends
only on the code it runs (``tests/test_dvc_deps.py``).
"""
