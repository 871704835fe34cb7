"""The command line: every command has --help; bad input is one line and status 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cxrgaze.cli import build_parser, main
from cxrgaze.variants import VARIANTS

COMMANDS = ["synth", "prepare", "split", "tune", "train", "evaluate", "report", "register", "predict", "serve", "summary",
            "profile"]


KEY_OPTIONS = {
    "synth": ["out", "--patients", "--seed", "--image-size", "--shortcut-strength"],
    "prepare": ["--egd-dir", "--dicom-dir", "--out", "--image-size", "--gaze-sigma", "--params"],
    "split": ["--prepared", "--out", "--seed", "--params"],
    "tune": ["--variant", "--params", "--storage", "--n-trials", "--workers", "--out"],
    "train": ["--variant", "--prepared", "--split", "--out", "--params", "--epochs", "--seed", "--device",
              "--no-resume"],
    "evaluate": ["--train-dir", "--out", "--prepared", "--split", "--resamples", "--no-track"],
    "report": ["--eval-root", "--out", "--variants"],
    "register": ["--eval-root", "--variants", "--min-delta"],
    "predict": ["FILE", "--model", "--out", "--heatmap"],
    "serve": ["--model", "--host", "--port"],
    "summary": ["--root"],
    "profile": ["profile", "--base", "--out"],
}
"""What a user looks up in each command's ``--help``."""


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys, monkeypatch):
    """``cxrgaze COMMAND --help`` exits 0 and shows the command's usage with its key
    options, each on a line of its own in the listing; ``train`` and ``tune`` name every
    variant."""
    monkeypatch.setenv("COLUMNS", "400")  # one line per option: no wrapping inside names
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cxrgaze {command} ")
    usage, _, listing = out.partition("\n\n")
    for option in KEY_OPTIONS[command]:
        assert re.search(rf"(^|[\s\[]){re.escape(option)}([\s\]]|$)", usage), (option, usage)
        assert re.search(rf"^  (\S+, )?{re.escape(option)}( |,|$)", listing, re.M), (option, listing)
    if command in ("train", "tune"):
        for variant in VARIANTS:
            assert re.search(rf"[\s{{,]{re.escape(variant)}[\s,}}]", listing), variant


def test_every_option_says_what_it_does():
    """Every argument of every command has a description in ``--help``."""
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    undocumented = [f"{name} {action.dest}" for name, parser in sub.choices.items() for action in parser._actions
                    if not isinstance(action, argparse._HelpAction) and not action.help]
    assert undocumented == []


