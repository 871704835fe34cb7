"""The report from a fake evaluation folder: metrics.json and scores.npz written with the
scores helper, then build_report / write_report / to_json checked against the statistics
library."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pandas as pd
import pytest

from cxrgaze.evaluation.calibration import brier_score, ece_top_label
from cxrgaze.evaluation.delong import delong_test
from cxrgaze.evaluation.multiplicity import holm
from cxrgaze.evaluation.paired import paired_auc_bootstrap
from cxrgaze.evaluation.scores import load_scores, save_scores, split_from_logits
from cxrgaze.metrics import auc_summary
from cxrgaze.report import PAIRED_COLUMNS, build_report, comparison_pairs, load_eval, to_markdown, write_report

CLASSES = ["Normal", "CHF", "pneumonia"]
N_TEST, N_VAL = 90, 30
R = 300


def write_variant(root, variant, signal, n_seeds=1, scoring="sigmoid", seed=0, cases=N_TEST, logits=None):
    """``root/variant`` with metrics.json and scores.npz; test cases in a variant-specific order."""
    rng = np.random.default_rng(seed)
    labels = np.random.default_rng(100).integers(0, 3, cases)  # the same cases for every variant
    ids = np.array([f"case{i:03d}" for i in range(cases)])
    if logits is None:
        logits = signal * (2 * np.eye(3)[labels] - 1) + rng.normal(size=(n_seeds, cases, 3))
    order = rng.permutation(cases)
    test = split_from_logits(labels[order], ids[order], logits[:, order], scoring)
    val_labels = rng.integers(0, 3, N_VAL)
    val_logits = rng.normal(size=(n_seeds, N_VAL, 3))
    val = split_from_logits(val_labels, [f"val{i}" for i in range(N_VAL)], val_logits, scoring)
    folder = root / variant
    folder.mkdir(parents=True)
    save_scores(folder / "scores.npz", {"val": val, "test": test}, list(range(n_seeds)), scoring, CLASSES)
    metrics = {"variant": variant, "test_n": float(cases), "val_n": float(N_VAL),
               **auc_summary(test.labels, test.scores, "test_"), "test_auc_macro_ci95_low": 0.5,
               "test_auc_macro_ci95_high": 0.9, "test_sal_mask_cc": None, "test_sal_gradcam_cc": 0.25}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return logits


@pytest.fixture
def eval_root(tmp_path):
    root = tmp_path / "eval"
    write_variant(root, "baseline", 0.3, seed=1)
    write_variant(root, "unet", 0.6, n_seeds=3, seed=2)
    write_variant(root, "set1-gbp", 1.5, n_seeds=2, seed=3)
    return root


@pytest.fixture
def report(eval_root):
    return build_report(eval_root, ["baseline", "unet", "set1-gbp"], n_resamples=R, seed=0)


def test_comparison_pairs():
    assert comparison_pairs(["baseline", "unet", "a", "b"]) == [
        ("unet", "a"), ("unet", "b"), ("baseline", "unet"), ("baseline", "a"), ("baseline", "b")]
    assert comparison_pairs(["a", "unet"]) == [("unet", "a")]
    assert comparison_pairs(["a", "b"]) == []


def test_rows_reproduce_the_statistics_library(eval_root, report):
    assert len(report.comparisons) == 3 * 4  # 3 pairs x (macro + 3 classes)
    assert {(r["reference"], r["variant"]) for r in report.comparisons} == {
        ("unet", "set1-gbp"), ("baseline", "unet"), ("baseline", "set1-gbp")}
    var, ref = load_eval(eval_root, "set1-gbp")[1]["test"], load_eval(eval_root, "unet")[1]["test"]
    order = [list(ref.dicom_ids).index(i) for i in var.dicom_ids]  # the report aligns cases by DICOM id
    boot = paired_auc_bootstrap(var.labels, var.scores, ref.scores[order], n_resamples=R, seed=0)
    delong = delong_test(var.labels, var.scores, ref.scores[order])
    rows = {r["target"]: r for r in report.comparisons if (r["reference"], r["variant"]) == ("unet", "set1-gbp")}
    assert list(rows) == ["macro", *CLASSES]
    for target, row in rows.items():
        assert (row["diff"], row["ci_low"], row["ci_high"], row["p_bootstrap"]) == (
            boot[target].difference, boot[target].low, boot[target].high, boot[target].p_value)
        assert row["p_delong"] == delong[target].p_value
    np.testing.assert_array_equal([r["p_holm"] for r in report.comparisons],
                                  holm(np.array([r["p_bootstrap"] for r in report.comparisons])))
    assert report.paired["set1-gbp"]["unet"]["difference"] == rows["macro"]["diff"]
    assert set(report.paired["set1-gbp"]["unet"]) >= {"difference", "low", "high", "p_value"}  # log_report reads these


def test_calibration_sensitivity_and_seed_spread(eval_root, report):
    test = load_eval(eval_root, "unet")[1]["test"]
    assert report.calibration["unet"]["brier"] == brier_score(test.labels, test.scores)
    assert report.calibration["unet"]["ece_top_label"] == ece_top_label(test.labels, test.scores)
    assert set(report.sensitivity["unet"]) == set(CLASSES)
    assert all(iv.n_resamples == R for iv in report.sensitivity["unet"].values())
    per_seed = [auc_summary(test.labels, s)["auc_macro"] for s in test.scores_per_seed]
    spread = report.seed_spread["unet"]
    assert spread["n_seeds"] == 3 and spread["seed_mean"] == pytest.approx(np.mean(per_seed), abs=1e-14)
    assert spread["seed_sd"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-14)
    assert spread["ensemble"] == pytest.approx(auc_summary(test.labels, test.scores)["auc_macro"], abs=1e-14)
    assert report.seed_spread["baseline"]["n_seeds"] == 1 and np.isnan(report.seed_spread["baseline"]["seed_sd"])


def test_written_files(report, tmp_path):
    paths = write_report(report, tmp_path / "reports")
    text = paths["markdown"].read_text()
    assert "Scores: sigmoid per class" in text and "## Summary (test set)" in text
    assert text.index("## Summary") < text.index("## Classification") < text.index("## Paired comparisons")
    for section in ("## Calibration", "## Sensitivity at 90 % specificity", "## Seed spread", "## Heatmaps"):
        assert section in text
    assert "| set1-gbp |" in text and "vs unet" in text and "1 seed" in text and "(3 seeds)" in text
    assert f"family of {len(report.comparisons)} bootstrap p-values" in text
    assert "≤ 0.007" in text  # the floor 2/301 of a perfect separation, never "0.000"
    assert not re.search(r"\| 0\.0+ \|", text)
    with paths["paired"].open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == PAIRED_COLUMNS and len(rows) == len(report.comparisons)
    assert {r["target"] for r in rows} == {"macro", *CLASSES}
    metrics = json.loads(paths["json"].read_text())
    assert set(metrics) == {"baseline", "unet", "set1-gbp"}
    entry = metrics["set1-gbp"]
    for key in ("test_auc_macro", "diff_vs_unet", "diff_vs_unet_low", "diff_vs_unet_high", "p_vs_unet",
                "p_holm_vs_unet", "p_delong_vs_baseline", "brier", "ece_top_label", "sens_at_spec90_CHF_low", "n_seeds",
                "test_auc_macro_seed_sd", "sal_gradcam_cc"):
        assert key in entry, key
    assert entry["diff_vs_unet_low"] <= entry["diff_vs_unet"] <= entry["diff_vs_unet_high"]
    assert metrics["baseline"]["test_auc_macro_seed_sd"] is None and metrics["baseline"]["sal_mask_cc"] is None


def test_identical_variants_differ_by_nothing(tmp_path):
    logits = write_variant(tmp_path, "unet", 1.0, seed=4)
    write_variant(tmp_path, "set2-gbp", 1.0, seed=5, logits=logits)  # same scores, other case order
    report = build_report(tmp_path, ["unet", "set2-gbp"], n_resamples=100)
    for row in report.comparisons:
        assert (row["diff"], row["ci_low"], row["ci_high"], row["p_bootstrap"], row["p_delong"]) == (0, 0, 0, 1, 1)
        assert row["p_holm"] == 1 and not row["p_holm_is_bound"]


def test_softmax_scoring_is_stated(tmp_path):
    write_variant(tmp_path, "unet", 1.0, scoring="softmax")
    write_variant(tmp_path, "set3-grad", 1.0, scoring="sigmoid", seed=6)
    assert load_scores(tmp_path / "unet").scoring == "softmax"
    text = to_markdown(build_report(tmp_path, ["unet", "set3-grad"], n_resamples=100))
    assert "softmax over the classes (the class scores sum to 1) for unet" in text
    assert "sigmoid per class (the class scores do not sum to 1) for set3-grad" in text


def test_mismatched_or_missing_evaluations(tmp_path):
    write_variant(tmp_path, "unet", 1.0)
    write_variant(tmp_path, "set1-gbp", 1.0, cases=N_TEST - 1)
    with pytest.raises(ValueError, match="different test cases"):
        build_report(tmp_path, ["unet", "set1-gbp"], n_resamples=100)
    (tmp_path / "set1-gbp" / "scores.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"scores\.npz: missing \(run `dvc repro evaluate@set1-gbp`\)"):
        build_report(tmp_path, ["unet", "set1-gbp"], n_resamples=100)


def _add_metrics(root, variant, **values):
    path = root / variant / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def test_tuning_budgets_sanity_and_champion_pick_are_reported(eval_root):
    """The report says which variants were tuned (and that budgets differ when not all
    were), shows the sanity checks with their verdict, and names what the champion rule
    would pick with its validation-test gap."""
    _add_metrics(eval_root, "baseline", val_auc_macro=0.80)
    _add_metrics(eval_root, "unet", val_auc_macro=0.99, sanity_generator_passed=1.0,
                 sanity_generator_cascade_spearman=0.2, sanity_generator_input_pairwise_cc=0.5)
    _add_metrics(eval_root, "set1-gbp", val_auc_macro=0.95, sanity_generator_passed=0.0,
                 sanity_generator_cascade_spearman=0.9, sanity_generator_input_pairwise_cc=0.99)
    tuning = {"set1-gbp": {"best_value": 0.93, "best_gamma": 0.25, "best_trial": 2, "trials_complete": 3,
                           "trials_pruned": 1, "trials_retried": 0}}
    text = to_markdown(build_report(eval_root, ["baseline", "unet", "set1-gbp"], n_resamples=R, tuning=tuning))
    tuning_rows = {line.split("|")[1].strip(): line for line in text.split("## Tuning")[1].split("##")[0].splitlines()
                   if line.startswith("| ")}
    assert "**The budgets differ**: set1-gbp had an Optuna study" in text and "unet kept the params.yaml values" in text
    assert "gamma 0.25" in tuning_rows["set1-gbp"] and "| 4 |" in tuning_rows["set1-gbp"]
    assert "not tuned" in tuning_rows["unet"] and "no loss weights" in tuning_rows["baseline"]
    sanity = text.split("## Sanity checks")[1].split("##")[0]
    assert re.search(r"\| set1-gbp \|.*\*\*failed\*\*", sanity) and re.search(r"\| unet \|.*passed", sanity)
    assert "baseline" not in sanity  # logged no sanity result: no row
    unet_test = build_report(eval_root, ["unet"], n_resamples=R).metrics["unet"]["test_auc_macro"]
    champion = text.split("## What the champion rule picks")[1].split("##")[0]
    assert f"**unet** (0.990); its test macro AUC is {unet_test:.3f}" in champion
    assert ("a shortcut user" in champion) == (0.99 - unet_test > 0.1)


def test_tuning_every_weighted_variant_is_budget_matched(eval_root):
    tuning = {v: {"best_value": 0.9, "best_gamma": 0.5, "trials_complete": 8} for v in ("unet", "set1-gbp")}
    text = to_markdown(build_report(eval_root, ["baseline", "unet", "set1-gbp"], n_resamples=R, tuning=tuning))
    assert "the comparison is budget-matched" in text and "budgets differ" not in text


def test_tuning_with_unequal_trial_counts_is_not_budget_matched(eval_root):
    tuning = {"unet": {"best_gamma": 0.5, "trials_complete": 8}, "set1-gbp": {"best_gamma": 0.5, "trials_complete": 3}}
    text = to_markdown(build_report(eval_root, ["baseline", "unet", "set1-gbp"], n_resamples=R, tuning=tuning))
    assert "**The budgets differ**" in text and "different trial counts" in text


def test_write_histories_gathers_every_seed_for_dvc_plots(tmp_path):
    from cxrgaze.report import write_histories

    for seed in (0, 1):
        folder = tmp_path / "train" / "unet" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "history.csv").write_text(f"epoch,val_auc_macro\n0,0.{5 + seed}\n1,0.{7 + seed}\n")
    (tmp_path / "history").mkdir()
    (tmp_path / "history" / "gone.csv").write_text("epoch\n0\n")  # a variant no longer listed
    write_histories(tmp_path / "train", ["unet"], tmp_path / "history")
    table = pd.read_csv(tmp_path / "history" / "unet.csv")
    assert table["seed"].tolist() == [0, 0, 1, 1] and table["val_auc_macro"].tolist() == [0.5, 0.7, 0.6, 0.8]
    assert table["epoch"].tolist() == [1, 2, 1, 2], "1-based, as on the console and in MLflow"
    assert sorted(p.name for p in (tmp_path / "history").iterdir()) == ["unet.csv"]
    with pytest.raises(FileNotFoundError, match="train@set1-gbp"):
        write_histories(tmp_path / "train", ["set1-gbp"], tmp_path / "history")


def test_the_report_run_carries_the_headline_and_says_where_the_tables_are(mlflow_store, tmp_path):
    """The ``report`` run has every variant's headline numbers as metrics and in its
    description (what the MLflow UI shows first), and ``results.md`` as an artifact."""
    from mlflow.tracking import MlflowClient

    from cxrgaze.experiment.report import log_report
    from cxrgaze.report import Report

    metrics = {"unet": {"test_auc_macro": 0.786, "test_auc_macro_ci95_low": 0.734, "test_auc_macro_ci95_high": 0.838,
                        "val_auc_macro": 0.984, "test_sal_generator_cc": 0.12},
               "set3-gbp": {"test_auc_macro": 0.774, "test_auc_macro_ci95_low": 0.719,
                            "test_auc_macro_ci95_high": 0.830, "val_auc_macro": 0.986}}
    results = tmp_path / "results.md"
    results.write_text("# Results\n")
    run_id = log_report(Report(variants=list(metrics), metrics=metrics), tmp_path / "eval", {"results": results})
    run = MlflowClient().get_run(run_id)
    assert run.info.run_name == "report" and run.data.tags["cxrgaze.kind"] == "report"
    assert run.data.metrics["unet.test_auc_macro"] == pytest.approx(0.786)
    assert run.data.metrics["set3-gbp.test_auc_macro_ci95_high"] == pytest.approx(0.830)
    description = run.data.tags["mlflow.note.content"]
    assert "| unet | 0.786 [0.734, 0.838] | 0.984 | 0.120 |" in description
    assert "| set3-gbp | 0.774 [0.719, 0.830] | 0.986 | n/a |" in description and "`results.md`" in description
    assert "results.md" in {a.path for a in MlflowClient().list_artifacts(run_id)}


def test_paired_differences_reach_the_evaluation_run_and_its_training_run_without_reopening_them(mlflow_store):
    """The report adds each variant's paired differences to its evaluation run (metrics, and a
    paragraph of its and its training run's descriptions, replaced on a later report),
    through the client: both runs keep their status and end time."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from cxrgaze.experiment.report import PAIRED_HEADING, log_paired
    from cxrgaze.tracking import set_experiment

    set_experiment()
    with mlflow.start_run(run_name="set3-gbp") as parent:
        mlflow.set_tag("mlflow.note.content", "training")
    with mlflow.start_run(run_name="set3-gbp evaluation", parent_run_id=parent.info.run_id) as child:
        mlflow.set_tag("mlflow.note.content", "**set3-gbp**: headline")
    client = MlflowClient()
    ended = {r: client.get_run(r).info.end_time for r in (parent.info.run_id, child.info.run_id)}
    for difference in (0.5, 0.0123):  # a second report replaces the first one's paragraph
        log_paired(child.info.run_id, {"unet": {"difference": difference, "low": -0.02, "high": 0.045,
                                                "p_value": 0.41}})
    run = client.get_run(child.info.run_id)
    assert run.data.metrics["test_auc_macro_diff_vs_unet"] == pytest.approx(0.0123)
    assert run.data.metrics["test_auc_macro_diff_vs_unet_ci95_low"] == pytest.approx(-0.02)
    assert run.data.metrics["test_auc_macro_diff_vs_unet_p_value"] == pytest.approx(0.41)
    expected = f"\n\n{PAIRED_HEADING}\n- vs `unet`: +0.012 [-0.020, +0.045], p = 0.410"
    assert run.data.tags["mlflow.note.content"] == "**set3-gbp**: headline" + expected
    assert client.get_run(parent.info.run_id).data.tags["mlflow.note.content"] == "training" + expected
    for run_id, end_time in ended.items():
        info = client.get_run(run_id).info
        assert (info.status, info.end_time) == ("FINISHED", end_time)
