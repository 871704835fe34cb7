"""The paper's tables for the data at hand: ``build_report(eval_root, variants) -> Report``.

Reads, per variant, ``<eval_root>/<variant>/metrics.json`` (AUCs with CIs, heatmap scores)
and ``scores.npz`` (full-precision test scores, :mod:`cxrgaze.evaluation.scores`), and writes:

* A headline table: test macro AUC [CI], the macro difference against ``unet`` and against
  ``baseline`` with its Holm-adjusted p-value, Brier score, top-label ECE, seed spread.
* Classification (the paper's Tables 3-4): test macro and per-class AUC with the
  percentile-bootstrap CI, the paper-protocol percentiles, validation macro AUC.
* Paired comparisons: the test AUC difference (macro and per class) of every variant
  against ``unet`` and against ``baseline`` on the same cases: paired-bootstrap difference,
  CI and p-value, Holm-adjusted over the whole family, DeLong's p-value beside it.
* Calibration (Brier, top-label and per-class ECE) and sensitivity at 90 % specificity per
  class with a bootstrap CI, from the test scores.
* Seed spread: mean and SD over training seeds of the test macro AUC, beside the AUC of
  the seed-averaged scores.
* Heatmaps (Table 5): CC, KL, SIM, NSS, AUC-Judd of the decoder mask, the generator map and
  Grad-CAM against gaze, and the share of heatmap mass on the finding boxes and on the
  synthetic shortcut marker.

Written as ``results.md`` (for people), ``results.json`` (every number of the tables, per
variant), ``paired.csv`` (one row per comparison) and, for ``dvc metrics show`` / ``dvc exp
show``, a short headline file (:meth:`Report.headline`: a few numbers per variant).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrgaze import CLASSES
from cxrgaze.evaluation.bootstrap import Interval, format_p, macro, paired_auc_bootstrap
from cxrgaze.evaluation.calibration import DEFAULT_BINS, brier_score, ece_per_class, ece_top_label
from cxrgaze.evaluation.delong import delong_test
from cxrgaze.evaluation.multiplicity import holm
from cxrgaze.evaluation.operating_point import DEFAULT_SPECIFICITY, sensitivity_ci
from cxrgaze.evaluation.scores import FILENAME as SCORES_FILE
from cxrgaze.evaluation.scores import Scores, SplitScores, load_scores
from cxrgaze.metrics import auc_per_class

REFERENCES = ("unet", "baseline")
"""Every variant is compared with these (when they were evaluated)."""

SALIENCY_METRICS = ("cc", "kl", "sim", "sim_benchmark", "nss", "auc_judd", "finding_mass", "marker_mass")
SANITY_METRICS = ("head_spearman", "cascade_spearman", "input_pairwise_cc", "image_pairwise_cc")
MACRO = "macro"
PAIRED_COLUMNS = ("reference", "variant", "target", "diff", "ci_low", "ci_high", "p_bootstrap", "p_bootstrap_at_floor",
                  "p_holm", "p_holm_is_bound", "p_delong", "se_delong", "n_valid")
"""The columns of ``paired.csv``, one row per (reference, variant, target)."""

SCORING_TEXT = {"sigmoid": "sigmoid per class (the class scores do not sum to 1)",
                "softmax": "softmax over the classes (the class scores sum to 1)"}


@dataclass
class Report:
    variants: list[str]
    metrics: dict[str, dict[str, Any]]
    """Variant -> evaluation metrics (``outputs/eval/<v>/metrics.json``)."""
    paired: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """Variant -> reference -> the macro row: ``difference``, ``low``, ``high``, ``p_value``
    (bootstrap), ``p_holm``, ``p_delong``, ``n_valid`` (read by ``experiment.log_report``)."""
    n_resamples: int = 2000
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    """One row per (reference, variant, target) with the :data:`PAIRED_COLUMNS`."""
    calibration: dict[str, dict[str, float]] = field(default_factory=dict)
    """Variant -> ``brier``, ``ece_top_label``, ``ece_<class>`` (test split)."""
    sensitivity: dict[str, dict[str, Interval]] = field(default_factory=dict)
    """Variant -> class -> sensitivity at ``specificity`` with its bootstrap interval (test)."""
    seed_spread: dict[str, dict[str, float]] = field(default_factory=dict)
    """Variant -> ``n_seeds``, ``seed_mean``, ``seed_sd`` (test macro AUC over seeds, SD with
    n - 1; NaN for one seed) and ``ensemble`` (macro AUC of the seed-averaged scores)."""
    scoring: dict[str, str] = field(default_factory=dict)
    """Variant -> ``"sigmoid"`` or ``"softmax"``."""
    classes: tuple[str, ...] = CLASSES
    specificity: float = DEFAULT_SPECIFICITY
    confidence: float = 0.95
    tuning: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Variant -> its Optuna study's result (best values, trials by state), for the tuned
    variants (``metrics/tune.json``); see :func:`read_tuning`."""

    def headline(self) -> dict[str, dict[str, Any]]:
        """Per variant the numbers an experiment is compared by (``dvc exp show``): test macro
        AUC with its CI, validation macro AUC, the difference to ``baseline`` with its Holm
        p-value, and the trained generator map's CC with the gaze; undefined ones left out."""
        out = {}
        for v in self.variants:
            m, vs_baseline = self.metrics[v], self.paired.get(v, {}).get("baseline", {})
            entry = {k: m.get(k) for k in ("test_auc_macro", "test_auc_macro_ci95_low", "test_auc_macro_ci95_high",
                                           "val_auc_macro")}
            entry.update(diff_vs_baseline=vs_baseline.get("difference"), p_holm_vs_baseline=vs_baseline.get("p_holm"),
                         test_generator_gaze_cc=m.get("test_sal_generator_cc"))
            out[v] = {k: x for k, x in ((k, _clean(x)) for k, x in entry.items()) if x is not None}
        return out

    def to_json(self) -> dict[str, Any]:
        """Flat per-variant numbers of every table."""
        return {v: {k: _clean(x) for k, x in self._json_entry(v).items()} for v in self.variants}

    def _json_entry(self, v: str) -> dict[str, Any]:
        m = self.metrics[v]
        entry = {k: m.get(k) for k in ("test_auc_macro", "test_auc_macro_ci95_low", "test_auc_macro_ci95_high",
                                       "val_auc_macro", "test_accuracy")}
        entry.update({f"test_auc_{c}": m.get(f"test_auc_{c}") for c in self.classes})
        for ref, p in self.paired.get(v, {}).items():
            entry.update({f"diff_vs_{ref}": p["difference"], f"diff_vs_{ref}_low": p["low"],
                          f"diff_vs_{ref}_high": p["high"], f"p_vs_{ref}": p["p_value"],
                          f"p_holm_vs_{ref}": p["p_holm"], f"p_delong_vs_{ref}": p["p_delong"]})
        entry.update(self.calibration.get(v, {}))
        for c, iv in self.sensitivity.get(v, {}).items():
            key = f"sens_at_spec{round(100 * self.specificity)}_{c}"
            entry.update({key: iv.estimate, f"{key}_low": iv.low, f"{key}_high": iv.high})
        spread = self.seed_spread.get(v, {})
        entry.update({f"test_auc_macro_{k}": x for k, x in spread.items() if k != "n_seeds"})
        entry["n_seeds"] = spread.get("n_seeds")
        for name in ("mask", "generator", "gradcam"):
            for metric in ("cc", "nss", "marker_mass"):
                entry[f"sal_{name}_{metric}"] = m.get(f"test_sal_{name}_{metric}")
        return entry


