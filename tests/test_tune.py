"""Optuna tuning of set 3: studies end to end with real training on the tiny dataset, MLflow
runs, resume, failed and pruned trials, dead workers, and two real worker processes."""

from __future__ import annotations

import shutil
import time

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cxrgaze.cli import main as cli_main
from cxrgaze.config import ConfigError, tune_config
from cxrgaze.tune.overrides import load_tuned, merge_overrides
from cxrgaze.tune.storage import TRIAL_RUN_ATTR, live_trials, open_study
from cxrgaze.tune.study import run_study
from cxrgaze.tune.worker import run_worker

TINY = {
    "model": {"encoder": "tu-tinynet_e", "decoder_channels": [32, 16, 16, 8, 8]},
    "train": {"batch_size": 16, "lr": 0.003, "device": "cpu"},
    "variants": {"unet": {}, "set3-gbp": {}, "set3-deconv": {}},
}
ALPHA_LR = {"alpha": {"low": 0.0, "high": 1.0}, "lr": {"low": 1e-3, "high": 3e-2, "log": True}}
GOOD_LR, USELESS_LR, DIVERGING_LR = 1e-2, 1e-9, 1e30
"""On the tiny data: val macro AUC 0.93 after one epoch; 0.32 (no learning); NaN loss in epoch 1."""


