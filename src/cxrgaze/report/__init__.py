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

from cxrgaze.report.build import build_report, calibration_summary, seed_spread
from cxrgaze.report.comparisons import compare, comparison_pairs, holm_family
from cxrgaze.report.load import load_eval, read_tuning
from cxrgaze.report.markdown import SCORING_TEXT, to_markdown
from cxrgaze.report.results import MACRO, PAIRED_COLUMNS, REFERENCES, Report
from cxrgaze.report.tables import SALIENCY_METRICS, SANITY_METRICS
from cxrgaze.report.write import write_histories, write_report

__all__ = ["MACRO", "PAIRED_COLUMNS", "REFERENCES", "SALIENCY_METRICS", "SANITY_METRICS", "SCORING_TEXT", "Report",
           "build_report", "calibration_summary", "compare", "comparison_pairs", "holm_family", "load_eval",
           "read_tuning", "seed_spread", "to_markdown", "write_histories", "write_report"]