def _clean(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return int(value) if isinstance(value, np.integer) else value


# --- loading -------------------------------------------------------------------------
def load_eval(eval_root: str | Path, variant: str) -> tuple[dict[str, Any], Scores]:
    """The metrics (``metrics.json``, None as NaN) and the scores (``scores.npz``) that
    ``evaluate`` wrote for ``variant``."""
    folder = Path(eval_root) / variant
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        scores = load_scores(folder / SCORES_FILE)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc.filename}: missing (run `dvc repro evaluate@{variant}`)") from None
    return {k: (math.nan if v is None else v) for k, v in metrics.items()}, scores


def _aligned_scores(case: SplitScores, ref: SplitScores, where: str) -> np.ndarray:
    """``ref``'s scores (N, K) in the case order of ``case``; an error unless both hold the
    same cases with the same labels."""
    if len(case.dicom_ids) != len(ref.dicom_ids) or set(case.dicom_ids) != set(ref.dicom_ids):
        raise ValueError(f"{where}: evaluated on different test cases; re-run their evaluate stages on the same split")
    order = pd.Index(ref.dicom_ids).get_indexer(case.dicom_ids)
    if (ref.labels[order] != case.labels).any():
        raise ValueError(f"{where}: the same test cases carry different labels")
    return ref.scores[order]


