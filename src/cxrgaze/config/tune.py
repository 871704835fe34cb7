"""The tuning section, ``params.yaml: tune``: the Optuna search (:class:`TuneConfig`), its
space (:class:`SearchRange` per name of :data:`SPACE_TARGETS`) and the storage URL kinds.

What each setting does is explained in :mod:`cxrgaze.tune`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from cxrgaze.config.core import ConfigError, as_mapping, from_mapping
from cxrgaze.variants import VARIANTS, parse_variant

SPACE_TARGETS: dict[str, tuple[str, str]] = {
    "alpha": ("loss", "alpha"), "gamma": ("loss", "gamma"), "mass_weight": ("loss", "mass_weight"),
    "outside_weight": ("loss", "outside_weight"), "rrr_weight": ("loss", "rrr_weight"), "lr": ("train", "lr"),
}
"""Search-space names and the ``params.yaml`` section and key each one sets."""

TUNABLE_VARIANTS: tuple[str, ...] = VARIANTS
"""Every variant may be tuned; each searches only the names of ``tune.space`` that it uses
(:func:`variant_space`)."""


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
    """TPE seed: trial ``n`` is sampled with a seed made of ``seed`` and ``n`` (see :func:`cxrgaze.tune.storage.trial_sampler`)."""
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
    section = as_mapping(params.get("tune"), f"{where}: tune")
    section.update({k: v for k, v in overrides.items() if v is not None})
    if "space" in section:
        space = section["space"]
        if not isinstance(space, Mapping):
            raise ConfigError(f"{where}: tune.space must map names to {{low, high, log}}")
        section["space"] = {name: from_mapping(SearchRange, spec, where=f"{where}: tune.space.{name}")
                            for name, spec in space.items()}
    return from_mapping(TuneConfig, section, where=f"{where}: tune")


def storage_kind(url: str) -> str:
    """``sqlite``, ``journal`` or ``postgresql``; anything else is a :class:`ConfigError`."""
    if url.startswith("journal:") and len(url) > len("journal:"):
        return "journal"
    if url.startswith("sqlite:///") and url[len("sqlite:///"):] not in ("", ":memory:"):
        return "sqlite"
    if url.split("://", 1)[0].split("+", 1)[0] == "postgresql" and "://" in url:
        return "postgresql"
    raise ConfigError(f"tune.storage {url!r}: use sqlite:///FILE, journal:FILE or postgresql+psycopg2://USER:PASSWORD@HOST/DB")
