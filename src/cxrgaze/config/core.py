"""Loading configuration: ``params.yaml`` (and profile overlays) into frozen dataclasses.

:func:`from_mapping` builds any config dataclass from a mapping. It refuses keys the
dataclass does not know (a typo must not silently fall back to a default), keys it needs
and lacks, and values of the wrong type (:func:`check_mapping`, driven by the fields'
annotations), before the dataclass's own range checks run. Every message names the
setting by its dotted key and says what was expected:
``params.yaml: train.lr: 'fast' is not a number``,
``params.yaml: train.lr must be positive, got -1``.

:func:`overlay` merges a profile (``profiles/*.yaml``, which states only what differs)
into ``params.yaml``'s mapping.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A ``params.yaml`` section that cannot be turned into its dataclass."""


def non_negative(value: Any) -> bool:
    """A finite number >= 0 (not a bool, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, every value checked (:func:`check_mapping`).

    ``where`` names the mapping in messages, usually ``"FILE: section"`` (``"params.yaml:
    train"``): a type error names ``params.yaml: train.lr``, and a range check of the
    dataclass (``train.lr must be positive, got -1``) gets the file in front of it.
    """
    values = check_mapping(cls, mapping, where)
    missing = [f.name for f in fields(cls)  # type: ignore[arg-type]
               if f.default is MISSING and f.default_factory is MISSING and f.name not in values]
    if missing:
        raise ConfigError(f"{where or cls.__name__}: missing key(s) {', '.join(missing)}")
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(_located(where, str(exc))) from None


def check_mapping(cls: type, mapping: Mapping[str, Any] | None, where: str = "") -> dict[str, Any]:
    """The values of ``mapping`` for dataclass ``cls``, each checked against its field's
    annotation by :func:`check_value` (key ``<where>.<field>``); unknown keys are refused.

    Used alone for a partial mapping, such as a variant's overrides of a section.
    """
    where = where or cls.__name__
    mapping = as_mapping(mapping, where)
    hints = get_type_hints(cls)
    unknown = sorted(set(mapping) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    return {key: check_value(value, hints[key], f"{where}.{key}") for key, value in mapping.items()}


def as_mapping(value: Any, key: str) -> dict[str, Any]:
    """A section ``value`` as a dict (``{}`` for null or absent); a ConfigError naming ``key``
    (``params.yaml: variants.unet``) for anything else."""
    if value is not None and not isinstance(value, Mapping):
        raise ConfigError(f"{key}: {value!r} is not a mapping")
    return dict(value or {})


def check_value(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the annotation ``hint`` wants it, or a ConfigError ``key: value is not ...``.

    ``bool``, ``int`` (not a bool), ``str`` and ``float`` (an int too; finite) are checked
    as such; ``X | None`` also takes null; ``tuple[X, ...]`` and ``tuple[X, Y]`` take a list
    or tuple (returned as a tuple, so that the config stays hashable); ``Literal[...]`` one
    of its values; ``Mapping[...]`` any mapping. A float setting also takes a number written
    as a string: YAML 1.1 reads ``1e-4`` (no dot) as the string ``'1e-4'``.
    """
    converted = _convert(value, hint)
    if converted is _INVALID:
        raise ConfigError(f"{key}: {value!r} is not {describe(hint)}")
    return converted


_INVALID = object()
"""What :func:`_convert` returns for a value that does not fit."""

_WORDS = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings")}
"""Each plain type in words: (one value, several values)."""


def describe(hint: Any) -> str:
    """What a value of annotation ``hint`` is, in words: ``a number``, ``a string or null``,
    ``a list of 2 integers``, ``'avg' or 'max'``."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if origin is tuple:
        items = _WORDS[args[0]][1] if args[0] in _WORDS else "values"
        return f"a list of {items}" if args[-1] is Ellipsis else f"a list of {len(args)} {items}"
    if isinstance(origin, type) and issubclass(origin, Mapping):
        return "a mapping"
    return _WORDS[hint][0] if hint in _WORDS else f"a {getattr(hint, '__name__', hint)}"


def _convert(value: Any, hint: Any) -> Any:
    """``value`` as annotation ``hint`` wants it (see :func:`check_value`), or ``_INVALID``."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in args) else _INVALID
    if origin in (Union, types.UnionType):
        for option in args:
            converted = (value if value is None else _INVALID) if option is type(None) else _convert(value, option)
            if converted is not _INVALID:
                return converted
        return _INVALID
    if origin is tuple:
        items = args[:1] * len(value) if args[-1] is Ellipsis and isinstance(value, (list, tuple)) else args
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            return _INVALID
        converted = tuple(_convert(v, h) for v, h in zip(value, items))
        return _INVALID if any(v is _INVALID for v in converted) else converted
    if isinstance(origin, type) and issubclass(origin, Mapping):
        return value if isinstance(value, Mapping) else _INVALID
    if hint is float:
        return _number(value)
    if hint in (bool, int, str):
        return value if isinstance(value, hint) and not (hint is int and isinstance(value, bool)) else _INVALID
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _INVALID
    raise TypeError(f"no check for the annotation {hint!r}: add one to cxrgaze.config.core._convert")


def _number(value: Any) -> Any:
    """A finite int or float (a string that reads as one becomes a float), or ``_INVALID``."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return _INVALID
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return _INVALID
    return value


def _located(where: str, message: str) -> str:
    """A dataclass's own error ``message`` placed under ``where`` (``"FILE: section"``),
    without naming the section twice: ``params.yaml: train.lr must be positive, got -1``.
    The dataclass names its keys from its own section (``train.lr``); under a deeper
    section (``params.yaml: variants.unet.train``) they get its full path:
    ``params.yaml: variants.unet.train.lr must be positive, got -1``."""
    if not where or message.startswith(where):
        return message
    file, _, section = where.rpartition(": ")
    last = section.rpartition(".")[2]
    own = re.escape(last)
    if re.match(rf"{own}\b", message):
        if section != last:
            message = re.sub(rf"(?<![\w.-]){own}\.", lambda _: f"{section}.", message)
            message = re.sub(rf"^{own}\b(?!\.)", lambda _: section, message)
        return f"{file}: {message}" if file else message
    return f"{where}: {message}"


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