# --- comparisons ---------------------------------------------------------------------
def comparison_pairs(variants: list[str]) -> list[tuple[str, str]]:
    """``(reference, variant)`` pairs: every variant against every evaluated reference of
    :data:`REFERENCES`, itself excluded. Two references are compared once: the one listed
    first against the other (``unet`` against ``baseline``, not the mirror)."""
    refs = [r for r in REFERENCES if r in variants]
    return [(ref, v) for ref in refs for v in variants
            if v != ref and not (v in refs and REFERENCES.index(v) > REFERENCES.index(ref))]


def compare(tests: dict[str, SplitScores], reference: str, variant: str, classes: tuple[str, ...],
            n_resamples: int, seed: int, confidence: float) -> list[dict[str, Any]]:
    """Rows (macro, then per class) of ``variant`` minus ``reference`` on the test cases:
    paired bootstrap (:func:`paired_auc_bootstrap`) and DeLong (:func:`delong_test`)."""
    case = tests[variant]
    ref_scores = _aligned_scores(case, tests[reference], f"{variant} and {reference}")
    boot = paired_auc_bootstrap(case.labels, case.scores, ref_scores, n_resamples, confidence, seed, classes)
    dl = delong_test(case.labels, case.scores, ref_scores, classes)
    return [{"reference": reference, "variant": variant, "target": target, "diff": b.difference, "ci_low": b.low,
             "ci_high": b.high, "p_bootstrap": b.p_value, "p_bootstrap_at_floor": b.p_at_floor,
             "p_delong": dl[target].p_value, "se_delong": dl[target].se, "n_valid": b.n_valid}
            for target, b in boot.items()]


def holm_family(rows: list[dict[str, Any]]) -> None:
    """Add ``p_holm`` (Holm over ALL rows' bootstrap p-values) and ``p_holm_is_bound`` to each
    row. A floored bootstrap p is only known to lie below its floor, so an adjusted value
    that changes when the floored p-values are set to 0 is an upper bound (printed ``< x``)."""
    p = np.array([r["p_bootstrap"] for r in rows], dtype=np.float64)
    floored = np.array([r["p_bootstrap_at_floor"] for r in rows], dtype=bool)
    upper, lower = holm(p), holm(np.where(floored, 0.0, p))
    for row, value, bound in zip(rows, upper, upper > lower):
        row.update(p_holm=float(value), p_holm_is_bound=bool(bound))


# --- per-variant summaries -----------------------------------------------------------
def calibration_summary(test: SplitScores, classes: tuple[str, ...]) -> dict[str, float]:
    """``brier`` (mean one-vs-rest Brier), ``ece_top_label`` and ``ece_<class>`` of a split
    (:mod:`cxrgaze.evaluation.calibration`, 15 bins)."""
    out = {"brier": brier_score(test.labels, test.scores), "ece_top_label": ece_top_label(test.labels, test.scores)}
    out.update({f"ece_{c}": float(e) for c, e in zip(classes, ece_per_class(test.labels, test.scores))})
    return out


def seed_spread(test: SplitScores) -> dict[str, float]:
    """Test macro AUC per seed (``scores_per_seed``): ``n_seeds``, ``seed_mean``, ``seed_sd``
    (n - 1 divisor, NaN for one seed), and ``ensemble``: the macro AUC of the seed-averaged
    ``scores``."""
    per_seed = macro(np.stack([auc_per_class(test.labels, s) for s in test.scores_per_seed]))  # (S,)
    n = len(per_seed)
    return {"n_seeds": n, "seed_mean": float(per_seed.mean()),
            "seed_sd": float(per_seed.std(ddof=1)) if n > 1 else math.nan,
            "ensemble": float(macro(auc_per_class(test.labels, test.scores)[None])[0])}


