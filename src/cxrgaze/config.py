"""One typed source of configuration: ``params.yaml`` sections as frozen dataclasses.

Each DVC stage names the exact ``params.yaml`` keys it reads; the library receives the
resolved dataclass, and checkpoints and MLflow runs carry ``dataclasses.asdict`` of it.
Unknown keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A ``params.yaml`` section that cannot be turned into its dataclass."""


@dataclass(frozen=True)
class DataConfig:
    """How ``prepare`` turns DICOMs and fixations into training arrays (``params.yaml: data``)."""

    image_size: int = 224
    """Side of the square arrays written by ``prepare`` (pixels)."""
    resize: str = "stretch"
    """``stretch``: scale each axis to ``image_size`` like the reference code (aspect ratio
    not kept); ``pad``: scale the long side to ``image_size`` and centre the image on a black
    square (aspect kept). Gaze coordinates go through the same mapping either way."""
    gaze_sigma: float = 150.0
    """Gaussian sigma of the static gaze heatmap, in original-image pixels (reference: 150)."""
    gaze_duration_weighted: bool = False
    """Weight each fixation by its duration ``FPOGD`` instead of +1 (the reference uses +1)."""
    workers: int = 0
    """Decoding processes for ``prepare``; 0 means one per CPU core."""

    def __post_init__(self) -> None:
        if self.resize not in ("stretch", "pad"):
            raise ConfigError(f"data.resize must be 'stretch' or 'pad', got {self.resize!r}")
        if self.image_size < 8:
            raise ConfigError(f"data.image_size must be at least 8, got {self.image_size}")
        if self.gaze_sigma <= 0:
            raise ConfigError(f"data.gaze_sigma must be positive, got {self.gaze_sigma}")


@dataclass(frozen=True)
class SplitConfig:
    """Patient-level train/val/test split (``params.yaml: split``)."""

    seed: int = 42
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    def __post_init__(self) -> None:
        parts = (self.train, self.val, self.test)
        if any(p < 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
            raise ConfigError(f"split fractions must be non-negative and sum to 1, got {parts}")


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, refusing keys it does not know.

    Lists become tuples so that the result stays hashable and frozen.
    """
    mapping = dict(mapping or {})
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in mapping.items()}
    try:
        return cls(**values)
    except TypeError as exc:  # pragma: no cover - dataclass signature errors
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read ``params.yaml`` (or any YAML mapping) into a plain dict."""
    path = Path(path)
    try:
        with path.open() as fh:
            params = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such parameters file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return params


def load_section(cls: type[T], section: str, path: str | Path = "params.yaml") -> T:
    """``from_mapping(cls, load_params(path)[section])`` with errors that name the file."""
    return from_mapping(cls, load_params(path).get(section), where=f"{path}: {section}")


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (for checkpoints, MLflow params, JSON)."""
    return dataclasses.asdict(config)
