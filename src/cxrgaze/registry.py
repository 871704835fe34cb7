"""The model registry: register evaluated models, move the ``champion`` alias by AUC.

Rules (:func:`register_and_promote`):

* Every evaluated model becomes a version of the registered model (``cxrgaze``) with tags
  for its variant, AUCs, data version, validation set, run id and model URI. A model
  already registered (same logged-model URI) is not registered twice.
* Only a run that ended FINISHED *and* was evaluated (tag ``cxrgaze.evaluated=true``) can
  be registered or promoted: a failed or incomplete run is reported and skipped.
* The best candidate by validation macro AUC (ties: the first in the variant order)
  takes the ``champion`` alias only when it beats the current champion by more than
  ``min_delta``. The champion's score is the one recorded for the same data version and
  validation set; when the data changed, the champion is first re-evaluated on the new
  validation cases (through its own served preprocessing) and that score is used.
* The decision and its reason are written on the candidate versions as tags
  (``cxrgaze.decision``) and in each version's description, with its validation and test
  numbers and, on data with a known shortcut, how to read them (:func:`version_description`);
  the registered model's description states this rule (:func:`promotion_rule`). Running it
  again with nothing new moves nothing.
* Explanation evidence: every version carries, as tags, its generator map's agreement
  with the gaze on *validation* (``cxrgaze.evidence.val_gaze_cc``, the metric
  ``val_sal_generator_cc``) and whether the generator passed the sanity checks on
  validation images (``cxrgaze.evidence.sanity``, from ``val_sanity_generator_passed``):
  test data never steers promotion. The optional gate
  (``register.gate``) refuses a candidate whose evidence fails it: the version is
  registered (so it can be inspected) but never promoted, and tag ``cxrgaze.gate`` says why.
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cxrgaze import CLASSES
from cxrgaze.config import RegisterConfig
from cxrgaze.data.prepared import PreparedDir
from cxrgaze.metrics import auc_summary
from cxrgaze.tracking import EVALUATED_TAG

EVIDENCE_METRICS = {"val_gaze_cc": "val_sal_generator_cc", "sanity": "val_sanity_generator_passed"}
"""Evidence tag name -> the run metric it is read from."""


@dataclass(frozen=True)
class Candidate:
    """An evaluated model: its variant, MLflow run and logged-model URI."""

    variant: str
    run_id: str
    model_uri: str
    seed: int | None = None
    """The training seed, when a variant has several (then the label says which)."""

    @property
    def label(self) -> str:
        return self.variant if self.seed is None else f"{self.variant}/seed{self.seed}"


@dataclass
class Decision:
    """What :func:`register_and_promote` did."""

    champion_version: str | None
    promoted: bool
    reason: str
    versions: dict[str, str] = field(default_factory=dict)
    """Candidate label (the variant, ``variant/seedS`` with several seeds) -> registered version number."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Candidate label -> why it was not registered."""
    refused: dict[str, str] = field(default_factory=dict)
    """Candidate label -> why the explanation gate refused it (registered, never promoted)."""
    evidence: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """Candidate label -> its explanation evidence on validation."""

    def to_json(self) -> dict:
        return {"champion_version": self.champion_version, "promoted": self.promoted, "reason": self.reason,
                "versions": self.versions, "skipped": self.skipped, "refused": self.refused,
                "evidence": self.evidence}