def read_tuning(tune_json: str | Path | None) -> dict[str, dict[str, Any]]:
    """The ``tune`` stage's metrics (variant -> ``best_value``, ``best_<param>``,
    ``trials_<state>``), or ``{}`` when there is no such file."""
    if tune_json is None or not Path(tune_json).exists():
        return {}
    return json.loads(Path(tune_json).read_text())


def build_report(eval_root: str | Path, variants: list[str], n_resamples: int = 2000, seed: int = 0,
                 confidence: float = 0.95, specificity: float = DEFAULT_SPECIFICITY,
                 tuning: dict[str, dict[str, Any]] | None = None) -> Report:
    """Collect every variant's evaluation, run the paired comparisons (with the Holm
    adjustment over all of them), calibration, sensitivity at ``specificity`` and seed
    spread on the test split; ``tuning`` (:func:`read_tuning`) says which variants were
    tuned, with what budget."""
    loaded = {v: load_eval(eval_root, v) for v in variants}
    classes = _common_classes(eval_root, {v: s for v, (_, s) in loaded.items()})
    tests = {v: s["test"] for v, (_, s) in loaded.items()}
    report = Report(variants=list(variants), metrics={v: m for v, (m, _) in loaded.items()}, n_resamples=n_resamples,
                    scoring={v: s.scoring for v, (_, s) in loaded.items()}, classes=classes, specificity=specificity,
                    confidence=confidence, tuning=dict(tuning or {}))
    for ref, v in comparison_pairs(report.variants):
        report.comparisons += compare(tests, ref, v, classes, n_resamples, seed, confidence)
    holm_family(report.comparisons)
    for row in (r for r in report.comparisons if r["target"] == MACRO):
        report.paired.setdefault(row["variant"], {})[row["reference"]] = {
            "difference": row["diff"], "low": row["ci_low"], "high": row["ci_high"], "p_value": row["p_bootstrap"],
            "p_holm": row["p_holm"], "p_delong": row["p_delong"], "n_valid": row["n_valid"]}
    for v, test in tests.items():
        report.calibration[v] = calibration_summary(test, classes)
        report.sensitivity[v] = sensitivity_ci(test.labels, test.scores, specificity, n_resamples, confidence, seed,
                                               classes)
        report.seed_spread[v] = seed_spread(test)
    return report


def _common_classes(eval_root: str | Path, scores: dict[str, Scores]) -> tuple[str, ...]:
    names = {s.classes for s in scores.values()}
    if len(names) > 1:
        raise ValueError(f"{eval_root}: the variants' scores.npz list different classes: {sorted(names)}")
    return names.pop() if names else CLASSES


# --- Markdown ------------------------------------------------------------------------
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(x)


def _num(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "n/a"


def _ci(m: dict[str, Any], key: str) -> str:
    value, low, high = m.get(key, math.nan), m.get(f"{key}_ci95_low", math.nan), m.get(f"{key}_ci95_high", math.nan)
    if not _finite(value):
        return "n/a"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if _finite(low) and _finite(high) else f"{value:.3f}"


def _interval(value: float, low: float, high: float, sign: str = "") -> str:
    if not _finite(value):
        return "n/a"
    text = f"{value:{sign}.3f}"
    return f"{text} [{low:{sign}.3f}, {high:{sign}.3f}]" if _finite(low) and _finite(high) else text


def _level(report: Report) -> str:
    return f"{100 * report.confidence:g}% CI"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            + ["| " + " | ".join(row) + " |" for row in rows])


def _p_texts(row: dict[str, Any]) -> list[str]:
    """Bootstrap, Holm and DeLong p-values of a comparison row as text (:func:`format_p`)."""
    return [format_p(row["p_bootstrap"], row["n_valid"]),
            format_p(row["p_holm"], row["n_valid"], upper_bound=row["p_holm_is_bound"]), format_p(row["p_delong"])]


def _seed_text(spread: dict[str, float]) -> str:
    if not spread:
        return "n/a"
    if spread["n_seeds"] == 1:
        return "1 seed"
    return f"{spread['seed_mean']:.3f} ± {spread['seed_sd']:.3f} ({spread['n_seeds']} seeds)"


