"""End to end: synthetic data -> `dvc repro` of prepare + split (and train@unet) in a temporary git repo."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import make_project, run
from cxrgaze.data.synth import synthesize

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("project"), {"data": {"image_size": 32, "workers": 1}})
    synthesize(root / "data", patients=30, seed=3, image_size=128)
    run(["dvc", "add", "-q", "data"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "init"], root)
    run(["dvc", "repro", "split"], root)
    return root


def test_repro_writes_data_manifest_exclusions_and_split(repo):
    prepared = repo / "outputs" / "prepared"
    manifest = pd.read_csv(prepared / "manifest.csv", dtype=str)
    excluded = pd.read_csv(prepared / "excluded.csv", dtype=str)
    split = pd.read_csv(repo / "outputs" / "split.csv", dtype=str)
    assert list(manifest.columns[:4]) == ["dicom_id", "patient_id", "study_id", "label"]
    assert list(excluded.columns) == ["dicom_id", "reason"]
    assert len(excluded) > 0  # the synthetic data carries deliberate faults
    assert set(split["dicom_id"]) == set(manifest["dicom_id"])
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()
    assert json.loads((repo / "metrics" / "prepare.json").read_text())["counts"]["excluded"] == len(excluded)
    assert json.loads((repo / "metrics" / "split.json").read_text())["test"]["total"] == (split["split"] == "test").sum()


def test_second_repro_changes_nothing(repo):
    status = run(["dvc", "status", "split"], repo)
    assert "up to date" in status.stdout.lower() or status.stdout.strip() == "", status.stdout
    again = run(["dvc", "repro", "split"], repo)
    assert "didn't change" in again.stdout or "skipping" in again.stdout.lower(), again.stdout


def test_param_change_reruns_only_what_depends_on_it(repo):
    import yaml

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["split"]["seed"] = 7
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "split"], repo).stdout
    assert "Running stage 'split'" in out
    assert "Running stage 'prepare'" not in out


def test_default_synth_reproduces_the_committed_data_dvc(tmp_path):
    """`make demo` regenerates data/ with the defaults: it must hash to the committed data.dvc."""
    import yaml

    from conftest import ROOT

    root = tmp_path / "fresh"
    root.mkdir()
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    synthesize(root / "data", workers=2)  # the CLI's defaults
    run(["dvc", "add", "-q", "data"], root)
    fresh = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]
    committed = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    assert fresh["md5"] == committed["md5"], "synthetic data changed: regenerate it and `dvc add data` (see README)"
    assert fresh["nfiles"] == committed["nfiles"]


def test_repro_of_train_unet_writes_checkpoints_curves_and_no_resume_state(repo):
    import yaml

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update({"encoder": "tu-tinynet_e", "decoder_channels": [32, 16, 16, 8, 8]})
    params["train"].update({"epochs": 1, "device": "cpu"})
    params["tune"].update({"variants": ["set3-gbp"], "n_trials": 1, "epochs": 1})  # tune runs first: keep it tiny
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "train@unet"], repo).stdout
    assert "Running stage 'train@unet'" in out
    assert "Running stage 'train@baseline'" not in out
    seed_run = repo / "outputs" / "train" / "unet" / "seed0"  # train.seeds: [0]
    # The output holds only what depends on the inputs (no run id, no wall-clock times), so
    # DVC's lock and run cache can match it; the resume state is gone once the stage is done.
    assert sorted(p.name for p in seed_run.iterdir()) == ["best.pt", "history.csv", "metrics.json"]
    assert not (repo / "outputs" / "resume" / "unet").exists()
    own = json.loads((seed_run / "metrics.json").read_text())
    history = pd.read_csv(seed_run / "history.csv")
    assert "seconds" not in history.columns
    assert history["val_auc_macro"].max() == pytest.approx(own["val_auc_macro"], abs=1e-5)
