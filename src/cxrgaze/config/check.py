"""Every section of a params mapping checked at once: :func:`check_params`.

A command reads only some sections, but a bad value in another one is an error too, and it
is reported where the file is loaded (``cxrgaze train --variant unet`` refuses a bad
``variants.set3-gbp`` override or ``evaluate.n_resamples``), not first by the stage that
happens to use it.
"""

from __future__ import annotations

from typing import Any, Mapping

from cxrgaze.config.core import ConfigError, as_mapping, from_mapping
from cxrgaze.config.data import DataConfig, SplitConfig
from cxrgaze.config.evaluate import RegisterConfig, eval_config
from cxrgaze.config.run import resolve_run_config, run_seeds
from cxrgaze.config.tune import tune_config
from cxrgaze.variants import VARIANTS

RUN_SECTIONS = ("model", "loss", "train", "variants")
"""The sections that make a variant's training config (:func:`resolve_run_config`)."""


def check_params(params: Mapping[str, Any], where: str = "params.yaml") -> None:
    """Check every section present in ``params`` (a file's mapping; ``where`` names the file
    in messages): ``data``, ``split``, ``evaluate``, ``register``, ``tune``, and the training
    config of each variant listed in ``variants`` (of every variant in
    :data:`cxrgaze.variants.VARIANTS` when there is no such list) from ``model``, ``loss``,
    ``train`` and its own overrides. Raises a :class:`ConfigError` naming the dotted key."""
    params = as_mapping(params, where)
    if "data" in params:
        from_mapping(DataConfig, params["data"], where=f"{where}: data")
    if "split" in params:
        from_mapping(SplitConfig, params["split"], where=f"{where}: split")
    if any(name in params for name in RUN_SECTIONS):
        variants = list(as_mapping(params.get("variants"), f"{where}: variants")) or list(VARIANTS)
        run_seeds(params, where)
        for variant in variants:
            try:
                resolve_run_config(params, variant, where=where)
            except ConfigError as exc:
                if str(exc).startswith(where):
                    raise
                raise ConfigError(f"{where}: variants.{variant}: {exc}") from None  # an unknown variant name
    if "evaluate" in params:
        eval_config(params, where)
    if "register" in params:
        from_mapping(RegisterConfig, params["register"], where=f"{where}: register")
    if "tune" in params:
        tune_config(params, where)