def _header(report: Report, title: str) -> list[str]:
    first = report.metrics[report.variants[0]] if report.variants else {}
    n_test, n_val = first.get("test_n", math.nan), first.get("val_n", math.nan)
    rules = sorted(set(report.scoring.values()))
    scoring = ("n/a" if not rules else SCORING_TEXT[rules[0]] if len(rules) == 1 else
               "; ".join(f"{SCORING_TEXT[r]} for {', '.join(v for v in report.variants if report.scoring[v] == r)}"
                         for r in rules))
    return [f"# {title}", "",
            f"Test cases: {_num(n_test, 0)}; validation cases: {_num(n_val, 0)}. Scores: {scoring}. AUCs are "
            f"one-vs-rest; [low, high] is the {report.confidence:.0%} percentile bootstrap over {report.n_resamples} "
            "full-size resamples. Paired differences, calibration and sensitivities are computed from the "
            "full-precision test scores (`scores.npz`; the seed average when a variant has several seeds).", ""]


def _headline(report: Report) -> list[str]:
    refs = [r for r in REFERENCES if r in report.variants]
    macro_rows = {(r["reference"], r["variant"]): r for r in report.comparisons if r["target"] == MACRO}
    rows = []
    for v in report.variants:
        cells = [v, _ci(report.metrics[v], "test_auc_macro")]
        for ref in refs:
            r = macro_rows.get((ref, v))
            cells.append(f"{_interval(r['diff'], r['ci_low'], r['ci_high'], '+')} (p {_p_texts(r)[1]})" if r else "—")
        cal = report.calibration.get(v, {})
        cells += [_num(cal.get("brier")), _num(cal.get("ece_top_label")), _seed_text(report.seed_spread.get(v, {}))]
        rows.append(cells)
    header = ["variant", "macro AUC [95% CI]", *(f"Δ macro AUC vs {r} [{_level(report)}] (p Holm)" for r in refs),
              "Brier",
              "ECE (top label)", "seeds: macro AUC mean ± SD"]
    return ["## Summary (test set)", "", *_table(header, rows), ""]


def _classification(report: Report) -> list[str]:
    rows = []
    for v in report.variants:
        m = report.metrics[v]
        paper = (f"{_num(m.get('test_auc_macro_paper_p50'))} [{_num(m.get('test_auc_macro_paper_p2.5'))}, "
                 f"{_num(m.get('test_auc_macro_paper_p97.5'))}]")
        rows.append([v, _ci(m, "test_auc_macro"), paper, *(_ci(m, f"test_auc_{c}") for c in report.classes),
                     _num(m.get("val_auc_macro")), _num(m.get("test_accuracy"))])
    header = ["variant", "macro AUC [95% CI]", "paper protocol", *(f"{c} AUC [95% CI]" for c in report.classes),
              "val macro AUC", "accuracy"]
    return ["## Classification (test set)", "",
            "\"Paper protocol\" is the median [2.5th, 97.5th percentile] of 30 resamples of 55-60 cases, as the paper "
            "reports it.", "", *_table(header, rows), ""]


def _paired(report: Report) -> list[str]:
    n_pairs = len({(r["reference"], r["variant"]) for r in report.comparisons})
    lines = ["## Paired comparisons (test AUC differences, same cases)", "",
             f"Variant minus reference, for the macro AUC and each class. Paired bootstrap ({report.n_resamples} "
             "resamples, the same cases for both models): the difference on all cases, its percentile CI and the "
             "two-sided p-value 2 (t + 1) / (R + 1), t the resamples on the far side of 0 (Davison and Hinkley's "
             "add-one rule; `≤ 2/(R+1)` when no resample reached 0, the smallest value R resamples can show). "
             "**p Holm**: Holm's "
             f"step-down adjustment over the whole family of {len(report.comparisons)} bootstrap p-values: every "
             f"variant against unet and against baseline ({n_pairs} pairs; unet against baseline once) x (macro + "
             f"{len(report.classes)} classes); `≤ x` marks an adjusted value bounded through a floored p. "
             "**p DeLong**: DeLong's test of the same difference (the macro variance from the per-case structural "
             "components across classes and both models), unadjusted, for comparison.", ""]
    for ref in REFERENCES:
        rows = [[r["variant"], r["target"], _interval(r["diff"], r["ci_low"], r["ci_high"], "+"), *_p_texts(r)]
                for r in report.comparisons if r["reference"] == ref]
        if rows:
            lines += [f"### against {ref}", "",
                      *_table(["variant", "target", f"Δ AUC [{_level(report)}]", "p bootstrap", "p Holm", "p DeLong"],
                              rows), ""]
    return lines


