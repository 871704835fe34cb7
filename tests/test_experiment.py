"""Training and evaluation as MLflow runs, in a temporary SQLite store."""

from __future__ import annotations

import base64
import io
import json
import math

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cxrgaze.config import EvalConfig, resolve_run_config
from cxrgaze.experiment.evaluation import evaluate_tracked
from cxrgaze.experiment.training import train_tracked
from cxrgaze.registry import val_auc_of_model
from cxrgaze.runtime import resolve_device
from cxrgaze.tracking import read_run_file

pytestmark = pytest.mark.timeout(300)

FAST = {"model": {"encoder": "tu-tinynet_e"}, "train": {"epochs": 2, "batch_size": 16, "lr": 0.003}}


class _Stop:
    """A callback that fails the run after epoch ``at`` (a real exception inside training)."""

    def __init__(self, at: int, exc: type[BaseException]) -> None:
        self.at, self.exc = at, exc

    def on_epoch_end(self, record):
        if record["epoch"] == self.at:
            raise self.exc(f"stopped after epoch {self.at}")


def test_training_and_its_evaluation_are_a_run_and_its_nested_run(tiny_prepared, mlflow_store, tmp_path):
    prepared, split = tiny_prepared
    config = resolve_run_config(FAST, "unet")
    result, run_id = train_tracked(config, prepared, split, tmp_path / "train", progress=False)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "unet"
    assert client.get_experiment(run.info.experiment_id).name == "cxrgaze"
    assert run.data.params["model.encoder"] == "tu-tinynet_e"
    assert run.data.params["loss.gamma"] == str(config.loss.gamma)
    assert "loss.alpha" not in run.data.params and "loss.rrr_weight" not in run.data.params  # weights unet lacks
    assert run.data.params["data.image_size"] == "32"
    assert run.data.tags["cxrgaze.variant"] == "unet" and run.data.tags["cxrgaze.device"] == "cpu"
    assert run.data.tags["cxrgaze.version.torch"]
    history = client.get_metric_history(run_id, "epoch_val_auc_macro")
    assert [m.step for m in history] == [1, 2]
    assert run.data.metrics["best_val_auc_macro"] == pytest.approx(result.best["val_auc_macro"])
    assert read_run_file(tmp_path / "train")["run_id"] == run_id

    dicom_dir = prepared.parent / "data" / "mimic-cxr"
    evaluation, eval_run, model_uri = evaluate_tracked(tmp_path / "train", prepared, split, tmp_path / "eval",
                                                       EvalConfig(n_resamples=200), progress=False)
    # The evaluation is a run of its own below the training run, whose times stay its own.
    trained = client.get_run(run_id)
    assert (trained.info.end_time, trained.info.status) == (run.info.end_time, "FINISHED")
    assert not {"test_auc_macro", "val_auc_macro"} & set(trained.data.metrics)
    run = client.get_run(eval_run)
    assert run.info.run_name == "unet evaluation" and run.data.tags["mlflow.parentRunId"] == run_id
    assert run.info.start_time >= trained.info.end_time and run.data.tags["cxrgaze.kind"] == "evaluation"
    assert run.data.tags["cxrgaze.device"] == str(resolve_device("auto"))  # where it was evaluated (EvalConfig's)
    assert run.data.params["loss.gamma"] == str(config.loss.gamma) and "loss.alpha" not in run.data.params
    assert "epoch_val_auc_macro" not in run.data.metrics, "the curves stay in the training run"
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["cxrgaze.evaluated"] == "true"
    assert m["val_auc_macro"] == pytest.approx(result.best["val_auc_macro"], abs=1e-6), "evaluation = kept checkpoint"
    assert m["test_auc_macro_ci95_low"] <= m["test_auc_macro"] <= m["test_auc_macro_ci95_high"]
    assert m["test_auc_macro_paper_p2.5"] <= m["test_auc_macro_paper_p50"] <= m["test_auc_macro_paper_p97.5"]
    assert {"test_sal_mask_cc", "test_sal_generator_nss", "test_sal_mask_marker_mass"} <= set(m)
    # Calibration, the sanity checks and the heatmap counts are in the run.
    assert {"test_brier", "test_ece", "test_sens_at_spec90_CHF", "sanity_generator_passed",
            "sanity_generator_cascade_spearman", "test_sal_mask_cc_n", "val_sal_generator_cc"} <= set(m)
    assert m["test_sal_mask_cc_n"] + m["test_sal_mask_cc_nan"] == m["test_n"]
    figures = {a.path for a in client.list_artifacts(eval_run, "figures")}
    assert {"figures/roc.png", "figures/confusion.png", "figures/heatmaps.png", "figures/training.png",
            "figures/reliability.png"} <= figures
    evaluation_files = {a.path for a in client.list_artifacts(eval_run, "evaluation")}
    assert {"evaluation/scores.npz", "evaluation/sanity.json", "evaluation/saliency.csv"} <= evaluation_files
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["variant"] == "unet"
    # The run's page says what it is and its headline; the logged model is named after the variant.
    description = run.data.tags["mlflow.note.content"]
    assert description.startswith("**unet**: U-Net whose decoder mask is supervised by the gaze")
    assert (f"Test macro AUC **{m['test_auc_macro']:.3f}** [{m['test_auc_macro_ci95_low']:.3f}, "
            f"{m['test_auc_macro_ci95_high']:.3f}]") in description
    assert f"kept epoch {result.best_epoch + 1}." in description and model_uri in description
    assert client.get_run(run_id).data.tags["mlflow.note.content"].startswith(description)
    assert mlflow.get_logged_model(model_uri.split("/")[-1]).name == "unet"

    # The input example inside the model artifact is the purpose-made synthetic DICOM, not a
    # file of the user's data (patient data must not travel inside a model).
    import pydicom
    from mlflow.models import Model

    example = Model.load(model_uri).load_input_example(mlflow.artifacts.download_artifacts(model_uri))
    example_dicom = pydicom.dcmread(io.BytesIO(base64.b64decode(example["image"].iloc[0])))
    assert example_dicom.PatientID == "EXAMPLE" and example_dicom.Modality == "DX"
    data_patients = set(pd.read_csv(prepared / "manifest.csv", dtype=str)["patient_id"])
    assert example_dicom.PatientID not in data_patients

    # The logged model serves raw DICOM bytes with the preprocessing of `prepare`:
    # it must give the probabilities of the evaluation for the same case.
    manifest = pd.read_csv(prepared / "manifest.csv", dtype=str).set_index("dicom_id")
    predictions = pd.read_csv(tmp_path / "eval" / "predictions.csv", dtype={"dicom_id": str})
    case = predictions[predictions["split"] == "test"].iloc[0]
    payload = base64.b64encode((dicom_dir / manifest.loc[case["dicom_id"], "path"]).read_bytes()).decode()
    served = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": [payload]}), params={"heatmap": "none"})
    cols = ["prob_Normal", "prob_CHF", "prob_pneumonia"]
    np.testing.assert_allclose(served[cols].to_numpy()[0], case[cols].to_numpy(float), atol=1e-5)
    # ... and so the registry's re-evaluation of a champion on raw DICOMs matches evaluation.
    assert val_auc_of_model(model_uri, prepared, split, dicom_dir) == pytest.approx(m["val_auc_macro"], abs=1e-4)


