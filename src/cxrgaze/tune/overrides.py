"""What tuning hands to training: search-space values as per-variant overrides, merged into
``params.yaml``'s mapping, and the ``best.yaml`` the ``train@<variant>`` stages read."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from cxrgaze.config import SPACE_TARGETS, ConfigError


def as_overrides(values: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Search-space values as ``variants.<v>``-shaped overrides: ``{"alpha": 0.6}`` ->
    ``{"loss": {"alpha": 0.6}}``."""
    out: dict[str, dict[str, float]] = {}
    for name, value in values.items():
        section, key = SPACE_TARGETS[name]
        out.setdefault(section, {})[key] = value
    return out


def merge_overrides(params: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]], variant: str) -> dict[str, Any]:
    """A copy of ``params`` whose ``variants.<variant>`` has ``overrides`` merged on top,
    section by section (an override beats the variant's own value)."""
    merged = copy.deepcopy(dict(params))
    variants = dict(merged.get("variants") or {})
    own = dict(variants.get(variant) or {})
    for section, values in overrides.items():
        own[section] = {**(own.get(section) or {}), **values}
    variants[variant] = own
    merged["variants"] = variants
    return merged


def load_tuned(path: str | Path, variant: str) -> dict[str, dict[str, Any]]:
    """The tuned overrides of ``variant`` in a ``best.yaml`` written by :func:`write_best`
    (``{}`` when the variant was not tuned)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no tuning result (run the tune stage first)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    entry = data.get(variant) if isinstance(data, dict) else None
    if entry is None:
        return {}
    if not isinstance(entry, dict) or not all(isinstance(v, dict) for v in entry.values()):
        raise ConfigError(f"{path}: {variant} must map sections (model/loss/train) to overrides")
    return entry


def write_best(path: str | Path, variants: Iterable[str], results: Mapping[str, Any]) -> Path:
    """Write ``best.yaml``: one key per name in ``variants`` (all of ``params.yaml: variants``)
    and in ``results``; the tuned overrides for those in ``results``, an earlier entry of the
    same file for the others, else ``{}``. Each key is a DVC param of its ``train@<variant>`` stage.
    ``results`` maps variants to :class:`cxrgaze.tune.study.StudyResult` (anything with ``.overrides``)."""
    path = Path(path)
    earlier = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    out = {v: results[v].overrides if v in results else earlier.get(v, {}) for v in dict.fromkeys([*variants, *results])}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    # The header keeps the module's old name: the file is a DVC output, and its bytes a train stage's input.
    tmp.write_text("# Written by the tune stage (cxrgaze.tune.write_best): tuned overrides per variant.\n"
                   + yaml.safe_dump(out, sort_keys=False))
    tmp.replace(path)
    return path
