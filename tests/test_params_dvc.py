"""The shipped parameter files mean the same after ``dvc exp run -S`` rewrites them.

``dvc exp run -S section.key=value`` does not edit one line: it loads the whole file with
ruamel (YAML 1.2), applies the Hydra override and dumps the whole file again
(``dvc.utils.hydra.apply_overrides``, called by ``BaseStashQueue._update_params``). Quotes
are dropped, flow lists become block lists and ``null`` is written as nothing; the project
reads the result with PyYAML (YAML 1.1), where an unquoted ``off``/``on``/``yes``/``no`` is a
bool. A value that changes meaning there makes DVC see a changed section (and retrain
everything) or the loader see another setting. These tests run DVC's own rewrite.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from cxrgaze.config import (VARIANTS, DataConfig, SplitConfig, TrainConfig, from_mapping, load_params, overlay,
                            resolve_run_config, run_seeds)

pytest.importorskip("dvc")
pytest.importorskip("hydra")

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
FILES = [PARAMS, *PROFILES]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def dvc_set(path: Path, *overrides: str) -> None:
    """What ``dvc exp run -S <override>...`` does to ``path`` (Hydra composition off, the default)."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(path, list(overrides))


def _first_int(params: dict[str, Any]) -> tuple[str, int]:
    """A ``section.key`` holding a plain int, and its value (an override that changes nothing)."""
    for section, values in params.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    return f"{section}.{key}", value
    raise AssertionError("no integer parameter to override")


def is_full(params: dict[str, Any]) -> bool:
    """A complete parameters file (params.yaml, profiles/paper.yaml), not an overlay."""
    return set(params) >= set(load_params(PARAMS))


def typed(params: dict[str, Any], where: str) -> dict[str, Any]:
    """Every typed config the stages build from a complete params mapping."""
    from cxrgaze.config import EvalConfig, RegisterConfig, tune_config

    runs = {(variant, seed): resolve_run_config(params, variant, where=where, seed=seed)
            for variant in VARIANTS for seed in run_seeds(params, where)}
    return {
        "data": from_mapping(DataConfig, params.get("data"), where=f"{where}: data"),
        "split": from_mapping(SplitConfig, params.get("split"), where=f"{where}: split"),
        "runs": runs,
        "evaluate": from_mapping(EvalConfig, params.get("evaluate"), where=f"{where}: evaluate"),
        "register": from_mapping(RegisterConfig, params.get("register"), where=f"{where}: register"),
        "tune": tune_config(params, where=where),
        "variants": list(params.get("variants") or {}),
    }


def _check(original: Path, rewritten: Path) -> None:
    before, after = load_params(original), load_params(rewritten)
    assert yaml.safe_load(rewritten.read_text()) == yaml.safe_load(original.read_text())
    assert after == before
    base = load_params(PARAMS)
    if is_full(before):
        assert typed(after, _rel(original)) == typed(before, _rel(original))
    else:  # an overlay: what `cxrgaze profile` would make of it
        assert typed(overlay(base, after), _rel(original)) == typed(overlay(base, before), _rel(original))


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_dvc_set_param_rewrite_keeps_every_value(path, tmp_path):
    """`dvc exp run -S` with a value that does not change: the file must mean the same."""
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    key, value = _first_int(load_params(path))
    dvc_set(copy, f"{key}={value}")
    if ": [" in path.read_text():
        assert copy.read_text() != path.read_text()  # DVC rewrote it (flow lists became block lists)
    _check(path, copy)
    dvc_set(copy, f"{key}={value}")  # a second experiment on the rewritten file
    _check(path, copy)


def test_dvc_set_param_changes_only_the_named_value(tmp_path):
    copy = tmp_path / "params.yaml"
    shutil.copy(PARAMS, copy)
    before = load_params(PARAMS)
    epochs = before["train"]["epochs"] + 1
    dvc_set(copy, f"train.epochs={epochs}")
    expected = {**before, "train": {**before["train"], "epochs": epochs}}
    assert load_params(copy) == expected
    assert typed(load_params(copy), "params.yaml") == typed(expected, "params.yaml")


@pytest.mark.parametrize("path", [p for p in PROFILES if not is_full(load_params(p))], ids=_rel)
def test_dvc_set_param_on_an_applied_overlay(path, tmp_path):
    """`cxrgaze profile <overlay>` (PyYAML's dump) and then `dvc exp run -S` on the result."""
    from cxrgaze.cli import main

    applied = tmp_path / "applied.yaml"
    assert main(["profile", str(path), "--base", str(PARAMS), "--out", str(applied)]) == 0
    copy = tmp_path / "params.yaml"
    shutil.copy(applied, copy)
    key, value = _first_int(load_params(applied))
    dvc_set(copy, f"{key}={value}")
    assert load_params(copy) == load_params(applied) == overlay(load_params(PARAMS), load_params(path))
    assert typed(load_params(copy), "params.yaml") == typed(load_params(applied), "params.yaml")


def test_amp_is_canonical_and_unquoted_in_the_shipped_files():
    """`fp32`/`bf16` need no quotes: YAML 1.1 and 1.2 both read them as the same string."""
    for path in FILES:
        amp = (load_params(path).get("train") or {}).get("amp")
        assert amp in (None, "fp32", "bf16"), (_rel(path), amp)
    assert load_params(PARAMS)["train"]["amp"] == "fp32"
    assert TrainConfig().amp == "fp32"


@pytest.mark.parametrize("text", ['amp: off', 'amp: "off"', "amp: 'off'", "amp: false", "amp: fp32", "{}"])
def test_legacy_amp_spellings_load_as_fp32(text):
    params = {"train": yaml.safe_load(text)}
    assert resolve_run_config(params, "unet").train.amp == "fp32"
    assert from_mapping(TrainConfig, params["train"]).amp == "fp32"


def test_bf16_loads():
    assert resolve_run_config({"train": {"amp": "bf16"}}, "unet").train.amp == "bf16"


@pytest.mark.parametrize("text, shown", [("amp: fp16", "'fp16'"), ("amp: on", "True"), ("amp: 'on'", "'on'"),
                                         ("amp: BF16", "'BF16'")])
def test_unknown_amp_is_a_one_line_value_error(text, shown):
    with pytest.raises(ValueError) as info:
        resolve_run_config({"train": yaml.safe_load(text)}, "unet")
    message = str(info.value)
    assert "\n" not in message
    assert "train.amp" in message and shown in message and "'fp32'" in message and "'bf16'" in message
