"""Loading configuration: ``params.yaml`` (and profile overlays) into frozen dataclasses.

:func:`from_mapping` builds any config dataclass from a mapping and refuses keys it does not
know (a typo must not silently fall back to a default); :func:`overlay` merges a profile
(``profiles/*.yaml``, which states only what differs) into ``params.yaml``'s mapping.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A ``params.yaml`` section that cannot be turned into its dataclass."""


def non_negative(value: Any) -> bool:
    """A finite number >= 0 (not a bool, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


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


def overlay(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, mapping by mapping (a profile overlay: it states
    only what differs; a list or a scalar in ``changes`` replaces the base's value)."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = overlay(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_section(cls: type[T], section: str, path: str | Path = "params.yaml") -> T:
    """``from_mapping(cls, load_params(path)[section])`` with errors that name the file."""
    return from_mapping(cls, load_params(path).get(section), where=f"{path}: {section}")


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (for checkpoints, MLflow params, JSON)."""
    return dataclasses.asdict(config)
