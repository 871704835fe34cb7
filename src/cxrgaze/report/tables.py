"""The tables of ``results.md``, one function per section, each returning its Markdown lines:
the summary, classification AUCs, paired comparisons, calibration, sensitivity at a fixed
specificity, seed spread, heatmaps against gaze and the generators' sanity checks.
"""

from __future__ import annotations

import math

from cxrgaze.evaluation.calibration import DEFAULT_BINS
from cxrgaze.report.cells import _ci, _finite, _interval, _level, _num, _p_texts, _seed_text, _table
from cxrgaze.report.results import MACRO, REFERENCES, Report
from cxrgaze.variants import parse_variant

SALIENCY_METRICS = ("cc", "kl", "sim", "sim_benchmark", "nss", "auc_judd", "finding_mass", "marker_mass")
SANITY_METRICS = ("head_spearman", "cascade_spearman", "input_pairwise_cc", "image_pairwise_cc")


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
