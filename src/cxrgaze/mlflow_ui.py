"""What the MLflow UI shows of the cxrgaze experiment: its kind, its description and its
results view, and the link that opens that view.

The results view is an MLflow *shared view* (what the UI's "Share" button saves): the
experiment tag ``mlflow.sharedViewState.<key>`` holds the runs table's state as JSON, and a
link with ``?viewStateShareKey=<key>`` opens it. It lists the evaluation runs (one per
evaluated model; see :mod:`cxrgaze.experiment.evaluation`), best test macro AUC first, with
the headline metrics as columns, so that nobody has to configure columns to read them.

MLflow 3.17's UI picks its GenAI or model-training view from a toggle it remembers per
browser; links here carry ``workflowType=machine_learning`` so that they open the runs
table. The state's keys are those of the UI's search facets and UI state (MLflow's
``experiment-page`` sources); keys left out take the UI's defaults.
"""

from __future__ import annotations

import hashlib
import json
from typing import Mapping

NOTE_MARKER_TAG = "cxrgaze.note_sha256"
"""Experiment tag: the SHA-256 of the description cxrgaze last wrote, so that a newer
cxrgaze replaces its own description but never one a user edited."""

RESULTS_VIEW = "cxrgaze-results"
"""Share key of the results view (experiment tag ``mlflow.sharedViewState.cxrgaze-results``)."""

HEADLINE_METRICS = ("test_auc_macro", "test_auc_macro_ci95_low", "test_auc_macro_ci95_high", "val_auc_macro",
                    "test_auc_macro_diff_vs_unet", "test_sal_generator_cc", "test_sal_generator_marker_mass")
"""The columns of the results view, in order: the headline with its CI, the validation AUC
(checkpoint selection), the paired difference against ``unet`` and the heatmap-vs-gaze numbers."""


def results_view() -> dict[str, object]:
    """The runs table's state of the results view."""
    columns = [*(f"metrics.`{m}`" for m in HEADLINE_METRICS), "tags.`cxrgaze.dvc_experiment`", "attributes.`Models`"]
    return {
        "searchFilter": "tags.`cxrgaze.evaluated` = 'true'",
        "orderByKey": "metrics.`test_auc_macro`",
        "orderByAsc": False,
        "selectedColumns": columns,
        "columnOrder": columns,  # (the UI would sort them by name)
        "columnWidths": {c: 190 for c in columns if c.startswith("metrics.")},  # full names readable
    }


def results_link(experiment_id: str | None, base: str = "") -> str:
    """The link to the results view (``base`` + a fragment; the experiments list without an id)."""
    if experiment_id is None:
        return f"{base}#/experiments?workflowType=machine_learning"
    return f"{base}#/experiments/{experiment_id}/runs?viewStateShareKey={RESULTS_VIEW}&workflowType=machine_learning"


def experiment_tags(experiment_id: str) -> dict[str, str]:
    """The tags of the cxrgaze experiment: its kind (model development, not GenAI), the
    description the UI shows on its page, and the results view."""
    description = (
        f"**[Results view]({results_link(experiment_id)})**: one row per evaluated model, best test macro AUC "
        "(`test_auc_macro`) first, with its 95 % CI (`_ci95_low`, `_ci95_high`, percentile bootstrap), the "
        "validation AUC, the paired difference against `unet` and the heatmap-vs-gaze scores.\n\n"
        "Chest X-ray classifiers (Normal / CHF / pneumonia) whose training loss supervises heatmap generators "
        "with a radiologist's eye gaze (cxrgaze).\n\n"
        "- **Training runs** are named after their variant (tag `cxrgaze.kind = train`; one per training seed) "
        "and hold the params and the training curves. Each **evaluation** is a run nested below its training "
        "run (`<variant> evaluation`): test metrics with bootstrap CIs, figures, the servable model.\n"
        "- On the synthetic data, **validation carries the shortcut marker and test does not**: a high "
        "validation AUC with a low test AUC means the model uses the shortcut.\n"
        "- `tune-<variant>` runs hold the Optuna studies, their trials nested; the `report` run holds the "
        "results tables (`results.md`) with the paired differences.\n"
        "- Registered model `cxrgaze`, alias `champion`: promoted by validation macro AUC.")
    return {"mlflow.experimentKind": "custom_model_development", "mlflow.note.content": description,
            f"mlflow.sharedViewState.{RESULTS_VIEW}": json.dumps(results_view())}


def experiment_tag_updates(experiment_id: str, current: Mapping[str, str]) -> dict[str, str]:
    """The tags to write on an experiment whose tags are ``current``: the kind and view when
    they differ from this version's, and the description when there is none or it is one
    cxrgaze wrote (its hash is :data:`NOTE_MARKER_TAG`'s; descriptions written before the
    marker existed are recognised by their first words). A description the user edited stays."""
    wanted = experiment_tags(experiment_id)
    note = current.get("mlflow.note.content")
    ours = note is None or _digest(note) == current.get(NOTE_MARKER_TAG) or (
        NOTE_MARKER_TAG not in current and note.startswith("Chest X-ray classifiers (Normal / CHF / pneumonia)"))
    if not ours:
        wanted.pop("mlflow.note.content")
    elif note != wanted["mlflow.note.content"]:
        wanted[NOTE_MARKER_TAG] = _digest(wanted["mlflow.note.content"])
    return {k: v for k, v in wanted.items() if current.get(k) != v}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
