"""Faults leave no silent damage: a broken prepared folder and bad settings (issue 16, items 2-3).

Every fault is made for real: a prepared folder written by the real synth -> prepare ->
split chain, then an array truncated, shortened, deleted or rewritten; a params file with
a wrong value. ``cxrgaze train`` and ``cxrgaze evaluate`` must refuse each with exit
status 2 and one line naming the file or the setting and the mismatch, never a traceback
and never a run that quietly ignores the setting.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import yaml

from conftest import tool_env
from cxrgaze.cli import main
from cxrgaze.config import ConfigError, EvalConfig, from_mapping, resolve_run_config, tune_config
from cxrgaze.config.core import check_value
from cxrgaze.data.prepared import PreparedDataError, PreparedDir, read_manifest_csv

TINY = {"model": {"encoder": "tu-tinynet_e", "decoder_channels": [32, 16, 16, 8, 8]},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.003, "device": "cpu"}}
"""A model and run small enough to train in seconds (a test that fails trains it)."""


def write_params(folder: Path, params: dict) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the real ``cxrgaze`` entry point; it must exit 2 with exactly one line on stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, f"exit {code}, stderr:\n{err}"
    return lines[0]


def train_argv(prepared: Path, split: Path, params: Path, out: Path, variant: str = "unet") -> list[str]:
    return ["train", "--variant", variant, "--prepared", str(prepared), "--split", str(split), "--out", str(out),
            "--params", str(params), "--no-track", "--quiet"]


# -- The faults, each applied to a copy of a real prepared folder ---------------------------

def fewer_gaze_rows(folder: Path) -> str:
    gaze = np.load(folder / "gaze.npy")
    np.save(folder / "gaze.npy", gaze[:-5])
    return rf"gaze\.npy: {len(gaze) - 5} rows, but manifest\.csv has {len(gaze)}; rerun `cxrgaze prepare`$"


def truncated_images(folder: Path) -> str:
    path = folder / "images.npy"
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.truncate(size // 2)
    n = len(np.load(folder / "gaze.npy", mmap_mode="r"))
    return (rf"images\.npy: {size // 2} bytes, but its header describes a \({n}, 32, 32\) float16 array of {size} "
            r"bytes \(truncated\)")


def bytes_appended_to_gaze(folder: Path) -> str:
    with (folder / "gaze.npy").open("ab") as fh:
        fh.write(b"\0" * 64)
    return r"gaze\.npy: \d+ bytes, but its header describes .* \(extra bytes\)"


def deleted_gaze(folder: Path) -> str:
    (folder / "gaze.npy").unlink()
    return r"gaze\.npy: missing \(run `cxrgaze prepare` first\)$"


def float32_images(folder: Path) -> str:
    np.save(folder / "images.npy", np.load(folder / "images.npy").astype(np.float32))
    return r"images\.npy: dtype float32, expected float16"


def smaller_gaze_maps(folder: Path) -> str:
    gaze = np.load(folder / "gaze.npy")
    np.save(folder / "gaze.npy", np.ascontiguousarray(gaze[:, :16, :16]))
    return rf"gaze\.npy: shape \({len(gaze)}, 16, 16\), but images\.npy has \({len(gaze)}, 32, 32\)"


def not_an_array(folder: Path) -> str:
    (folder / "images.npy").write_text("images were here\n")
    return r"images\.npy: not a \.npy array file \(.*\); rerun `cxrgaze prepare`$"


def empty_manifest(folder: Path) -> str:
    (folder / "manifest.csv").write_text("")
    return r"manifest\.csv: not a readable CSV \(No columns to parse from file\); rerun `cxrgaze prepare`$"


FAULTS = [fewer_gaze_rows, truncated_images, bytes_appended_to_gaze, deleted_gaze, float32_images, smaller_gaze_maps,
          not_an_array, empty_manifest]


@pytest.fixture
def broken(tiny_prepared, tmp_path):
    """A copy of the tiny prepared folder, to break."""
    prepared, split = tiny_prepared
    folder = tmp_path / "prepared"
    shutil.copytree(prepared, folder)
    return folder, split


@pytest.fixture(scope="module")
def checkpoint(tiny_prepared, tmp_path_factory) -> Path:
    """The folder of a real one-epoch training run (``best.pt``) on the intact folder."""
    from cxrgaze.train import train

    prepared, split = tiny_prepared
    out = tmp_path_factory.mktemp("trained")
    train(resolve_run_config(TINY, "unet"), prepared, split, out, progress=False)
    return out


@pytest.mark.parametrize("fault", FAULTS)
def test_train_refuses_a_broken_prepared_folder_in_one_line(fault, broken, tmp_path, capsys):
    folder, split = broken
    expected = fault(folder)
    line = one_line_error(capsys, train_argv(folder, split, write_params(tmp_path, TINY), tmp_path / "out"))
    assert line.startswith(f"cxrgaze train: error: {folder}"), line
    assert re.search(expected, line), line
    assert not (tmp_path / "out" / "last.pt").exists()


@pytest.mark.parametrize("fault", [fewer_gaze_rows, truncated_images, deleted_gaze])
def test_evaluate_refuses_a_broken_prepared_folder_in_one_line(fault, broken, checkpoint, tmp_path, capsys):
    folder, split = broken
    expected = fault(folder)
    line = one_line_error(capsys, ["evaluate", "--train-dir", str(checkpoint), "--out", str(tmp_path / "eval"),
                                   "--prepared", str(folder), "--split", str(split), "--no-track", "--quiet"])
    assert line.startswith(f"cxrgaze evaluate: error: {folder}") and re.search(expected, line), line
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_the_library_refuses_too_where_the_dvc_stages_call_it(broken, checkpoint, tmp_path):
    """The stages call ``train`` and ``evaluate`` directly: the folder is checked when they
    open it, not only by the CLI."""
    from cxrgaze.evaluate import evaluate
    from cxrgaze.train import train

    folder, split = broken
    fewer_gaze_rows(folder)
    with pytest.raises(PreparedDataError, match=r"gaze\.npy: \d+ rows, but manifest\.csv has"):
        train(resolve_run_config(TINY, "unet"), folder, split, tmp_path / "run", progress=False)
    with pytest.raises(PreparedDataError, match=r"gaze\.npy: \d+ rows, but manifest\.csv has"):
        evaluate(checkpoint / "best.pt", folder, split, tmp_path / "eval", EvalConfig(n_resamples=100), progress=False)


def test_meta_json_that_disagrees_with_the_arrays_is_refused(broken):
    folder, _ = broken
    meta = PreparedDir(folder).meta()
    meta["arrays"]["shape"][1:] = [64, 64]
    PreparedDir(folder).meta_path.write_text(json.dumps(meta))
    with pytest.raises(PreparedDataError, match=r"meta\.json: arrays\.shape \(\d+, 64, 64\), but images\.npy has"):
        PreparedDir(folder).manifest()


def test_a_separate_process_prints_one_line_and_no_traceback(broken, tmp_path):
    """The installed entry point as a user runs it: exit 2, one line on stderr."""
    folder, split = broken
    fewer_gaze_rows(folder)
    proc = subprocess.run([sys.executable, "-m", "cxrgaze.cli", *train_argv(folder, split, write_params(tmp_path, TINY),
                                                                             tmp_path / "out")],
                          env=tool_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"cxrgaze train: error: {folder / 'gaze.npy'}: {len(np.load(folder / 'gaze.npy'))} rows, but manifest.csv "
        f"has {len(np.load(folder / 'images.npy'))}; rerun `cxrgaze prepare`"]


# -- Settings: checked by type and range where they are loaded ------------------------------

@pytest.mark.parametrize("params, variant, message", [
    ({"train": {"lr": "fast"}}, "unet", "train.lr: 'fast' is not a number"),
    ({"variants": {"set3-gbp": {"loss": {"gamma": "x"}}}}, "set3-gbp",
     "variants.set3-gbp.loss.gamma: 'x' is not a number"),
    ({"variants": {"set3-gbp": {"loss": {"gamma": 2}}}}, "set3-gbp",
     "variants.set3-gbp.loss.gamma must be in [0, 1], got 2"),
    ({"variants": {"unet": {"train": {"lr": -1}}}}, "unet", "variants.unet.train.lr must be positive, got -1"),
    # Sections the command does not use are checked too (every setting, where it is loaded).
    ({"variants": {"unet": {}, "set3-gbp": {"loss": {"gamma": "x"}}}}, "unet",
     "variants.set3-gbp.loss.gamma: 'x' is not a number"),
    ({"variants": {"unet": {}, "set3-gbp": 5}}, "unet", "variants.set3-gbp: 5 is not a mapping"),
    ({"variants": {"unet": {}, "set9-gbp": {}}}, "unet", "variants.set9-gbp: unknown variant 'set9-gbp'"),
    ({"evaluate": {"n_resamples": "x"}}, "unet", "evaluate.n_resamples: 'x' is not an integer"),
    ({"register": {"min_delta": 2}}, "unet", "register.min_delta must be in [0, 1), got 2"),
    ({"tune": {"n_trials": "many"}}, "unet", "tune.n_trials: 'many' is not an integer"),
    ({"split": {"seed": "x"}}, "unet", "split.seed: 'x' is not an integer"),
    ({"data": {"image_size": 0}}, "unet", "data.image_size must be at least 8, got 0"),
    ({"data": {"image_size": 64}}, "unet",
     "data.image_size: 64, but {images} holds 32x32 images; rerun `cxrgaze prepare` or set data.image_size: 32"),
    ({"data": {"image_size": 32, "gaze_sigma": 9}}, "unet",
     "data.gaze_sigma: 9, but {meta} records 7; rerun `cxrgaze prepare` or set data.gaze_sigma: 7"),
])
def test_train_refuses_bad_settings_in_one_line(params, variant, message, tiny_prepared, tmp_path, capsys):
    prepared, split = tiny_prepared
    path = write_params(tmp_path, {**TINY, **params, "train": {**TINY["train"], **params.get("train", {})}})
    line = one_line_error(capsys, train_argv(prepared, split, path, tmp_path / "out", variant))
    folder = PreparedDir(prepared)
    expected = f"cxrgaze train: error: {path}: " + message.format(images=folder.images_path, meta=folder.meta_path)
    assert line.startswith(expected) if "unknown variant" in message else line == expected, line
    assert not (tmp_path / "out" / "last.pt").exists()


def test_evaluate_refuses_an_image_size_other_than_the_prepared_one(tiny_prepared, checkpoint, tmp_path, capsys):
    prepared, split = tiny_prepared
    path = write_params(tmp_path, {"data": {"image_size": 224}})
    line = one_line_error(capsys, ["evaluate", "--train-dir", str(checkpoint), "--out", str(tmp_path / "eval"),
                                   "--prepared", str(prepared), "--split", str(split), "--params", str(path),
                                   "--no-track", "--quiet"])
    assert line == (f"cxrgaze evaluate: error: {path}: data.image_size: 224, but {prepared / 'images.npy'} holds 32x32 "
                    "images; rerun `cxrgaze prepare` or set data.image_size: 32")


@pytest.mark.parametrize("load, message", [
    (lambda: resolve_run_config({"train": {"epochs": 2.5}}, "unet"),
     "params.yaml: train.epochs: 2.5 is not an integer"),
    (lambda: resolve_run_config({"train": {"augment": "yes"}}, "unet"), "train.augment: 'yes' is not true or false"),
    (lambda: resolve_run_config({"train": {"seed": "x"}}, "unet"), "params.yaml: train.seed: 'x' is not an integer"),
    (lambda: resolve_run_config({"model": {"decoder_channels": [32, "x", 16, 8, 8]}}, "unet"),
     "model.decoder_channels: [32, 'x', 16, 8, 8] is not a list of integers"),
    (lambda: resolve_run_config({"model": {"encoder_weights": 3}}, "unet"),
     "model.encoder_weights: 3 is not a string or null"),
    (lambda: resolve_run_config({"loss": {"alpha": float("nan")}}, "unet"), "loss.alpha: nan is not a number"),
    (lambda: resolve_run_config({"variants": {"unet": []}}, "unet"), "params.yaml: variants.unet: [] is not a mapping"),
    (lambda: from_mapping(EvalConfig, {"paper_size": [55]}, where="p.yaml: evaluate"),
     "p.yaml: evaluate.paper_size: [55] is not a list of 2 integers"),
    (lambda: tune_config({"tune": {"n_trials": "many"}}), "params.yaml: tune.n_trials: 'many' is not an integer"),
    (lambda: tune_config({"tune": {"space": {"lr": {"low": 0.001}}}}),
     "params.yaml: tune.space.lr: missing key(s) high"),
    (lambda: check_value("min", Literal["avg", "max"], "model.pooling"), "model.pooling: 'min' is not 'avg' or 'max'"),
])
def test_every_setting_is_checked_by_type_with_its_dotted_key(load, message):
    with pytest.raises(ConfigError) as caught:
        load()
    assert str(caught.value).endswith(message), str(caught.value)


def test_a_number_yaml_reads_as_a_string_is_still_a_number():
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; a float setting takes it as the number."""
    params = yaml.safe_load("train:\n  lr: 1e-4\n")
    assert params["train"]["lr"] == "1e-4"
    assert resolve_run_config(params, "unet").train.lr == pytest.approx(1e-4)


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\xff\xfe\x00\x81 not text \x00\x9f"])
def test_an_unreadable_manifest_is_refused_naming_the_file(content, tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_bytes(content)
    with pytest.raises(PreparedDataError) as caught:
        read_manifest_csv(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not a readable CSV (") and message.endswith("); rerun `cxrgaze prepare`")
    assert len(message.splitlines()) == 1, message


def test_the_dvc_stages_check_every_section_of_params_yaml(tiny_prepared, tmp_path):
    """A stage refuses a bad setting of a section it does not read (the split stage, a bad
    ``evaluate`` and a bad override of a variant), in one line."""
    prepared, _ = tiny_prepared
    root = Path(__file__).resolve().parents[1]
    for params, message in [({"evaluate": {"n_resamples": "x"}}, "evaluate.n_resamples: 'x' is not an integer"),
                            ({"variants": {"set3-gbp": {"loss": {"gamma": 2}}}},
                             "variants.set3-gbp.loss.gamma must be in [0, 1], got 2")]:
        path = write_params(tmp_path, params)
        proc = subprocess.run([sys.executable, str(root / "pipelines" / "split.py"), str(prepared),
                               str(tmp_path / "split.csv"), str(tmp_path / "counts.json")],
                              env={**tool_env(), "CXRGAZE_PARAMS": str(path)}, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [f"stage split: error: {path}: {message}"]
        assert not (tmp_path / "split.csv").exists()