def tiny_params(tmp_path, **tune) -> dict:
    return {**TINY, "tune": {"storage": f"sqlite:///{tmp_path}/optuna.db", "variants": ["set3-gbp"], "n_trials": 3,
                             "epochs": 1, "n_startup_trials": 10, "n_warmup_steps": 0,
                             "space": {"alpha": {"low": 0.0, "high": 1.0}}, **tune}}


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory):
    """A migrated, empty MLflow SQLite store (migrating takes seconds; copying it does not)."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def use_fresh_tracking(mlflow_template, folder, monkeypatch) -> MlflowClient:
    """A fresh MLflow store in ``folder``, which becomes the working folder (artifacts land there)."""
    shutil.copyfile(mlflow_template, folder / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/mlflow.db")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(folder)
    return MlflowClient()


@pytest.fixture
def tracking(mlflow_template, tmp_path, monkeypatch) -> MlflowClient:
    return use_fresh_tracking(mlflow_template, tmp_path, monkeypatch)


def child_runs(client: MlflowClient, parent_id: str) -> list:
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def tune_cli(tmp_path, params: dict, prepared, split, *extra: str) -> int:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return cli_main(["tune", "--variant", "set3-gbp", "--params", str(path), "--prepared", str(prepared),
                     "--split", str(split), "--out", str(tmp_path / "best.yaml"), *extra])


def test_three_trial_study_end_to_end_then_resume(tiny_prepared, tracking, tmp_path):
    prepared, split = tiny_prepared
    params = tiny_params(tmp_path)
    assert tune_cli(tmp_path, params, prepared, split) == 0

    study = optuna.load_study(study_name="cxrgaze-set3-gbp", storage=params["tune"]["storage"])
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    best = max(trials, key=lambda t: t.value)
    tuned = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert tuned == {"unet": {}, "set3-gbp": {"loss": {"alpha": best.params["alpha"]}}, "set3-deconv": {}}
    assert load_tuned(tmp_path / "best.yaml", "set3-gbp") == {"loss": {"alpha": best.params["alpha"]}}

    parent_id = study.user_attrs["cxrgaze.mlflow_parent_run_id"]
    parent = tracking.get_run(parent_id)
    assert parent.info.run_name == "tune-set3-gbp" and parent.info.status == "FINISHED"
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.metrics["best_alpha"] == pytest.approx(best.params["alpha"])
    assert {a.path for a in tracking.list_artifacts(parent_id)} == {"optimization_history.png", "param_importances.png"}
    children = child_runs(tracking, parent_id)
    assert sorted(r.info.run_name for r in children) == [f"set3-gbp-trial-{n}" for n in range(3)]
    for run in children:
        trial = trials[int(run.data.tags["optuna.trial.number"])]
        assert trial.user_attrs[TRIAL_RUN_ATTR] == run.info.run_id
        assert float(run.data.params["loss.alpha"]) == pytest.approx(trial.params["alpha"])
        assert run.data.params["train.epochs"] == "1"
        assert run.data.tags["optuna.trial.state"] == "COMPLETE" and run.info.status == "FINISHED"
        assert run.data.metrics["best_val_auc_macro"] == pytest.approx(trial.value)
        assert [m.step for m in tracking.get_metric_history(run.info.run_id, "epoch_val_auc_macro")] == [1]  # 1-based
        assert run.data.metrics["objective"] == pytest.approx(trial.value)  # what Optuna maximised, by name
        assert run.data.metrics["best_epoch"] == 1

    # Resume: the same total adds nothing (best.yaml is still written); a larger one adds the missing trials.
    (tmp_path / "best.yaml").unlink()
    assert tune_cli(tmp_path, params, prepared, split) == 0
    assert len(study.get_trials()) == 3 and (tmp_path / "best.yaml").exists()
    assert tune_cli(tmp_path, params, prepared, split, "--n-trials", "5") == 0
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert len({t.params["alpha"] for t in trials}) == 5  # a resumed run does not replay the first proposals
    assert len(child_runs(tracking, parent_id)) == 5
    assert tracking.get_run(parent_id).data.metrics["trials_complete"] == 5


@pytest.fixture(scope="module")
def mixed_study(tiny_prepared, mlflow_template, tmp_path_factory):
    """Enqueued trials: two good ones, one whose loss diverges, one that cannot learn."""
    prepared, split = tiny_prepared
    folder = tmp_path_factory.mktemp("mixed")
    with pytest.MonkeyPatch.context() as monkeypatch:
        client = use_fresh_tracking(mlflow_template, folder, monkeypatch)
        params = tiny_params(folder, n_trials=4, epochs=2, n_startup_trials=2, space=ALPHA_LR)
        cfg = tune_config(params)
        study = open_study(cfg, "set3-gbp")
        for lr in (GOOD_LR, GOOD_LR, DIVERGING_LR, USELESS_LR):
            study.enqueue_trial({"alpha": 0.5, "lr": lr})
        result = run_study(params, cfg, "set3-gbp", prepared, split)
    return study, result, client  # the client keeps its store; the environment is restored


@pytest.mark.filterwarnings("ignore:Fixed parameter lr with value:UserWarning")
def test_a_failing_trial_is_recorded_and_the_study_goes_on(mixed_study):
    study, result, client = mixed_study
    trials = study.get_trials()
    assert len(trials) == 4 and trials[2].state == TrialState.FAIL and trials[3].state != TrialState.FAIL
    run = client.get_run(trials[2].user_attrs[TRIAL_RUN_ATTR])
    assert run.info.status == "FAILED" and run.data.tags["optuna.trial.state"] == "FAIL"
    assert run.data.tags["cxrgaze.error"].startswith("TrainingDiverged: set3-gbp: loss is nan")
    assert result.states["FAIL"] == 1 and result.best_trial in (0, 1)


@pytest.mark.filterwarnings("ignore:Fixed parameter lr with value:UserWarning")
def test_a_clearly_worse_trial_is_pruned(mixed_study):
    study, result, client = mixed_study
    trials = study.get_trials()
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE] * 2
    assert trials[3].state == TrialState.PRUNED and list(trials[3].intermediate_values) == [0]
    run = client.get_run(trials[3].user_attrs[TRIAL_RUN_ATTR])
    # Pruned on purpose, not a failure: FINISHED in MLflow, the state and the reason in tags.
    assert run.info.status == "FINISHED" and run.data.tags["optuna.trial.state"] == "PRUNED"
    assert "below the median" in run.data.tags["cxrgaze.pruned"] and "objective" not in run.data.metrics
    assert result.states == {"COMPLETE": 2, "PRUNED": 1, "FAIL": 1, "RUNNING": 0, "WAITING": 0}


def test_two_worker_processes_share_one_study_exactly(tiny_prepared, tracking, tmp_path):
    prepared, split = tiny_prepared
    params = tiny_params(tmp_path, storage=f"journal:{tmp_path}/optuna.journal", n_trials=6, workers=2)
    result = run_study(params, tune_config(params), "set3-gbp", prepared, split)
    study = optuna.load_study(study_name="cxrgaze-set3-gbp", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))))
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.params["alpha"] for t in trials}) == 6  # the workers do not propose the same values
    children = child_runs(tracking, result.parent_run_id)
    assert sorted(r.info.run_name for r in children) == [f"set3-gbp-trial-{n}" for n in range(6)]
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs[TRIAL_RUN_ATTR] for t in trials)
    assert len({r.data.tags["cxrgaze.worker"] for r in children}) == 2  # both processes ran trials


def test_several_workers_on_sqlite_are_refused(tiny_prepared, tmp_path, capsys):
    prepared, split = tiny_prepared
    assert tune_cli(tmp_path, tiny_params(tmp_path), prepared, split, "--workers", "2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "journal:" in err and "postgresql" in err


def test_a_dead_workers_trial_is_failed_and_retried(tiny_prepared, tracking, tmp_path):
    prepared, split = tiny_prepared
    params = tiny_params(tmp_path, n_trials=2, heartbeat_interval=1, grace_period=2)
    cfg = tune_config(params)
    study = open_study(cfg, "set3-gbp")
    with pytest.warns(UserWarning, match="Heartbeat"):
        dead = study.ask({"alpha": optuna.distributions.FloatDistribution(0.0, 1.0)})
    study._storage.record_heartbeat(dead._trial_id)  # its worker's last sign of life
    time.sleep(2.5)
    run_worker(params, cfg, "set3-gbp", prepared, split)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    # The retry is trial 1 or 2 (SQLite's clock has 1 s steps: the first check may find it not yet stale).
    retries = [t for t in trials if t.system_attrs.get("retry_history") == [0]]
    assert len(retries) == 1 and retries[0].params == trials[0].params
    assert [t.number for t in live_trials(study)] == [1, 2]


def test_a_study_refuses_another_training_config(tiny_prepared, tracking, tmp_path):
    prepared, split = tiny_prepared
    params = tiny_params(tmp_path, n_trials=1)
    cfg = tune_config(params)
    run_worker(params, cfg, "set3-gbp", prepared, split)
    other = merge_overrides(params, {"model": {"dropout": 0.2}}, "set3-gbp")
    with pytest.raises(ConfigError, match=r"another training config \(model.dropout: 0.5 -> 0.2\)"):
        run_worker(other, cfg, "set3-gbp", prepared, split)
    # The searched value and train.epochs (replaced by tune.epochs) are not part of it.
    run_worker(merge_overrides(params, {"loss": {"alpha": 0.9}, "train": {"epochs": 50}}, "set3-gbp"),
               cfg, "set3-gbp", prepared, split)


def test_merge_overrides_puts_tuned_values_over_the_variants_own():
    params = {"loss": {"alpha": 0.5, "gamma": 0.4}, "variants": {"set3-gbp": {"loss": {"gamma": 0.3}}}}
    merged = merge_overrides(params, {"loss": {"alpha": 0.7}, "train": {"lr": 0.01}}, "set3-gbp")
    assert merged["variants"]["set3-gbp"] == {"loss": {"gamma": 0.3, "alpha": 0.7}, "train": {"lr": 0.01}}
    assert params["variants"]["set3-gbp"] == {"loss": {"gamma": 0.3}}  # not modified
    assert merge_overrides(params, {}, "set3-deconv")["variants"]["set3-deconv"] == {}


@pytest.mark.parametrize("tune, message", [
    ({"variants": ["set4-gbp"]}, "tune.variants must be"),
    ({"variants": ["unet"]}, "unet uses none of tune.space"),  # the default space is alpha: set 3 only
    ({"variants": ["baseline"], "space": {"gamma": {"low": 0, "high": 1}}}, "baseline uses none of tune.space"),
    ({"space": {"beta": {"low": 0, "high": 1}}}, "unknown name"),
    ({"space": {"alpha": {"low": 0.5, "high": 1.5}}}, "within"),
    ({"space": {"lr": {"low": 0.0, "high": 0.1, "log": True}}}, r"tune.space.lr: .*low > 0"),
    ({"storage": "mysql://x/y"}, "sqlite:///FILE, journal:FILE or postgresql"),
    ({"n_trial": 3}, "unknown key"),
])
def test_bad_tune_sections_are_refused(tune, message):
    with pytest.raises(ConfigError, match=message):
        tune_config({"tune": tune})


def test_gaze_aware_objective_and_rrr_weight_search(tiny_prepared, tracking, tmp_path):
    """With ``train.selection_gaze_weight`` the study maximises validation AUC minus the
    generator's outside-gaze mass, the score that also picks the checkpoint; rrr-grad
    searches its own weight, on a log scale."""
    prepared, split = tiny_prepared
    params = tiny_params(tmp_path, variants=["rrr-grad"], n_trials=2,
                         space={"rrr_weight": {"low": 1e-6, "high": 1e-2, "log": True}})
    params["train"] = {**params["train"], "selection_gaze_weight": 1.0}
    params["variants"] = {**params["variants"], "rrr-grad": {"model": {"dropout": 0.0}}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert cli_main(["tune", "--variant", "rrr-grad", "--params", str(path), "--prepared", str(prepared),
                     "--split", str(split), "--out", str(tmp_path / "best.yaml")]) == 0
    study = optuna.load_study(study_name="cxrgaze-rrr-grad", storage=params["tune"]["storage"])
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(1e-6 <= t.params["rrr_weight"] <= 1e-2 for t in trials)
    for trial in trials:
        run = tracking.get_run(trial.user_attrs[TRIAL_RUN_ATTR])
        m = run.data.metrics
        assert m["best_val_selection"] == pytest.approx(trial.value)
        assert trial.value == pytest.approx(m["best_val_auc_macro"] - m["best_val_outside_mass"])
        assert 0 < m["best_val_outside_mass"] <= 1
    best = max(trials, key=lambda t: t.value)
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["rrr-grad"] == {"loss": {"rrr_weight": best.params["rrr_weight"]}}