def _calibration(report: Report) -> list[str]:
    rows = [[v, _num(cal.get("brier")), _num(cal.get("ece_top_label")),
             *(_num(cal.get(f"ece_{c}")) for c in report.classes)] for v, cal in report.calibration.items()]
    header = ["variant", "Brier", "ECE top label", *(f"ECE {c}" for c in report.classes)]
    return ["## Calibration (test set)", "",
            "Brier: the mean over classes of the one-vs-rest Brier score (lower is better). ECE: expected calibration "
            f"error over {DEFAULT_BINS} equal-width bins; top label: confidence = the maximum class score (sigmoid or "
            "softmax alike), correct = the arg-max is the true class; per class: the class score against "
            "membership.", "", *_table(header, rows), ""]


def _sensitivity(report: Report) -> list[str]:
    pct = f"{100 * report.specificity:.0f} %"
    rows = [[v, *(_interval(iv.estimate, iv.low, iv.high) for iv in sens.values())]
            for v, sens in report.sensitivity.items()]
    return [f"## Sensitivity at {pct} specificity (test set)", "",
            f"One vs rest: the threshold is the smallest observed score giving a specificity of at least {pct} on the "
            "class's negatives, the sensitivity the share of its positives scoring at or above it; "
            f"[{_level(report)}]: percentile bootstrap ({report.n_resamples} resamples, threshold re-derived on each).",
            "",
            *_table(["variant", *report.classes], rows), ""]


def _seeds(report: Report) -> list[str]:
    rows = [[v, str(s["n_seeds"]), _seed_text(s), _num(s["ensemble"])] for v, s in report.seed_spread.items()]
    return ["## Seed spread (test macro AUC)", "",
            "Per variant: the test macro AUC of each training seed's scores, mean ± SD (n - 1) over seeds, beside the "
            "macro AUC of the seed-averaged scores (what the other tables use).", "",
            *_table(["variant", "seeds", "per seed: mean ± SD", "seed-averaged scores"], rows), ""]


def _map_role(variant: str, name: str) -> str:
    """Whether a loss term trains this map of this variant, or it is only looked at."""
    from cxrgaze.variants import parse_variant

    spec = parse_variant(variant)
    if name == "gradcam":
        return "post hoc"
    trained = spec.trains_mask if name == "mask" else spec.trains_generator
    return "trained" if trained else "not trained (diagnostic)"


def _heatmaps(report: Report) -> list[str]:
    rows = [[v, name, _map_role(v, name), _num(m.get(f"test_sal_{name}_cc_n"), 0),
             *(_num(m.get(f"test_sal_{name}_{k}")) for k in SALIENCY_METRICS)]
            for v, m in ((v, report.metrics[v]) for v in report.variants) for name in ("mask", "generator", "gradcam")
            if _finite(m.get(f"test_sal_{name}_cc", math.nan)) or _finite(m.get(f"test_sal_{name}_nss", math.nan))]
    return ["## Heatmaps against gaze (test set, mean over images)", "",
            "CC, SIM, NSS, AUC-Judd: higher agrees more with the radiologist; KL: lower is better. SIM divides each "
            "map by its sum (the paper's); SIM benchmark min-max rescales each map first (the saliency benchmark's). "
            "finding mass: share of the map inside the finding boxes; marker mass: share on the burned-in "
            "shortcut marker (synthetic data only; lower is better). n: images with a defined CC (a constant map has "
            "none; `metrics.json` has `_n` and `_nan` for every mean). \"generator\" is the variant's own rule (guided "
            "backprop for baseline and unet, whose loss does not train it); the mask of set 1 (an untrained decoder) "
            "and of baseline and rrr (none) is left out.", "",
            *_table(["variant", "map", "role", "n", *SALIENCY_METRICS], rows), ""]


