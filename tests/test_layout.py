"""The data version: read from ``data.dvc`` by the entry points (never by the library) and
handed to every MLflow run of the process through ``CXRGAZE_DATA_VERSION``."""

from __future__ import annotations

import os

import pytest

from cxrgaze import DATA_VERSION_ENV
from cxrgaze.layout import data_version, export_data_version
from cxrgaze.tracking import run_tags


def _project(path, md5: str | None, text: str | None = None):
    path.mkdir(parents=True, exist_ok=True)
    if text is not None:
        (path / "data.dvc").write_text(text)
    elif md5 is not None:
        (path / "data.dvc").write_text(f"outs:\n- md5: {md5}\n  path: data\n")
    return path


def test_each_project_tags_its_own_data_version(tmp_path, monkeypatch):
    """A process that runs commands in two projects tags each one's runs with that
    project's version (a value this module exported earlier is refreshed, not kept)."""
    monkeypatch.delenv(DATA_VERSION_ENV, raising=False)
    a, b, plain = _project(tmp_path / "a", "aaaa.dir"), _project(tmp_path / "b", "bbbb.dir"), _project(tmp_path / "c", None)
    export_data_version(a)
    assert os.environ[DATA_VERSION_ENV] == "aaaa.dir" and run_tags()["cxrgaze.data_version"] == "aaaa.dir"
    export_data_version(b)
    assert run_tags()["cxrgaze.data_version"] == "bbbb.dir"
    export_data_version(plain)  # no data.dvc: no version, not the previous project's
    assert DATA_VERSION_ENV not in os.environ and "cxrgaze.data_version" not in run_tags()


def test_a_version_the_user_set_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_VERSION_ENV, "from-the-user")
    export_data_version(_project(tmp_path / "a", "aaaa.dir"))
    assert run_tags()["cxrgaze.data_version"] == "from-the-user"


@pytest.mark.parametrize("text", ["outs: [data]\n", "just text\n", "outs:\n- path: data\n", "\xff\xfe: [\n"])
def test_an_odd_data_dvc_means_no_version_not_a_crash(tmp_path, monkeypatch, text):
    monkeypatch.delenv(DATA_VERSION_ENV, raising=False)
    project = _project(tmp_path / "odd", None, text=text)
    assert data_version(project) is None
    export_data_version(project)
    assert DATA_VERSION_ENV not in os.environ


def test_the_cli_tags_runs_with_the_data_version_of_the_folder_it_runs_in(tmp_path, monkeypatch):
    """``cxrgaze`` reads ``data.dvc`` of the working folder before any command runs."""
    from cxrgaze.cli import main

    monkeypatch.delenv(DATA_VERSION_ENV, raising=False)
    monkeypatch.chdir(_project(tmp_path / "p", "cccc.dir"))
    (tmp_path / "p" / "params.yaml").write_text("train: {epochs: 1}\n")
    assert main(["profile", "params.yaml", "--base", "params.yaml", "--out", "-"]) == 0
    assert os.environ[DATA_VERSION_ENV] == "cccc.dir"