def test_each_evaluation_is_a_run_nested_under_the_training_run(tiny_prepared, mlflow_store, tmp_path, monkeypatch):
    """Every evaluation gets a run of its own, below the run that trained the checkpoint
    (found by the checkpoint's hash) or, without one in the store, at the top with the
    training curves copied; the runs are found again by what they produced, preferring
    the current revision's and DVC experiment's."""
    from cxrgaze.experiment.evaluation import evaluation_run
    from cxrgaze.tracking import file_digest

    prepared, split = tiny_prepared
    train_dir = tmp_path / "train"
    _, train_run = train_tracked(resolve_run_config(FAST, "unet"), prepared, split, train_dir, progress=False)
    (train_dir / "run.json").unlink()  # as in the pipeline: the run is found by the checkpoint's hash
    client = MlflowClient()
    assert client.get_run(train_run).data.tags["cxrgaze.checkpoint_sha256"] == file_digest(train_dir / "best.pt")

    monkeypatch.setenv("DVC_EXP_NAME", "fewer-resamples")  # what `dvc exp run` sets
    other = evaluate_tracked(train_dir, prepared, split, tmp_path / "eval0", EvalConfig(n_resamples=100),
                             progress=False)[1]
    monkeypatch.delenv("DVC_EXP_NAME")
    first = evaluate_tracked(train_dir, prepared, split, tmp_path / "eval1", EvalConfig(n_resamples=200),
                             progress=False)[1]
    assert len({other, first, train_run}) == 3
    for run_id, resamples in ((other, "100"), (first, "200")):
        run = client.get_run(run_id)
        assert run.info.run_name == "unet evaluation" and run.data.tags["mlflow.parentRunId"] == train_run
        assert run.data.params["evaluate.n_resamples"] == resamples
        assert run.data.params["model.encoder"] == "tu-tinynet_e"
        assert not client.get_metric_history(run_id, "epoch_val_auc_macro"), "the curves are the parent's"
    assert client.get_run(other).data.tags["cxrgaze.dvc_experiment"] == "fewer-resamples"
    assert "cxrgaze.dvc_experiment" not in client.get_run(first).data.tags
    assert "evaluate.n_resamples" not in client.get_run(train_run).data.params, "the training run is left alone"
    assert evaluation_run(tmp_path / "eval0")[:2] == (other, client.get_run(other).data.tags["cxrgaze.model_uri"])
    assert evaluation_run(tmp_path / "eval0")[2] is False, "eval0's run is of another DVC experiment"
    assert evaluation_run(tmp_path / "eval1")[0] == first

    # A store without the training run (deleted here; a pulled checkpoint elsewhere): a
    # top-level run with the training curves copied.
    client.delete_run(train_run)
    alone = evaluate_tracked(train_dir, prepared, split, tmp_path / "eval2", EvalConfig(n_resamples=150),
                             progress=False)[1]
    run = client.get_run(alone)
    assert "mlflow.parentRunId" not in run.data.tags and run.data.params["evaluate.n_resamples"] == "150"
    assert [m.step for m in client.get_metric_history(alone, "epoch_val_auc_macro")] == [1, 2]
    assert evaluation_run(tmp_path / "eval2")[0] == alone


