"""All typed configuration, one home: ``params.yaml`` sections as frozen dataclasses.

Each DVC stage names the exact ``params.yaml`` keys it reads; the library receives the
resolved dataclass, and checkpoints and MLflow runs carry ``dataclasses.asdict`` of it.
Unknown keys are an error (a typo must not silently fall back to a default), and so is a
value of the wrong type or out of range: the message names the dotted key, the value and
what is expected (``params.yaml: train.lr: 'fast' is not a number``).

- :mod:`cxrgaze.config.core`: loading, :func:`from_mapping`, profile :func:`overlay`.
- :mod:`cxrgaze.config.data`: ``data`` and ``split``.
- :mod:`cxrgaze.config.run`: ``model``, ``loss``, ``train``, ``variants.<name>`` -> :class:`RunConfig`.
- :mod:`cxrgaze.config.evaluate`: ``evaluate`` and ``register``.
- :mod:`cxrgaze.config.tune`: ``tune``.
- :mod:`cxrgaze.config.check`: :func:`check_params`, every section of a params file at once.
"""

from cxrgaze.config.check import check_params
from cxrgaze.config.core import ConfigError, from_mapping, load_params, load_section, non_negative, overlay, to_dict
from cxrgaze.config.data import DataConfig, SplitConfig
from cxrgaze.config.evaluate import EvalConfig, RegisterConfig, eval_config
from cxrgaze.config.run import LossConfig, ModelConfig, RunConfig, TrainConfig, resolve_run_config, run_seeds
from cxrgaze.config.tune import (SPACE_TARGETS, TUNABLE_VARIANTS, SearchRange, TuneConfig, storage_kind, tune_config,
                                 variant_space)
from cxrgaze.variants import VARIANTS

__all__ = [
    "ConfigError", "from_mapping", "load_params", "load_section", "non_negative", "overlay", "to_dict",
    "DataConfig", "SplitConfig", "EvalConfig", "RegisterConfig", "eval_config",
    "LossConfig", "ModelConfig", "RunConfig", "TrainConfig", "resolve_run_config", "run_seeds",
    "SPACE_TARGETS", "TUNABLE_VARIANTS", "SearchRange", "TuneConfig", "storage_kind", "tune_config", "variant_space",
    "VARIANTS", "check_params",
]
