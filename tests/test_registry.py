"""The promotion rules of the `champion` alias, on a real MLflow registry (SQLite).

Candidates are real runs with a real (trivial) logged pyfunc model: the rules under test
only read the run's status, tags and validation AUC.
"""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from cxrgaze.config import RegisterConfig
from cxrgaze.registry import Candidate, register_and_promote


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def candidate(variant: str, score: float, evaluated: bool = True, fail: bool = False,
              evidence: dict[str, float] | None = None) -> Candidate:
    mlflow.set_experiment("cxrgaze")
    run = mlflow.start_run(run_name=variant)
    mlflow.log_metric("val_auc_macro", score)
    mlflow.log_metrics(evidence or {})
    info = mlflow.pyfunc.log_model(name="model", python_model=_Echo(), pip_requirements=[])
    if evaluated:
        mlflow.set_tag("cxrgaze.evaluated", "true")
    mlflow.end_run(status="FAILED" if fail else "FINISHED")
    return Candidate(variant, run.info.run_id, info.model_uri)


def never(_version) -> float:
    raise AssertionError("the champion must not be re-evaluated on the same data")


def champion() -> str:
    return str(MlflowClient().get_model_version_by_alias("cxrgaze", "champion").version)


def decision_tag(version: str) -> str:
    return MlflowClient().get_model_version("cxrgaze", version).tags["cxrgaze.decision"]


def test_first_run_registers_every_candidate_and_crowns_the_best(mlflow_store):
    cands = [candidate("baseline", 0.80), candidate("unet", 0.90), candidate("set3-gbp", 0.85)]
    decision = register_and_promote(cands, "data-a", "val-1", never)
    assert decision.promoted and "first champion" in decision.reason
    assert set(decision.versions) == {"baseline", "unet", "set3-gbp"}
    assert champion() == decision.versions["unet"]
    version = MlflowClient().get_model_version("cxrgaze", decision.versions["unet"])
    assert version.tags["cxrgaze.variant"] == "unet"
    assert version.tags["cxrgaze.data_version"] == "data-a"
    assert version.tags["cxrgaze.run_id"] == cands[1].run_id
    assert "first champion" in version.tags["cxrgaze.decision"]


def test_better_by_more_than_min_delta_moves_the_champion(mlflow_store):
    first = register_and_promote([candidate("unet", 0.90)], "data-a", "val-1", never)
    decision = register_and_promote([candidate("set3-gbp", 0.95)], "data-a", "val-1", never,
                                    RegisterConfig(min_delta=0.01))
    assert decision.promoted
    assert champion() == decision.versions["set3-gbp"] != first.versions["unet"]
    assert "beats champion" in decision_tag(decision.versions["set3-gbp"])


@pytest.mark.parametrize("score,min_delta", [(0.85, 0.0), (0.90, 0.0), (0.905, 0.01)],
                         ids=["worse", "equal", "within-min-delta"])
def test_worse_equal_or_not_enough_better_keeps_the_champion(mlflow_store, score, min_delta):
    first = register_and_promote([candidate("unet", 0.90)], "data-a", "val-1", never)
    decision = register_and_promote([candidate("set3-gbp", score)], "data-a", "val-1", never,
                                    RegisterConfig(min_delta=min_delta))
    assert not decision.promoted
    assert champion() == first.versions["unet"]
    assert "does not beat" in decision_tag(decision.versions["set3-gbp"])


def test_new_data_version_reevaluates_the_champion_first(mlflow_store):
    first = register_and_promote([candidate("unet", 0.90)], "data-a", "val-1", never)
    calls = []

    def reevaluate(version) -> float:
        calls.append(str(version.version))
        return 0.80  # the old champion does worse on the new data

    decision = register_and_promote([candidate("set3-gbp", 0.85)], "data-b", "val-2", reevaluate)
    assert calls == [first.versions["unet"]]
    assert decision.promoted, "0.85 beats the champion's 0.80 on the new data (its 0.90 was on other data)"
    old = MlflowClient().get_model_version("cxrgaze", first.versions["unet"])
    assert "0.8000 on data data-b" in old.tags["cxrgaze.reevaluated"]


def test_new_data_version_where_the_champion_still_wins(mlflow_store):
    first = register_and_promote([candidate("unet", 0.90)], "data-a", "val-1", never)
    decision = register_and_promote([candidate("set3-gbp", 0.85)], "data-b", "val-2", lambda v: 0.88)
    assert not decision.promoted and champion() == first.versions["unet"]


