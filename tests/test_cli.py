"""The command line: every command has --help; bad input is one line and status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cxrgaze.cli import build_parser, main

COMMANDS = ["synth", "prepare", "split", "tune", "train", "evaluate", "report", "register", "predict", "serve", "summary",
            "profile"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: cxrgaze" in capsys.readouterr().out


def test_parser_lists_all_commands():
    text = build_parser().format_help()
    for command in COMMANDS:
        assert command in text


def test_missing_input_is_one_line_and_status_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cxrgaze.cli", "split", "--prepared", str(tmp_path / "nope"), "--out", str(tmp_path / "s.csv")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "manifest.csv" in lines[0] and "no such manifest" in lines[0]


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

    from cxrgaze.train import load_checkpoint

    prepared, split = tiny_prepared
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": {"encoder": "tu-tinynet_e", "decoder_channels": [32, 16, 16, 8, 8]},
                                      "train": {"seeds": [0, 1], "epochs": 1, "device": "cpu"}}))
    code = main(["train", "--variant", "unet", "--params", str(params), "--prepared", str(prepared), "--split",
                 str(split), "--out", str(tmp_path / "out"), "--seed", "7", "--no-track", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert load_checkpoint(tmp_path / "out" / "best.pt")["config"]["train"]["seed"] == 7