def test_a_failing_run_ends_failed(tiny_prepared, mlflow_store, tmp_path):
    prepared, split = tiny_prepared
    with pytest.raises(RuntimeError, match="stopped after epoch 0"):
        train_tracked(resolve_run_config(FAST, "baseline"), prepared, split, tmp_path / "train",
                      callbacks=[_Stop(0, RuntimeError)], progress=False)
    run_id = read_run_file(tmp_path / "train")["run_id"]
    assert MlflowClient().get_run(run_id).info.status == "FAILED"


def test_an_interrupted_run_resumes_into_the_same_mlflow_run(tiny_prepared, mlflow_store, tmp_path):
    prepared, split = tiny_prepared
    config = resolve_run_config(FAST, "baseline")
    with pytest.raises(KeyboardInterrupt):
        train_tracked(config, prepared, split, tmp_path / "train", callbacks=[_Stop(0, KeyboardInterrupt)],
                      progress=False)
    first = read_run_file(tmp_path / "train")["run_id"]
    result, run_id = train_tracked(config, prepared, split, tmp_path / "train", progress=False)
    assert run_id == first
    client = MlflowClient()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "epoch_val_auc_macro")] == [1, 2]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    assert math.isfinite(result.best["val_auc_macro"])


def test_the_experiment_opens_as_model_training_with_a_description(mlflow_store):
    """MLflow's UI opens a ``custom_model_development`` experiment on its runs table and shows
    the note as its description; a description the user wrote is not overwritten."""
    from cxrgaze.tracking import set_experiment

    client = MlflowClient()
    experiment_id = set_experiment()
    tags = client.get_experiment(experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert "test_auc_macro" in tags["mlflow.note.content"] and "shortcut" in tags["mlflow.note.content"]
    assert f"(#/experiments/{experiment_id}/runs?viewStateShareKey=cxrgaze-results&" in tags["mlflow.note.content"]
    # The results view is a search MLflow runs: evaluated runs only, best test AUC first.
    view = json.loads(tags["mlflow.sharedViewState.cxrgaze-results"])
    for name, evaluated, auc in (("unet", None, None), ("a evaluation", "true", 0.6), ("b evaluation", "true", 0.7)):
        with mlflow.start_run(run_name=name, experiment_id=experiment_id):
            if evaluated:
                mlflow.set_tag("cxrgaze.evaluated", evaluated)
                mlflow.log_metric("test_auc_macro", auc)
    order = view["orderByKey"] + (" ASC" if view["orderByAsc"] else " DESC")
    found = client.search_runs([experiment_id], view["searchFilter"], order_by=[order])
    assert [r.info.run_name for r in found] == ["b evaluation", "a evaluation"]
    assert "metrics.`test_auc_macro_ci95_low`" in view["selectedColumns"]
    # An older cxrgaze's description (and view) is replaced; a description the user wrote stays.
    client.set_experiment_tag(experiment_id, "mlflow.note.content", "Chest X-ray classifiers (Normal / CHF / "
                              "pneumonia) whose ... (an older version's text)")
    client.delete_experiment_tag(experiment_id, "cxrgaze.note_sha256")
    client.set_experiment_tag(experiment_id, "mlflow.sharedViewState.cxrgaze-results", "{}")
    set_experiment()
    assert client.get_experiment(experiment_id).tags == tags
    client.set_experiment_tag(experiment_id, "mlflow.note.content", "my own notes")
    set_experiment()
    assert client.get_experiment(experiment_id).tags["mlflow.note.content"] == "my own notes"


def test_a_tag_write_lost_to_a_concurrent_labeller_is_retried(mlflow_store, monkeypatch):
    """Two commands started together label one new experiment at once; the slower one's first
    tag insert fails as a duplicate key (as PostgreSQL answers it behind a tracking server).
    ``set_experiment`` re-reads the tags and finishes the labelling instead of failing."""
    from mlflow.exceptions import MlflowException

    from cxrgaze.tracking import set_experiment

    client = MlflowClient()
    experiment_id = set_experiment()
    labelled = client.get_experiment(experiment_id).tags
    for key in ("mlflow.experimentKind", "mlflow.note.content", "cxrgaze.note_sha256"):
        client.delete_experiment_tag(experiment_id, key)
    real, calls = MlflowClient.set_experiment_tag, []

    def set_tag_after_the_other_worker(self, exp_id, key, value):
        calls.append(key)
        if len(calls) == 1:  # the other worker inserts this tag first; ours is a duplicate
            real(self, exp_id, key, value)
            raise MlflowException('duplicate key value violates unique constraint "experiment_tag_pk"')
        return real(self, exp_id, key, value)

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", set_tag_after_the_other_worker)
    assert set_experiment() == experiment_id
    assert client.get_experiment(experiment_id).tags == labelled
    assert calls.count(calls[0]) == 1  # the retry saw the other worker's tag and left it alone
    # A store that keeps refusing still fails loudly, after a few rounds.
    client.delete_experiment_tag(experiment_id, "mlflow.experimentKind")
    monkeypatch.setattr(MlflowClient, "set_experiment_tag",
                        lambda *a: (_ for _ in ()).throw(MlflowException("store is read-only")))
    with pytest.raises(Exception, match="store is read-only"):
        set_experiment()