def test_promotion_by_the_gaze_aware_selection_score(mlflow_store):
    """``register.metric: val_selection`` ranks by that metric, not by AUC; after a data
    change the champion cannot be re-scored by it, and that is refused in one line."""
    cfg = RegisterConfig(metric="val_selection")
    shortcut = candidate("unet", 0.99, evidence={"val_selection": 0.10})  # high AUC, map off the gaze
    on_gaze = candidate("set1-gbp", 0.95, evidence={"val_selection": 0.40})
    decision = register_and_promote([shortcut, on_gaze], "data-a", "val-1", never, cfg)
    assert champion() == decision.versions["set1-gbp"]
    assert "val_selection 0.4000" in decision.reason
    with pytest.raises(ValueError, match="register.metric val_selection: champion version .* val_auc_macro only"):
        register_and_promote([candidate("set3-gbp", 0.97, evidence={"val_selection": 0.5})], "data-b", "val-2",
                             lambda v: 0.9, cfg)


def test_failed_or_unevaluated_runs_are_never_registered_or_promoted(mlflow_store):
    first = register_and_promote([candidate("unet", 0.70)], "data-a", "val-1", never)
    failed = candidate("set3-gbp", 0.99, fail=True)
    incomplete = candidate("set3-deconv", 0.98, evaluated=False)
    decision = register_and_promote([failed, incomplete], "data-a", "val-1", never)
    assert not decision.promoted and champion() == first.versions["unet"]
    assert decision.versions == {}
    assert "FAILED" in decision.skipped["set3-gbp"]
    assert "not evaluated" in decision.skipped["set3-deconv"]
    assert len(MlflowClient().search_model_versions("name='cxrgaze'")) == 1


def test_running_again_with_nothing_new_moves_nothing(mlflow_store):
    cands = [candidate("unet", 0.90), candidate("set3-gbp", 0.92)]
    first = register_and_promote(cands, "data-a", "val-1", never)
    again = register_and_promote(cands, "data-a", "val-1", never)
    assert not again.promoted and "already the champion" in again.reason
    assert again.versions == first.versions
    assert len(MlflowClient().search_model_versions("name='cxrgaze'")) == 2


def test_min_delta_is_validated():
    from cxrgaze.config import ConfigError

    with pytest.raises(ConfigError, match="min_delta"):
        RegisterConfig(min_delta=-0.1)


def test_explanation_gate_refuses_candidates_whose_evidence_fails(mlflow_store):
    """The best validation AUC belongs to a model whose generator ignores the gaze: with a
    gate it is registered (inspectable) but refused, and the champion is the best that passes."""
    shortcut = candidate("unet", 0.99, evidence={"val_sal_generator_cc": -0.05, "val_sanity_generator_passed": 1.0})
    insane = candidate("set1-deconv", 0.95, evidence={"val_sal_generator_cc": 0.40, "val_sanity_generator_passed": 0.0})
    good = candidate("set3-gbp", 0.90, evidence={"val_sal_generator_cc": 0.30, "val_sanity_generator_passed": 1.0})
    silent = candidate("baseline", 0.97)  # logged no evidence at all
    gate = RegisterConfig(gate={"min_gaze_cc": 0.1, "require_sanity": True})
    decision = register_and_promote([shortcut, insane, good, silent], "data-a", "val-1", never, gate)
    assert set(decision.versions) == {"unet", "set1-deconv", "set3-gbp", "baseline"}
    assert champion() == decision.versions["set3-gbp"]
    assert set(decision.refused) == {"unet", "set1-deconv", "baseline"}
    assert "CC on validation -0.050 < 0.1" in decision.refused["unet"]
    assert decision.refused["set1-deconv"] == "the generator failed the sanity checks"
    assert "missing" in decision.refused["baseline"] and "no sanity-check result" in decision.refused["baseline"]
    tags = MlflowClient().get_model_version("cxrgaze", decision.versions["unet"]).tags
    assert tags["cxrgaze.gate"].startswith("refused: generator-gaze CC")
    assert tags["cxrgaze.evidence.val_gaze_cc"] == "-0.0500" and tags["cxrgaze.evidence.sanity"] == "1.0000"
    assert MlflowClient().get_model_version("cxrgaze", decision.versions["set3-gbp"]).tags["cxrgaze.gate"] == "passed"