def _sanity(report: Report) -> list[str]:
    rows = []
    for v in report.variants:
        m = report.metrics[v]
        if not _finite(m.get("sanity_generator_passed", math.nan)):
            continue
        share, n_seeds = m["sanity_generator_passed"], int(m.get("n_seeds") or 1)
        verdict = "passed" if share >= 1.0 else "**failed**"
        if n_seeds > 1:
            verdict += f" ({round(share * n_seeds)}/{n_seeds} seeds passed)"
        rows.append([v, *(_num(m.get(f"sanity_generator_{k}")) for k in SANITY_METRICS),
                     _num(m.get("sanity_generator_n_images"), 0), verdict])
    if not rows:
        return []
    return ["## Sanity checks of the generator maps (Adebayo et al. 2018; test images)", "",
            "Cascading randomisation: the mean Spearman rank correlation of each image's |map| with the |map| of the "
            "same model whose layers were re-initialised from the top (head, then encoder stages down to the "
            "stem); a map that explains the model drops toward 0 (passes below 0.5 after the full cascade). Input "
            "dependence: the mean pairwise Pearson correlation of the maps of different images of one class, beside "
            "that of the images themselves; a map that hardly changes with the image stays near 1 (passes below "
            "0.9). Guided backprop keeps its map when the head is randomised (\"after head\" near 1), as "
            "Adebayo et al. found. DeconvNet passes a gradient through an activation by the gradient's sign alone, never "
            "the activation's input, and an EfficientNet has no max-pool switches to carry the image instead: its "
            "maps can be nearly the same for every image. Mean over seeds.", "",
            *_table(["variant", "after head", "after full cascade", "same-class map CC", "same-class image CC",
                     "images", "result"], rows), ""]


def _tuning(report: Report) -> list[str]:
    from cxrgaze.variants import parse_variant

    weighted = [v for v in report.variants if parse_variant(v).loss_weights]
    tuned = [v for v in weighted if v in report.tuning]
    budgets = {v: _trial_count(report.tuning[v]) for v in tuned}
    rows = []
    for v in report.variants:
        t = report.tuning.get(v)
        if t is None:
            rows.append([v, "not tuned (params.yaml values)" if v in weighted else "no loss weights", "—", "—"])
            continue
        values = ", ".join(f"{k[5:]} {x:.3g}" for k, x in sorted(t.items()) if k.startswith("best_") and
                           k not in ("best_value", "best_trial") and _finite(x))
        rows.append([v, values or "—", str(_trial_count(t)), _num(t.get("best_value"))])
    fair = set(tuned) == set(weighted) and len(set(budgets.values())) <= 1
    note = ("Every variant with loss weights had the same Optuna budget over its own weights: the comparison is "
            "budget-matched." if fair else
            f"**The budgets differ**: {', '.join(tuned) or 'no variant'} had an Optuna study over its loss weights, "
            f"{', '.join(v for v in weighted if v not in tuned) or 'none'} kept the params.yaml values"
            f"{'' if len(set(budgets.values())) <= 1 else ', and the tuned ones had different trial counts'}. A tuned "
            "variant that wins may win on budget, not method; the `study` profile (README) tunes every variant "
            "alike.")
    return ["## Tuning (validation only; the test split is read once, after every choice)", "", note, "",
            *_table(["variant", "tuned values", "trials", "best val selection score (short runs)"], rows), ""]


def _trial_count(tuning: dict[str, Any]) -> int:
    """Trials of a study in any state (a retried trial counts once)."""
    return sum(int(x) for k, x in tuning.items() if k.startswith("trials_") and k != "trials_retried" and _finite(x))


def _shortcut(report: Report) -> list[str]:
    """What the champion rule (best validation macro AUC) would pick, and how it does on test."""
    scored = [(report.metrics[v].get("val_auc_macro"), v) for v in report.variants
              if _finite(report.metrics[v].get("val_auc_macro", math.nan))]
    if not scored:
        return []
    val, pick = max(scored)
    test = report.metrics[pick].get("test_auc_macro", math.nan)
    ranks = sorted((report.metrics[v].get("test_auc_macro", -1.0) for v in report.variants), reverse=True)
    gap = val - test if _finite(test) else math.nan
    verdict = (f"{val - test:.3f} below its validation AUC: **a shortcut user** — validation rewards the marker, "
               "the test set's marker is random" if _finite(gap) and gap > 0.1 else
               "close to its validation AUC: no sign that it relies on the shortcut")
    return ["## What the champion rule picks", "",
            "Promotion uses validation macro AUC (test data stays unseen; the registry compares single models, "
            "per seed, and may apply the explanation gate). By variant, the best on validation is "
            f"**{pick}** "
            f"({val:.3f}); its test macro AUC is {_num(test)} (rank {ranks.index(test) + 1 if test in ranks else '?'} "
            f"of {len(ranks)}), {verdict}.", ""]


