"""``results.md`` as a whole (:func:`to_markdown`): its header, the tables of
:mod:`cxrgaze.report.tables`, and the sections that read them: what the champion rule
picks, how the variants were tuned, and the notes a reviewer needs.
"""

from __future__ import annotations

import math
from typing import Any

from cxrgaze.report.cells import _finite, _num, _table
from cxrgaze.report.results import Report
from cxrgaze.report.tables import (_calibration, _classification, _headline, _heatmaps, _paired, _sanity, _seeds,
                                   _sensitivity)
from cxrgaze.variants import parse_variant

SCORING_TEXT = {"sigmoid": "sigmoid per class (the class scores do not sum to 1)",
                "softmax": "softmax over the classes (the class scores sum to 1)"}


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


def _tuning(report: Report) -> list[str]:
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