def test_parser_lists_all_commands(capsys, monkeypatch):
    """``cxrgaze --help`` lists every command with a one-line description, and a mistyped
    command exits 2 naming the valid ones."""
    monkeypatch.setenv("COLUMNS", "400")
    text = build_parser().format_help()
    for command in COMMANDS:
        assert re.search(rf"^    {command} +\S", text, re.M), command
    with pytest.raises(SystemExit) as exc:
        main(["trian"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'trian'" in err and all(command in err for command in COMMANDS)


def test_synth_prepare_split_write_what_they_promise(tmp_path, monkeypatch, capsys):
    """The data commands in a row, as a user runs them: ``synth`` writes the EGD-CXR and
    MIMIC-CXR layout; ``prepare`` writes arrays whose row i is row i of ``manifest.csv``,
    at the asked size, and lists every master-sheet image it could not use in
    ``excluded.csv`` with a reason; ``split`` assigns every prepared image once, never puts
    a patient in two splits, and gives the same file for the same seed."""
    import numpy as np
    import pandas as pd

    from cxrgaze import CLASSES

    monkeypatch.chdir(tmp_path)
    assert main(["synth", "data", "--patients", "30", "--image-size", "64", "--seed", "3", "--workers", "1",
                 "--quiet"]) == 0
    master = pd.read_csv("data/egd-cxr/master_sheet.csv", dtype={"dicom_id": str})
    assert Path("data/egd-cxr/fixations.csv").is_file() and len(master) > 30
    assert any(Path("data/mimic-cxr").rglob("*.dcm"))

    assert main(["prepare", "--egd-dir", "data/egd-cxr", "--dicom-dir", "data/mimic-cxr", "--out", "prepared",
                 "--image-size", "32", "--workers", "1", "--quiet"]) == 0
    manifest = pd.read_csv("prepared/manifest.csv", dtype={"dicom_id": str, "patient_id": str})
    assert list(manifest.columns[:5]) == ["dicom_id", "patient_id", "study_id", "label", "index"]
    assert manifest["index"].tolist() == list(range(len(manifest)))
    assert set(manifest["label"]) == set(CLASSES)
    images, gaze = np.load("prepared/images.npy"), np.load("prepared/gaze.npy")
    assert images.shape == gaze.shape == (len(manifest), 32, 32)
    assert 0 <= images.min() and images.max() <= 1 and 0 <= gaze.min() and gaze.max() <= 1
    assert (images.reshape(len(images), -1).std(axis=1) > 0).all()  # real pictures, not blank rows
    excluded = pd.read_csv("prepared/excluded.csv", dtype={"dicom_id": str})
    assert list(excluded.columns) == ["dicom_id", "reason"] and excluded["reason"].str.len().gt(0).all()
    assert sorted([*manifest["dicom_id"], *excluded["dicom_id"]]) == sorted(master["dicom_id"])
    assert len(excluded) > 0  # the synthetic set holds deliberately broken images

    capsys.readouterr()
    assert main(["split", "--prepared", "prepared", "--out", "split.csv", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    split = pd.read_csv("split.csv", dtype={"dicom_id": str, "patient_id": str})
    assert sorted(split["dicom_id"]) == sorted(manifest["dicom_id"])  # every image, once
    assert set(split["split"]) == {"train", "val", "test"}
    by_id = manifest.set_index("dicom_id")
    assert (split["index"].to_numpy() == by_id.loc[split["dicom_id"], "index"].to_numpy()).all()
    assert (split["label"].to_numpy() == by_id.loc[split["dicom_id"], "label"].to_numpy()).all()
    assert split.groupby("patient_id")["split"].nunique().max() == 1, "a patient in two splits"
    counts = json.loads(Path("split.json").read_text())  # the counts `dvc metrics show` reads
    for name, rows in split.groupby("split"):
        assert counts[name]["total"] == len(rows) and counts[name]["patients"] == rows["patient_id"].nunique()
        assert all(counts[name][c] == (rows["label"] == c).sum() for c in CLASSES)
        assert re.search(rf"^{name} +{' +'.join(str(counts[name][c]) for c in CLASSES)} +{len(rows)} ", printed, re.M)
    first = Path("split.csv").read_bytes()
    assert main(["split", "--prepared", "prepared", "--out", "split.csv", "--seed", "1"]) == 0
    assert Path("split.csv").read_bytes() == first
    assert main(["split", "--prepared", "prepared", "--out", "other.csv", "--seed", "2"]) == 0
    other = pd.read_csv("other.csv", dtype={"dicom_id": str}).set_index("dicom_id")["split"]
    assert (other.loc[split["dicom_id"]].to_numpy() != split["split"].to_numpy()).any()  # the seed matters

    capsys.readouterr()
    code = main(["prepare", "--egd-dir", "data/egd-cxr", "--dicom-dir", "data/no-such-folder", "--out", "again",
                 "--workers", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data/no-such-folder" in err[0], err
    assert not Path("again/manifest.csv").exists()


def test_missing_input_is_one_line_and_status_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cxrgaze.cli", "split", "--prepared", str(tmp_path / "nope"), "--out", str(tmp_path / "s.csv")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(tmp_path / "nope" / "manifest.csv") in lines[0] and "no such manifest" in lines[0]
    assert lines[0].startswith("cxrgaze split: error: ")
    assert not (tmp_path / "s.csv").exists()


def test_bad_params_file_names_the_file(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("split:\n  seed: 1\n  trian: 0.8\n")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "manifest.csv").write_text("dicom_id,patient_id,study_id,label\na,1,2,CHF\n")
    code = main(["split", "--prepared", str(tmp_path / "p"), "--out", str(tmp_path / "s.csv"), "--params", str(params)])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown key(s) trian" in err and str(params) in err
    assert len(err.strip().splitlines()) == 1


def test_evaluate_without_a_trained_model_is_one_line(tmp_path, capsys):
    code = main(["evaluate", "--train-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "eval"), "--no-track"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "best.pt" in err[0] and "no such checkpoint" in err[0]


def test_register_without_evaluations_is_one_line(tmp_path, capsys):
    code = main(["register", "--eval-root", str(tmp_path / "eval"), "--variants", "unet"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval/unet" in err[0] and "did the stage run" in err[0]


def test_train_seed_flag_replaces_the_seeds_list(tiny_prepared, tmp_path, capsys):
    """`--seed N` trains that one seed even when params.yaml lists train.seeds."""
    import yaml

    from cxrgaze.checkpoint import load_checkpoint

    prepared, split = tiny_prepared
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": {"encoder": "tu-tinynet_e", "decoder_channels": [32, 16, 16, 8, 8]},
                                      "train": {"seeds": [0, 1], "epochs": 1, "device": "cpu"}}))
    code = main(["train", "--variant", "unet", "--params", str(params), "--prepared", str(prepared), "--split",
                 str(split), "--out", str(tmp_path / "out"), "--seed", "7", "--no-track", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert load_checkpoint(tmp_path / "out" / "best.pt")["config"]["train"]["seed"] == 7


def test_the_summary_links_to_the_results_view_of_the_experiment(mlflow_store, tmp_path, capsys):
    """`make demo` ends with a link that opens the results view of the cxrgaze experiment's
    runs table (MLflow 3 opens on its GenAI view without `workflowType=machine_learning`)."""
    import mlflow

    experiment_id = mlflow.set_experiment("cxrgaze").experiment_id
    prepared = tmp_path / "outputs" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "manifest.csv").write_text("dicom_id,patient_id,study_id,label\n1,2,3,CHF\n")
    assert main(["summary", "--root", str(tmp_path)]) == 0
    link = (f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?viewStateShareKey=cxrgaze-results"
            "&workflowType=machine_learning")
    assert f"then open {link}" in capsys.readouterr().out
