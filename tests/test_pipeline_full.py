"""The whole pipeline: `dvc repro` of a tiny profile in a temporary git repository ends with
MLflow runs, figures, a report and a champion; a second `dvc repro` changes nothing."""

from __future__ import annotations

import json
import sqlite3

import pytest

from conftest import ROOT, run, tiny_pipeline_project

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

VARIANTS = {"baseline": {"loss": {"gamma": 1.0}, "model": {"dropout": 0.0}}, "unet": {}, "set3-gbp": {},
            "rrr-grad": {"model": {"dropout": 0.0}}}  # rrr: a model without decoder that is not the baseline


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tiny_pipeline_project(tmp_path_factory.mktemp("full"), VARIANTS)
    run(["dvc", "repro"], root)
    return root


def _runs(root) -> list[tuple[str, str]]:
    with sqlite3.connect(root / "mlflow.db") as db:
        return db.execute("SELECT name, status FROM runs ORDER BY start_time").fetchall()


def test_repro_ends_with_runs_figures_report_and_champion(repo):
    runs = _runs(repo)
    names = [name for name, _ in runs]
    for variant in VARIANTS:
        assert names.count(variant) == 1, names
        figures = repo / "outputs" / "figures" / variant / "seed0"  # train.seeds: [0]
        assert {"roc.png", "confusion.png", "heatmaps.png", "training.png", "reliability.png"} <= {
            p.name for p in figures.iterdir()}
        assert not (repo / "outputs" / "eval" / variant / "seed0" / "run.json").exists()  # no run id in an output
        model_uri = _evaluation_model(repo, variant)
        assert model_uri.startswith("models:/")
        summary = json.loads((repo / "outputs" / "eval" / variant / "metrics.json").read_text())
        assert summary["n_seeds"] == 1 and summary["scoring"] == "sigmoid"
    assert all(status == "FINISHED" for _, status in runs), runs
    results = (repo / "reports" / "results.md").read_text()
    assert "| set3-gbp |" in results and "vs unet" in results
    for section in ("## Paired comparisons", "## Calibration", "## Sanity checks", "## Tuning", "budgets differ"):
        assert section in results
    metrics = json.loads((repo / "reports" / "results.json").read_text())
    assert set(metrics) == set(VARIANTS) == set(json.loads((repo / "metrics" / "headline.json").read_text()))
    assert metrics["set3-gbp"]["diff_vs_unet_low"] <= metrics["set3-gbp"]["diff_vs_unet"]
    decision = json.loads((repo / "outputs" / "register.json").read_text())
    assert decision["champion_version"] and set(decision["versions"]) == set(VARIANTS)
    shown = run(["dvc", "metrics", "show", "--json"], repo).stdout
    assert "test_auc_macro" in shown


def _evaluation_model(repo, variant: str) -> str:
    """The model URI of the run that holds ``variant``'s seed-0 evaluation (found by its tag)."""
    import os

    import mlflow

    from cxrgaze.experiment.evaluation import evaluation_run

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    cwd = os.getcwd()
    os.chdir(repo)  # the git revision of the run's context is the project's
    try:
        found = evaluation_run(repo / "outputs" / "eval" / variant / "seed0")
    finally:
        os.chdir(cwd)
        mlflow.set_tracking_uri(None)
    assert found is not None and found[2], f"no evaluation run of this revision for {variant}"
    return found[1]


def test_second_repro_changes_nothing_and_moves_nothing(repo):
    before = json.loads((repo / "outputs" / "register.json").read_text())
    n_runs = len(_runs(repo))
    out = run(["dvc", "repro"], repo).stdout
    assert "Running stage" not in out, out
    assert len(_runs(repo)) == n_runs
    assert json.loads((repo / "outputs" / "register.json").read_text()) == before


def test_champion_is_served_by_alias(repo):
    import base64

    import mlflow
    import pandas as pd

    manifest = pd.read_csv(repo / "outputs" / "prepared" / "manifest.csv", dtype=str)
    payload = base64.b64encode((repo / "data" / "mimic-cxr" / manifest["path"].iloc[0]).read_bytes()).decode()
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    try:
        out = mlflow.pyfunc.load_model("models:/cxrgaze@champion").predict(pd.DataFrame({"image": [payload]}))
    finally:
        mlflow.set_tracking_uri(None)
    scores = out[["prob_Normal", "prob_CHF", "prob_pneumonia"]].to_numpy()[0]
    assert out["scoring"].iloc[0] == "sigmoid"  # loss.cls_loss: bce -> a sigmoid per class
    assert out["label"].iloc[0] == ("Normal", "CHF", "pneumonia")[scores.argmax()]
    assert ((0 < scores) & (scores < 1)).all()


def test_the_mlflow_and_optuna_pages_tell_the_story_in_a_real_browser(repo, tmp_path):
    """docs/screenshots.py, as the README's images were made: real `mlflow ui` and
    `optuna-dashboard` servers over the pipeline's stores, headless Chromium; every page must
    render its text (the runs table, the champion's run with its test AUC, its heatmap
    panel, the registry with the `champion` alias and the promotion rule, the study)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "screenshots.py"), "--root", str(repo),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "mlflow-champion-run.png", "mlflow-heatmaps.png", "mlflow-registry.png", "mlflow-results-view.png", "mlflow-runs.png",
        "optuna-dashboard.png"]


def test_a_forced_rerun_reproduces_every_output_and_leaves_git_clean(repo):
    """`make demo` twice on one machine leaves the tree clean: every stage output holds no
    wall-clock time or run id, so rerunning every stage (`dvc repro -f`) rewrites the same
    bytes, `dvc.lock` and the committed metrics and reports do not change, and the runs of
    the rerun are tagged with a clean commit (no `-dirty`)."""
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "first repro"], repo)
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    with sqlite3.connect(repo / "mlflow.db") as db:
        before = {r for (r,) in db.execute("SELECT run_uuid FROM runs")}
    run(["dvc", "repro", "-f"], repo)
    assert run(["git", "status", "--porcelain"], repo).stdout == ""
    assert "up to date" in run(["dvc", "status"], repo).stdout
    with sqlite3.connect(repo / "mlflow.db") as db:
        commits = {value for run_id, value in db.execute(
            "SELECT run_uuid, value FROM tags WHERE key = 'mlflow.source.git.commit'") if run_id not in before}
    assert commits == {head}
