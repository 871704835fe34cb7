"""Training of every variant: ``train(config) -> TrainResult``.

The CLI, the DVC stage, the Optuna objective and the tests all call :func:`train`.

- :mod:`cxrgaze.train.loop`: :func:`train`, validation after each epoch, checkpoints.
- :mod:`cxrgaze.train.step`: optimizer, schedule, seeded batch order, one epoch of steps.
- :mod:`cxrgaze.train.sharding`: one global batch cut into shards over ranks and micro-batches.

What a run guarantees:

* The checkpoint kept as ``best.pt`` is the epoch with the best ``val_selection``: the
  *validation* macro AUC, minus ``train.selection_gaze_weight`` times the generator map's
  mass outside the gaze on validation when that weight is set (ties: the earlier epoch);
  test data is never seen here.
* ``last.pt`` is written atomically at the end of every epoch with the model, optimizer,
  scheduler and RNG state. A killed run started again with the same config resumes from
  it and, on CPU, finishes with exactly the result of an uninterrupted run: the batch
  order of epoch ``e`` comes from a generator seeded with ``(seed, e)`` and the global
  torch RNG (dropout) is restored from the checkpoint.
* A NaN or infinite loss stops the run with :class:`TrainingDiverged` naming the epoch
  and batch; ``last.pt`` and ``best.pt`` from the last good epoch stay.
* Callbacks (``on_epoch_end(record)``) see each epoch's record: MLflow logging and Optuna
  pruning plug in there without this module knowing about either.
* Under ``torchrun --nproc_per_node=N`` (or with ``micro_batches=k``) each global batch of
  ``train.batch_size`` images is cut into contiguous shards whose gradients are summed
  before clipping and the optimizer step (:mod:`cxrgaze.distributed` explains the design
  and why it does not use ``DistributedDataParallel``); rank 0 alone evaluates, prints
  and writes files, and every rank returns the same history.
"""

from cxrgaze.train.loop import EpochCallback, TrainResult, evaluate_split, train, validation_record, write_history_csv
from cxrgaze.train.step import TrainingDiverged

__all__ = ["EpochCallback", "TrainResult", "TrainingDiverged", "evaluate_split", "train", "validation_record",
           "write_history_csv"]