def _notes(report: Report) -> list[str]:
    first = report.metrics[report.variants[0]] if report.variants else {}
    n_test = first.get("test_n", math.nan)
    lines = ["## Reading these numbers", "",
             "- Checkpoints were chosen on validation: macro AUC (less `train.selection_gaze_weight` times the "
             "generator's mass outside the gaze, where that weight is set). On the synthetic data validation carries the same "
             "shortcut as training (a corner marker that agrees with the label), so validation AUC cannot tell "
             "the variants apart; the test set's marker is random. Compare variants on the test AUC and the "
             "paired differences.",
             f"- Read the Holm-adjusted p-values: with {len(report.comparisons)} comparisons, unadjusted p-values "
             "cross 0.05 by chance about once in twenty when nothing differs. A CI that contains 0 means no detectable "
             "difference.",
             "- The paired tests resample test cases with the trained models held fixed: they say whether these "
             "models differ on this population, not whether another training run would. With several seeds the "
             "models are the seed ensembles, and the seed spread section shows how much single runs vary; a "
             "difference smaller than that spread is not a property of the method."]
    if _finite(n_test) and n_test < 55:
        lines.append(f"- This test set has {n_test:.0f} cases, fewer than the paper protocol's 55-60 per resample: its "
                     "resamples repeat cases, and its intervals are narrower than the data supports. Read the "
                     "percentile-bootstrap CI.")
    return lines + [""]


def to_markdown(report: Report, title: str = "cxrgaze results") -> str:
    """The report as Markdown: a headline table, then one section per topic, with the
    reading notes a reviewer needs."""
    sections = (_headline, _shortcut, _classification, _paired, _calibration, _sensitivity, _seeds, _tuning,
                _heatmaps, _sanity, _notes)
    return "\n".join(_header(report, title) + [line for section in sections for line in section(report)])


def write_histories(train_root: str | Path, variants: list[str], out_dir: str | Path) -> list[Path]:
    """``out_dir/<variant>.csv``: the per-epoch curves of every seed of each variant (the
    seeds' ``history.csv`` under ``train_root/<variant>/seed<S>/``, with a ``seed`` column),
    for ``dvc plots``; a file of a variant no longer listed is removed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.csv"):
        if stale.stem not in variants:
            stale.unlink()
    paths = []
    for variant in variants:
        found = [p for p in Path(train_root, variant).glob("seed*/history.csv") if p.parent.name[4:].isdigit()]
        if not found:
            raise FileNotFoundError(f"{Path(train_root, variant)}: no seed<S>/history.csv (run `dvc repro train@{variant}`)")
        frames = [pd.read_csv(p).assign(seed=int(p.parent.name[4:]))
                  for p in sorted(found, key=lambda p: int(p.parent.name[4:]))]
        paths.append(out_dir / f"{variant}.csv")
        pd.concat(frames).to_csv(paths[-1], index=False, lineterminator="\n")
    return paths


def write_report(report: Report, out_dir: str | Path, headline_json: str | Path | None = None) -> dict[str, Path]:
    """``results.md``, ``results.json`` and ``paired.csv`` (:data:`PAIRED_COLUMNS`) in ``out_dir``;
    the :meth:`Report.headline` into ``headline_json`` (default ``out_dir/headline.json``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "results.md", "json": out_dir / "results.json", "paired": out_dir / "paired.csv",
             "headline": Path(headline_json) if headline_json else out_dir / "headline.json"}
    paths["headline"].parent.mkdir(parents=True, exist_ok=True)
    paths["headline"].write_text(json.dumps(report.headline(), indent=2) + "\n")
    paths["markdown"].write_text(to_markdown(report))
    paths["json"].write_text(json.dumps(report.to_json(), indent=2) + "\n")
    pd.DataFrame(report.comparisons, columns=list(PAIRED_COLUMNS)).to_csv(
        paths["paired"], index=False, float_format="%.6g", lineterminator="\n")
    return paths