def explanation_evidence(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """A run's explanation evidence on validation (see the module docstring); None where
    the run did not log it."""
    out: dict[str, float | None] = {}
    for name, metric in EVIDENCE_METRICS.items():
        value = metrics.get(metric)
        out[name] = float(value) if value is not None and math.isfinite(value) else None
    return out


def gate_active(gate: Mapping[str, Any]) -> bool:
    """Whether ``gate`` checks anything (``min_gaze_cc`` set or ``require_sanity`` true)."""
    return gate.get("min_gaze_cc") is not None or bool(gate.get("require_sanity"))


def gate_failure(evidence: Mapping[str, float | None], gate: Mapping[str, Any]) -> str | None:
    """Why ``gate`` refuses a candidate with ``evidence``, or None when it passes."""
    reasons = []
    min_cc = gate.get("min_gaze_cc")
    if min_cc is not None:
        cc = evidence.get("val_gaze_cc")
        if cc is None or cc < min_cc:
            reasons.append(f"generator-gaze CC on validation {'missing' if cc is None else f'{cc:.3f}'} < {min_cc}")
    if gate.get("require_sanity") and evidence.get("sanity") != 1.0:
        reasons.append("the generator failed the sanity checks" if evidence.get("sanity") is not None
                       else "no sanity-check result")
    return "; ".join(reasons) or None


def validation_set_id(dicom_ids: list[str]) -> str:
    """A short fingerprint of the validation cases (scores compare only on the same set)."""
    return hashlib.sha1("\n".join(sorted(dicom_ids)).encode()).hexdigest()[:12]


def _score_key(data_version: str, val_set: str) -> str:
    return f"cxrgaze.score.{data_version[:12]}.{val_set}"


def register_and_promote(
    candidates: list[Candidate],
    data_version: str,
    val_set: str,
    reevaluate: Callable[[ModelVersion], float],
    config: RegisterConfig | None = None,
) -> Decision:
    """Register ``candidates`` and decide the champion (see the module docstring).

    ``reevaluate(version)`` returns the validation macro AUC of a registered version on
    the current data; it is called only for a champion scored on other data.
    """
    cfg = config or RegisterConfig()
    client = MlflowClient()
    try:
        client.create_registered_model(cfg.model_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    client.update_registered_model(cfg.model_name, description=promotion_rule(cfg))
    decision = Decision(champion_version=None, promoted=False, reason="")
    scored: list[tuple[float, ModelVersion, str]] = []
    for cand in candidates:
        entry = _register_candidate(client, cfg, cand, data_version, val_set, decision)
        if entry is not None:
            scored.append(entry)
    current = _champion(client, cfg)
    champion_refusal = _champion_refusal(client, cfg, current)
    if not scored:
        decision.reason = ("every registered candidate was refused by the explanation gate" if decision.refused
                           else "no finished, evaluated run to register")
        if champion_refusal:
            client.delete_registered_model_alias(cfg.model_name, cfg.alias)
            decision.reason += f"; champion v{current.version} fails the gate ({champion_refusal}): alias removed"
        decision.champion_version = _current(client, cfg)
        return decision

    best_score, best, best_variant = max(scored, key=lambda t: t[0])  # max keeps the first of equal scores
    decision.promoted, decision.reason = _promotion(
        cfg, (best_score, best, best_variant), current, champion_refusal,
        lambda: _champion_score(client, cfg, current, data_version, val_set, reevaluate))
    if decision.promoted:
        client.set_registered_model_alias(cfg.model_name, cfg.alias, best.version)
    decision.champion_version = _current(client, cfg)
    for _, version, variant in scored:
        note = decision.reason if version.version == best.version else (
            f"not the best candidate of this run ({best_variant} v{best.version}); {decision.reason}")
        client.set_model_version_tag(cfg.model_name, version.version, "cxrgaze.decision", note[:5000])
        client.update_model_version(cfg.model_name, version.version,
                                    description=version_description(variant, note, client.get_run(version.run_id), cfg))
    return decision


def promotion_rule(cfg: RegisterConfig) -> str:
    """The registered model's description: what the versions are and how ``champion`` moves."""
    gate = (", ".join(f"{k} = {v}" for k, v in cfg.gate.items() if v not in (None, False))
            if gate_active(cfg.gate) else "none")
    return (f"cxrgaze chest X-ray classifiers (Normal / CHF / pneumonia), one version per evaluation run.\n\n"
            f"**Promotion rule.** The alias `{cfg.alias}` goes to the candidate with the highest `{cfg.metric}` "
            f"(validation split; test data never steers promotion), only when it beats the current "
            f"`{cfg.alias}` by more than {cfg.min_delta} on the same data and validation cases (when the data "
            f"changed, the `{cfg.alias}` is re-scored on the new validation cases first). Explanation gate: "
            f"{gate}. Each version's description says what was decided and how it did on test.")


def version_description(label: str, decision: str, run: Any, cfg: RegisterConfig) -> str:
    """A version's description: the decision, its validation and test numbers and, on data
    with a known shortcut (a marker box, as in the synthetic data), how to read them."""
    m = run.data.metrics

    def num(key: str) -> str:
        return f"{m[key]:.3f}" if key in m and math.isfinite(m[key]) else "n/a"

    text = (f"**{label}** (run `{run.info.run_id}`). Decision: {decision}.\n\n"
            f"Validation macro AUC {num('val_auc_macro')} (promotion metric `{cfg.metric}` {num(cfg.metric)}); "
            f"test macro AUC {num('test_auc_macro')} [{num('test_auc_macro_ci95_low')}, "
            f"{num('test_auc_macro_ci95_high')}] (95 % percentile bootstrap).")
    marker = [k for k in m if k.startswith("test_sal_") and k.endswith("_marker_mass") and math.isfinite(m[k])]
    if marker:
        text += ("\n\n**Known shortcut.** This data carries a burned-in marker that agrees with the label on the "
                 "training and validation images and is random on test: a validation AUC well above the test AUC "
                 f"means the model uses the marker (its generator map puts {num('test_sal_generator_marker_mass')} "
                 "of its mass on it on test). Judge it by the test AUC.")
    return text[:5000]


def _register_candidate(client: MlflowClient, cfg: RegisterConfig, cand: Candidate, data_version: str,
                        val_set: str, decision: Decision) -> tuple[float, ModelVersion, str] | None:
    """Register ``cand`` (once) and tag its score, evidence and gate verdict; ``(score,
    version, label)`` when it may be promoted, None when skipped or refused (noted in
    ``decision``)."""
    run = client.get_run(cand.run_id)
    score = run.data.metrics.get(cfg.metric)
    if run.info.status != "FINISHED" or run.data.tags.get(EVALUATED_TAG) != "true":
        decision.skipped[cand.label] = (f"run {cand.run_id} is {run.info.status}"
                                        f"{'' if run.data.tags.get(EVALUATED_TAG) == 'true' else ', not evaluated'}")
        return None
    if score is None or not math.isfinite(score):
        decision.skipped[cand.label] = f"run {cand.run_id} has no finite {cfg.metric}"
        return None
    version = _find_version(client, cfg.model_name, cand) or _register(client, cfg, cand, run, data_version, val_set)
    client.set_model_version_tag(cfg.model_name, version.version, _score_key(data_version, val_set), str(score))
    decision.versions[cand.label] = str(version.version)
    evidence = decision.evidence[cand.label] = explanation_evidence(run.data.metrics)
    for name, value in evidence.items():
        client.set_model_version_tag(cfg.model_name, version.version, f"cxrgaze.evidence.{name}",
                                     "not logged" if value is None else f"{value:.4f}")
    refusal = gate_failure(evidence, cfg.gate)
    client.set_model_version_tag(cfg.model_name, version.version, "cxrgaze.gate",
                                 f"refused: {refusal}" if refusal else ("passed" if gate_active(cfg.gate) else "no gate"))
    if refusal:
        decision.refused[cand.label] = refusal
        return None
    return score, version, cand.label


def _promotion(cfg: RegisterConfig, best_entry: tuple[float, ModelVersion, str], current: ModelVersion | None,
               champion_refusal: str | None, champion_score: Callable[[], float]) -> tuple[bool, str]:
    """``(promoted, reason)``: whether the best candidate takes the alias from ``current``
    and why. ``champion_score()`` is asked only when the scores decide."""
    best_score, best, best_variant = best_entry
    if current is None:
        return True, f"first champion: {best_variant} v{best.version}, {cfg.metric} {best_score:.4f}"
    if str(current.version) == str(best.version):
        return False, f"v{best.version} ({best_variant}) is already the champion"
    if champion_refusal:
        return True, (f"champion v{current.version} fails the explanation gate ({champion_refusal}): the best "
                      f"candidate that passes, {best_variant} v{best.version} ({cfg.metric} {best_score:.4f}), "
                      "takes the alias")
    score = champion_score()
    if best_score > score + cfg.min_delta:
        return True, (f"{best_variant} v{best.version} {cfg.metric} {best_score:.4f} beats champion "
                      f"v{current.version} ({score:.4f}) by more than min_delta {cfg.min_delta}")
    return False, (f"best candidate {best_variant} v{best.version} {cfg.metric} {best_score:.4f} does not "
                   f"beat champion v{current.version} ({score:.4f}) by more than min_delta {cfg.min_delta}")


def _champion_refusal(client: MlflowClient, cfg: RegisterConfig, champion: ModelVersion | None) -> str | None:
    """Why the active gate refuses the current champion (its run's evidence), or None."""
    if champion is None or not gate_active(cfg.gate):
        return None
    return gate_failure(explanation_evidence(client.get_run(champion.run_id).data.metrics), cfg.gate)


def _register(client: MlflowClient, cfg: RegisterConfig, cand: Candidate, run, data_version: str,
              val_set: str) -> ModelVersion:
    metrics = run.data.metrics
    tags = {"cxrgaze.variant": cand.variant, "cxrgaze.run_id": cand.run_id, "cxrgaze.model_uri": cand.model_uri,
            "cxrgaze.data_version": data_version, "cxrgaze.val_set": val_set}
    if cand.seed is not None:
        tags["cxrgaze.seed"] = str(cand.seed)
    for key in (cfg.metric, "val_auc_macro", "test_auc_macro", "test_auc_macro_ci95_low", "test_auc_macro_ci95_high"):
        if key in metrics:
            tags[f"cxrgaze.{key}"] = f"{metrics[key]:.6f}"
    return mlflow.register_model(cand.model_uri, cfg.model_name, tags=tags)


def _find_version(client: MlflowClient, name: str, cand: Candidate) -> ModelVersion | None:
    for version in client.search_model_versions(f"name='{name}' and run_id='{cand.run_id}'"):
        if version.tags.get("cxrgaze.model_uri") == cand.model_uri:
            return version
    return None


def _champion(client: MlflowClient, cfg: RegisterConfig) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(cfg.model_name, cfg.alias)
    except MlflowException:
        return None


def _current(client: MlflowClient, cfg: RegisterConfig) -> str | None:
    champion = _champion(client, cfg)
    return str(champion.version) if champion is not None else None


def _champion_score(client: MlflowClient, cfg: RegisterConfig, champion: ModelVersion, data_version: str,
                    val_set: str, reevaluate: Callable[[ModelVersion], float]) -> float:
    """The champion's score on this data version and validation set (re-evaluated once if needed)."""
    key = _score_key(data_version, val_set)
    if key in champion.tags:
        return float(champion.tags[key])
    if cfg.metric != "val_auc_macro":  # the served model's re-evaluation measures AUC, not cfg.metric
        raise ValueError(f"register.metric {cfg.metric}: champion version {champion.version} was scored on other data "
                         "and can be re-evaluated by val_auc_macro only; promote by val_auc_macro after a data "
                         "change, or set the alias by hand")
    score = float(reevaluate(champion))
    client.set_model_version_tag(cfg.model_name, champion.version, key, str(score))
    client.set_model_version_tag(cfg.model_name, champion.version, "cxrgaze.reevaluated",
                                 f"{cfg.metric} {score:.4f} on data {data_version[:12]}, val set {val_set}")
    return score


def val_auc_of_model(model_uri: str, prepared_dir, split_csv, dicom_dir, batch_size: int = 16) -> float:
    """Validation macro AUC of a logged/registered model on the current data, computed the way
    it is served: raw DICOM bytes through the model's own preprocessing."""
    manifest = PreparedDir(prepared_dir).manifest().set_index("dicom_id")
    split = pd.read_csv(split_csv, dtype=str)
    val = split[split["split"] == "val"]
    model = mlflow.pyfunc.load_model(model_uri)
    probs = []
    for start in range(0, len(val), batch_size):
        ids = val["dicom_id"].iloc[start:start + batch_size]
        images = [base64.b64encode((Path(dicom_dir) / manifest.loc[i, "path"]).read_bytes()).decode() for i in ids]
        out = model.predict(pd.DataFrame({"image": images}), params={"heatmap": "none"})
        probs.append(out[[f"prob_{c}" for c in CLASSES]].to_numpy(np.float64))
    y = val["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    return auc_summary(y, np.concatenate(probs))["auc_macro"]
