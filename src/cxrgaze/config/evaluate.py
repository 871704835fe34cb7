"""The sections of the stages after training: ``params.yaml: evaluate`` (with its one loader
:func:`eval_config`, used by the CLI and the ``evaluate`` and ``report`` stages) and
``register`` (:class:`RegisterConfig`, see :mod:`cxrgaze.registry`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from cxrgaze.config.core import ConfigError, as_mapping, from_mapping


@dataclass(frozen=True)
class EvalConfig:
    """``params.yaml: evaluate``."""

    n_resamples: int = 2000
    """Percentile bootstrap: full-size resamples."""
    confidence: float = 0.95
    paper_resamples: int = 30
    """The paper's protocol: resamples ..."""
    paper_size: tuple[int, int] = (55, 60)
    """... of a size drawn uniformly from this inclusive range."""
    seed: int = 0
    panel_per_class: int = 2
    """Heatmap panel: up to this many right and this many wrong test cases per class."""
    batch_size: int = 32
    device: str = "auto"
    calibration_bins: int = 15
    """Equal-width bins of the expected calibration error and the reliability diagram
    (``cxrgaze.evaluation.calibration.DEFAULT_BINS``; a test keeps the two equal)."""
    specificity: float = 0.9
    """Operating point: sensitivity per class at this specificity (with a bootstrap CI)."""
    sanity_images: int = 16
    """Images per split (balanced over classes) used by the generator sanity checks."""

    def __post_init__(self) -> None:
        if self.calibration_bins < 2 or not 0.5 <= self.specificity < 1.0 or self.sanity_images < 2:
            raise ConfigError("evaluate: calibration_bins must be >= 2, specificity in [0.5, 1) and sanity_images >= 2; "
                              f"got {self.calibration_bins}, {self.specificity}, {self.sanity_images}")
        if self.n_resamples < 100:
            raise ConfigError(f"evaluate.n_resamples must be at least 100, got {self.n_resamples}")
        if not 0.5 < self.confidence < 1.0:
            raise ConfigError(f"evaluate.confidence must be in (0.5, 1), got {self.confidence}")
        low, high = tuple(self.paper_size)
        if not 1 <= low <= high:
            raise ConfigError(f"evaluate.paper_size must be [low, high] with 1 <= low <= high, got {self.paper_size}")
        object.__setattr__(self, "paper_size", (int(low), int(high)))


def eval_config(params: Mapping[str, Any] | None, where: str | None = "params.yaml", **overrides: Any) -> EvalConfig:
    """The :class:`EvalConfig` of a params mapping's ``evaluate`` section (defaults without
    one); ``overrides`` that are not None (command-line flags) replace its values. Errors
    name ``where`` (the file)."""
    where = f"{where}: evaluate" if where else "evaluate"
    section = as_mapping((params or {}).get("evaluate"), where)
    section.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(EvalConfig, section, where=where)


GATE_KEYS = ("min_gaze_cc", "require_sanity")


@dataclass(frozen=True)
class RegisterConfig:
    """``params.yaml: register``."""

    model_name: str = "cxrgaze"
    alias: str = "champion"
    min_delta: float = 0.0
    """The champion moves only when a candidate's validation macro AUC is higher by more than this."""
    metric: str = "val_auc_macro"
    gate: Mapping[str, Any] | None = field(default_factory=dict)
    """Explanation gate on validation evidence (empty: none). ``min_gaze_cc``: the
    generator map's mean CC with the gaze on validation must reach this; ``require_sanity``:
    the generator must pass the sanity checks (parameter randomisation, input dependence)."""

    def __post_init__(self) -> None:
        gate = dict(self.gate or {})
        unknown = sorted(set(gate) - set(GATE_KEYS))
        if unknown:
            raise ConfigError(f"register.gate: unknown key(s) {', '.join(unknown)}; expected {', '.join(GATE_KEYS)}")
        cc = gate.get("min_gaze_cc")
        if cc is not None and (isinstance(cc, bool) or not isinstance(cc, (int, float)) or not -1.0 <= cc <= 1.0):
            raise ConfigError(f"register.gate.min_gaze_cc must be null or a number in [-1, 1], got {cc!r}")
        if not isinstance(gate.get("require_sanity", False), bool):
            raise ConfigError(f"register.gate.require_sanity must be true or false, got {gate['require_sanity']!r}")
        object.__setattr__(self, "gate", gate)
        if not 0.0 <= self.min_delta < 1.0:
            raise ConfigError(f"register.min_delta must be in [0, 1), got {self.min_delta}")
        if not self.model_name or not self.alias:
            raise ConfigError("register.model_name and register.alias must not be empty")