def test_without_a_gate_evidence_is_recorded_and_nothing_is_refused(mlflow_store):
    decision = register_and_promote([candidate("unet", 0.99, evidence={"val_sal_generator_cc": -0.05})],
                                    "data-a", "val-1", never)
    assert not decision.refused and champion() == decision.versions["unet"]
    assert decision.evidence["unet"] == {"val_gaze_cc": -0.05, "sanity": None}
    tags = MlflowClient().get_model_version("cxrgaze", decision.versions["unet"]).tags
    assert tags["cxrgaze.gate"] == "no gate" and tags["cxrgaze.evidence.sanity"] == "not logged"


@pytest.mark.parametrize("gate, message", [({"min_cc": 0.1}, "unknown key"), ({"min_gaze_cc": 2}, "in \\[-1, 1\\]"),
                                           ({"require_sanity": "yes"}, "true or false")])
def test_bad_gates_are_refused(gate, message):
    from cxrgaze.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        RegisterConfig(gate=gate)


def test_gate_reads_validation_evidence_only(mlflow_store):
    """A generator that failed its sanity checks on *test* images but passed on validation
    is not refused: test data never steers promotion."""
    cand = candidate("set3-gbp", 0.9, evidence={"val_sal_generator_cc": 0.3, "val_sanity_generator_passed": 1.0,
                                                "sanity_generator_passed": 0.0, "test_sal_generator_cc": -0.5})
    decision = register_and_promote([cand], "data-a", "val-1", never,
                                    RegisterConfig(gate={"min_gaze_cc": 0.1, "require_sanity": True}))
    assert not decision.refused and champion() == decision.versions["set3-gbp"]


def test_a_gate_switched_on_removes_a_champion_that_fails_it(mlflow_store):
    """The gate also applies to the current champion: one that fails it gives the alias to
    the best candidate that passes, even one with a lower validation AUC."""
    first = register_and_promote([candidate("unet", 0.99, evidence={"val_sal_generator_cc": -0.05})],
                                 "data-a", "val-1", never)
    gate = RegisterConfig(gate={"min_gaze_cc": 0.1})
    decision = register_and_promote([candidate("set3-gbp", 0.90, evidence={"val_sal_generator_cc": 0.3})],
                                    "data-a", "val-1", never, gate)
    assert decision.promoted and champion() == decision.versions["set3-gbp"] != first.versions["unet"]
    assert f"champion v{first.versions['unet']} fails the explanation gate" in decision.reason
    # Nothing passes: the alias is removed rather than left on a refused model.
    register_and_promote([], "data-a", "val-1", never, RegisterConfig(gate={"min_gaze_cc": 0.5}))
    with pytest.raises(Exception):
        champion()


def test_a_gate_of_nulls_is_no_gate(mlflow_store):
    decision = register_and_promote([candidate("unet", 0.99)], "data-a", "val-1", never,
                                    RegisterConfig(gate={"min_gaze_cc": None, "require_sanity": False}))
    assert not decision.refused
    tags = MlflowClient().get_model_version("cxrgaze", decision.versions["unet"]).tags
    assert tags["cxrgaze.gate"] == "no gate"


def test_the_registry_pages_say_the_rule_the_decision_and_the_test_numbers(mlflow_store):
    """The registered model's description states the promotion rule; each version's says
    what was decided, its validation and test macro AUC with the CI, and, where the data
    has a known shortcut marker, warns that validation rewards it."""
    shortcut = {"test_auc_macro": 0.628, "test_auc_macro_ci95_low": 0.57, "test_auc_macro_ci95_high": 0.69,
                "test_sal_generator_marker_mass": 0.31}
    clean = {"test_auc_macro": 0.81, "test_auc_macro_ci95_low": 0.75, "test_auc_macro_ci95_high": 0.86}
    cands = [candidate("unet", 0.99, evidence=shortcut), candidate("baseline", 0.90, evidence=clean)]
    decision = register_and_promote(cands, "data-a", "val-1", never, RegisterConfig(min_delta=0.005))
    client = MlflowClient()
    rule = client.get_registered_model("cxrgaze").description
    assert "`champion`" in rule and "`val_auc_macro`" in rule and "0.005" in rule
    champ = client.get_model_version("cxrgaze", decision.versions["unet"]).description
    assert "first champion" in champ and "0.990" in champ and "0.628 [0.570, 0.690]" in champ
    assert "Known shortcut" in champ and "0.310" in champ
    other = client.get_model_version("cxrgaze", decision.versions["baseline"]).description
    assert "not the best candidate" in other and "0.810 [0.750, 0.860]" in other and "Known shortcut" not in other
