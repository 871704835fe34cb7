"""DVC the way its users work, on a tiny profile in a temporary git repository.

With a local-directory remote: `dvc repro`, commit, `dvc push`; then `dvc exp run -S` of
an evaluation param: the params file DVC rewrote still means the same to every stage, the
later stages run, `dvc exp diff` shows the metric change, and MLflow tells the
experiment's runs from the baseline's. Commit and push that too; a fresh `git clone`,
`dvc pull`: `dvc status` is clean and `dvc repro` runs nothing; with the run cache pulled,
going back to the first value restores the evaluation instead of rerunning it. The README
section "DVC: experiments, remotes, clones" describes exactly these commands.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from conftest import run, tiny_pipeline_project

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

VARIANTS = {"baseline": {"loss": {"gamma": 1.0}, "model": {"dropout": 0.0}}, "set3-gbp": {}}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dvcflow")
    root = tiny_pipeline_project(folder / "repo", VARIANTS, remote=folder / "dvc-remote")
    run(["dvc", "repro"], root)
    run(["git", "add", "-A"], root)  # dvc.lock, metrics/, reports/: what a commit of a result holds
    run(["git", "commit", "-qm", "results"], root)
    run(["dvc", "push", "--run-cache"], root)
    return root


def _runs(root) -> list[dict]:
    with sqlite3.connect(root / "mlflow.db") as db:
        rows = db.execute("SELECT run_uuid, name FROM runs ORDER BY start_time").fetchall()
        tags = db.execute("SELECT run_uuid, key, value FROM tags").fetchall()
        params = db.execute("SELECT run_uuid, key, value FROM params").fetchall()
    out = []
    for run_id, name in rows:
        out.append({"id": run_id, "name": name, "tags": {k: v for r, k, v in tags if r == run_id},
                    "params": {k: v for r, k, v in params if r == run_id}})
    return out


def test_committed_results_compare_against_head(repo):
    assert run(["git", "status", "--porcelain"], repo).stdout == "", "the pipeline's files are all committed"
    diff = run(["dvc", "metrics", "diff", "HEAD"], repo)
    assert "failed to load" not in diff.stdout + diff.stderr
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    files = {path for rev in shown.values() for path in rev["data"]}
    assert files == {"metrics/prepare.json", "metrics/split.json", "metrics/tune.json", "metrics/headline.json"}
    headline = json.loads((repo / "metrics" / "headline.json").read_text())
    assert set(headline) == set(VARIANTS) and 0 <= headline["set3-gbp"]["test_auc_macro"] <= 1


def test_forced_reruns_reproduce_the_committed_outputs(repo):
    """Evaluation and report depend only on their inputs: rerun, they write the bytes that
    dvc.lock and git hold (MLflow gets new runs; nothing tracked changes)."""
    for stage in ("evaluate@set3-gbp", "report"):
        out = run(["dvc", "repro", "--force", "--single-item", stage], repo).stdout
        assert f"Running stage '{stage}'" in out
    assert run(["git", "status", "--porcelain"], repo).stdout == ""
    assert "up to date" in run(["dvc", "status"], repo).stdout


def test_exp_run_set_param_reruns_later_stages_and_diffs_metrics(repo):
    before = json.loads((repo / "metrics" / "headline.json").read_text())
    n_runs = len(_runs(repo))
    out = run(["dvc", "exp", "run", "-n", "fewer-resamples", "-S", "evaluate.n_resamples=300"], repo).stdout
    # DVC rewrote params.yaml (quotes and flow lists gone): nothing it did not set changed meaning.
    assert "Running stage 'tune'" not in out and "Running stage 'train@" not in out, out
    for stage in ("evaluate@baseline", "evaluate@set3-gbp", "report", "register"):
        assert f"Running stage '{stage}'" in out, out
    diff = json.loads(run(["dvc", "exp", "diff", "--json"], repo).stdout)
    changed = diff["metrics"]["metrics/headline.json"]
    assert "set3-gbp.test_auc_macro_ci95_low" in changed or "baseline.test_auc_macro_ci95_low" in changed, changed
    assert diff["params"]["params.yaml"]["evaluate.n_resamples"] == {"old": 200, "new": 300, "diff": 100}
    assert json.loads((repo / "metrics" / "headline.json").read_text()) != before
    shown = run(["dvc", "exp", "show", "--csv"], repo).stdout
    assert "fewer-resamples" in shown and ",!," not in shown

    runs = _runs(repo)
    trained = {r["id"] for r in runs[:n_runs] if r["tags"].get("cxrgaze.kind") == "train"}
    evaluations = [r for r in runs[n_runs:] if r["tags"].get("cxrgaze.evaluated") == "true"]
    assert sorted(r["name"] for r in evaluations) == sorted(f"{v} evaluation" for v in VARIANTS)
    for r in evaluations:  # tagged with the experiment, nested under the baseline's training runs
        assert r["tags"]["cxrgaze.dvc_experiment"] == "fewer-resamples"
        assert r["params"]["evaluate.n_resamples"] == "300"
        assert r["tags"]["mlflow.parentRunId"] in trained
    for r in runs[:n_runs]:  # the baseline's runs are as they were, their descriptions too
        if r["tags"].get("cxrgaze.evaluated") == "true":
            assert r["params"]["evaluate.n_resamples"] == "200" and "cxrgaze.dvc_experiment" not in r["tags"]
        if r["id"] in trained:
            assert not any(e["id"] in r["tags"]["mlflow.note.content"] for e in evaluations)
    report = [r for r in runs[n_runs:] if r["name"] == "report"]
    assert len(report) == 1 and report[0]["tags"]["cxrgaze.dvc_experiment"] == "fewer-resamples"


def test_push_clone_pull_is_clean_without_retraining(repo, tmp_path):
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "fewer resamples"], repo)
    # After each commit: DVC 3.67's `push --all-commits` pushes only HEAD's outputs (treeverse/dvc#10617).
    run(["dvc", "push", "--run-cache"], repo)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    status = run(["dvc", "status"], clone).stdout
    assert "up to date" in status, status
    assert (clone / "outputs" / "train" / "set3-gbp" / "seed0" / "best.pt").exists()
    out = run(["dvc", "repro"], clone).stdout
    assert "Running stage" not in out, out
    assert run(["git", "status", "--porcelain"], clone).stdout == ""
    diff = run(["dvc", "metrics", "diff", "HEAD~1"], clone)  # the committed results before the experiment
    assert "failed to load" not in diff.stdout + diff.stderr and "headline.json" in diff.stdout
    plots = json.loads(run(["dvc", "plots", "diff", "HEAD~1", "--json"], clone).stdout)
    assert plots["data"]["metrics/history/set3-gbp.csv"][0]["revisions"] == ["workspace", "HEAD~1"]

    # The run cache: going back to the first repro's value restores its stages (train was
    # never rerun) instead of running them; `register` logs the restored evaluations, which
    # this clone's fresh MLflow store has never seen, and registers their models.
    # `--pull` downloads the run records and the outputs of the run it restores (DVC 3.67's
    # `dvc pull --run-cache` fetches the records alone).
    out = run(["dvc", "exp", "run", "--pull", "-S", "evaluate.n_resamples=200"], clone).stdout
    for variant in VARIANTS:
        assert f"Stage 'evaluate@{variant}' is cached - skipping run" in out, out
        assert f"Running stage 'train@{variant}'" not in out
    assert "Running stage 'register'" in out
    restored = [r for r in _runs(clone) if r["tags"].get("cxrgaze.restored_evaluation") == "true"]
    assert sorted(r["name"] for r in restored) == sorted(f"{v} evaluation" for v in VARIANTS)
    assert all(r["tags"]["cxrgaze.evaluated"] == "true" for r in restored)
    assert not any("mlflow.parentRunId" in r["tags"] for r in restored), "no training run in this store"
    decision = json.loads((clone / "outputs" / "register.json").read_text())
    assert set(decision["versions"]) == set(VARIANTS) and decision["champion_version"]


    # Training is run-cacheable too (its outputs are not `persist`): one epoch trains anew,
    # going back to two restores every stage of the first run instead of retraining.
    out = run(["dvc", "exp", "run", "-S", "train.epochs=1"], clone).stdout
    assert "Running stage 'train@set3-gbp'" in out
    out = run(["dvc", "exp", "run", "-S", "train.epochs=2"], clone).stdout
    for stage in ("tune", *(f"train@{v}" for v in VARIANTS), *(f"evaluate@{v}" for v in VARIANTS)):
        assert f"Stage '{stage}' is cached - skipping run" in out, out
