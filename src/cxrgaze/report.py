"""The paper's tables for the data at hand: ``build_report(eval_root, variants) -> Report``.

* Classification (the paper's Tables 3-4): test macro and per-class AUC with the
  percentile-bootstrap 95 % CI, the paper-protocol percentiles, validation macro AUC.
* Paired comparison: test macro-AUC difference of every variant against ``unet`` and
  against ``baseline`` on the same test cases (paired bootstrap: difference, CI, p-value).
  The paper's CIs overlap; only a paired test says whether a gain is real.
* Heatmaps (Table 5): CC, KL, SIM, NSS, AUC-Judd of the decoder mask, the generator map and
  Grad-CAM against gaze, and the share of heatmap mass on the finding boxes and on the
  synthetic shortcut marker.

Written as ``results.md`` (for people) and ``results.json`` (for ``dvc metrics show``).
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

REFERENCES = ("unet", "baseline")
"""Every variant is compared with these (when they were evaluated)."""

SALIENCY_METRICS = ("cc", "kl", "sim", "nss", "auc_judd", "finding_mass", "marker_mass")


@dataclass
class Report:
    variants: list[str]
    metrics: dict[str, dict[str, Any]]
    """Variant -> evaluation metrics (``outputs/eval/<v>/metrics.json``)."""
    paired: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """Variant -> reference -> ``difference``, ``low``, ``high``, ``p_value``, ``n_valid``."""
    n_resamples: int = 2000

    def to_json(self) -> dict[str, Any]:
        """Flat per-variant numbers for ``dvc metrics show``."""
        out: dict[str, Any] = {}
        for v in self.variants:
            m = self.metrics[v]
            entry = {k: m.get(k) for k in ("test_auc_macro", "test_auc_macro_ci95_low", "test_auc_macro_ci95_high",
                                           "val_auc_macro", "test_accuracy")}
            entry.update({f"test_auc_{c}": m.get(f"test_auc_{c}") for c in CLASSES})
            for ref, p in self.paired.get(v, {}).items():
                entry.update({f"diff_vs_{ref}": p["difference"], f"diff_vs_{ref}_low": p["low"],
                              f"diff_vs_{ref}_high": p["high"], f"p_vs_{ref}": p["p_value"]})
            for name in ("mask", "generator", "gradcam"):
                for metric in ("cc", "nss", "marker_mass"):
                    entry[f"sal_{name}_{metric}"] = m.get(f"test_sal_{name}_{metric}")
            out[v] = {k: _clean(x) for k, x in entry.items()}
        return out


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def load_eval(eval_root: str | Path, variant: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """The metrics and test predictions that ``evaluate`` wrote for ``variant``."""
    folder = Path(eval_root) / variant
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        predictions = pd.read_csv(folder / "predictions.csv", dtype={"dicom_id": str})
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc.filename}: missing (run `dvc repro evaluate@{variant}`)") from None
    metrics = {k: (math.nan if v is None else v) for k, v in metrics.items()}
    return metrics, predictions[predictions["split"] == "test"].set_index("dicom_id")


def build_report(eval_root: str | Path, variants: list[str], n_resamples: int = 2000, seed: int = 0) -> Report:
    """Collect every variant's evaluation and run the paired comparisons."""
    from cxrgaze.evaluation.bootstrap import paired_bootstrap

    metrics, tests = {}, {}
    for v in variants:
        metrics[v], tests[v] = load_eval(eval_root, v)
    report = Report(variants=list(variants), metrics=metrics, n_resamples=n_resamples)
    prob_cols = [f"prob_{c}" for c in CLASSES]
    for v in variants:
        for ref in REFERENCES:
            if ref not in tests or ref == v:
                continue
            a, b = tests[v], tests[ref]
            if set(a.index) != set(b.index):
                raise ValueError(f"{eval_root}: {v} and {ref} were evaluated on different test cases; "
                                 "re-run their evaluate stages on the same split")
            b = b.loc[a.index]
            y = a["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
            result = paired_bootstrap(y, a[prob_cols].to_numpy(np.float64), b[prob_cols].to_numpy(np.float64),
                                      n_resamples=n_resamples, seed=seed)
            report.paired.setdefault(v, {})[ref] = {"difference": result.difference, "low": result.low,
                                                    "high": result.high, "p_value": result.p_value,
                                                    "n_valid": result.n_valid}
    return report


def _ci(m: dict[str, Any], key: str) -> str:
    value, low, high = m.get(key, math.nan), m.get(f"{key}_ci95_low", math.nan), m.get(f"{key}_ci95_high", math.nan)
    if not _finite(value):
        return "n/a"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if _finite(low) and _finite(high) else f"{value:.3f}"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _num(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "n/a"


def to_markdown(report: Report, title: str = "cxrgaze results") -> str:
    """The report as Markdown tables, with the reading notes a reviewer needs."""
    lines = [f"# {title}", ""]
    first = report.metrics[report.variants[0]] if report.variants else {}
    n_test, n_val = first.get("test_n", math.nan), first.get("val_n", math.nan)
    lines += [
        f"Test cases: {_num(n_test, 0)}; validation cases: {_num(n_val, 0)}. AUCs are one-vs-rest; "
        "[low, high] is the 95 % percentile bootstrap over full-size resamples. \"Paper protocol\" is "
        "the median [2.5th, 97.5th percentile] of 30 resamples of 55-60 cases, as the paper reports it.",
        "",
        "## Classification (test set)", "",
        "| variant | macro AUC [95% CI] | paper protocol | " + " | ".join(f"{c} AUC [95% CI]" for c in CLASSES)
        + " | val macro AUC | accuracy |",
        "|---" * (5 + len(CLASSES)) + "|",
    ]
    for v in report.variants:
        m = report.metrics[v]
        paper = (f"{_num(m.get('test_auc_macro_paper_p50'))} [{_num(m.get('test_auc_macro_paper_p2.5'))}, "
                 f"{_num(m.get('test_auc_macro_paper_p97.5'))}]")
        lines.append(f"| {v} | {_ci(m, 'test_auc_macro')} | {paper} | "
                     + " | ".join(_ci(m, f"test_auc_{c}") for c in CLASSES)
                     + f" | {_num(m.get('val_auc_macro'))} | {_num(m.get('test_accuracy'))} |")
    lines += ["", "## Paired comparison (test macro AUC difference, same cases)", "",
              f"Paired bootstrap, {report.n_resamples} resamples: the difference on all cases, its 95 % CI and the "
              "two-sided p-value of no difference. A CI that contains 0 means no detectable difference.", "",
              "| variant | " + " | ".join(f"vs {r}: diff [95% CI] | p" for r in REFERENCES) + " |",
              "|---" * (1 + 2 * len(REFERENCES)) + "|"]
    for v in report.variants:
        cells = []
        for ref in REFERENCES:
            p = report.paired.get(v, {}).get(ref)
            cells += ([f"{p['difference']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}]", _num(p["p_value"])]
                      if p else ["—", "—"])
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "## Heatmaps against gaze (test set, mean over images)", "",
              "CC, SIM, NSS, AUC-Judd: higher agrees more with the radiologist; KL: lower is better. "
              "finding mass: share of the map inside the finding boxes; marker mass: share on the burned-in "
              "shortcut marker (synthetic data only; lower is better).", "",
              "| variant | map | " + " | ".join(SALIENCY_METRICS) + " |",
              "|---" * (2 + len(SALIENCY_METRICS)) + "|"]
    for v in report.variants:
        m = report.metrics[v]
        for name in ("mask", "generator", "gradcam"):
            if not _finite(m.get(f"test_sal_{name}_cc", math.nan)) and not _finite(m.get(f"test_sal_{name}_nss", math.nan)):
                continue
            lines.append(f"| {v} | {name} | " + " | ".join(_num(m.get(f"test_sal_{name}_{k}")) for k in SALIENCY_METRICS)
                         + " |")
    lines += ["", "## Reading these numbers", "",
              "- Checkpoints were chosen on validation macro AUC. On the synthetic data validation carries the same "
              "shortcut as training (a corner marker that agrees with the label), so validation AUC cannot tell "
              "the variants apart; the test set's marker is random. Compare variants on the test AUC and the "
              "paired differences.",
              "- \"generator\" is the variant's own heatmap rule (guided backprop for baseline and unet).",
              f"- The p-values are per comparison: with {2 * max(len(report.variants) - 1, 0)} comparisons, about one in "
              "twenty crosses 0.05 by chance when nothing differs."]
    if _finite(n_test) and n_test < 55:
        lines.append(f"- This test set has {n_test:.0f} cases, fewer than the paper protocol's 55-60 per resample: its "
                     "resamples repeat cases, and its intervals are narrower than the data supports. Read the "
                     "percentile-bootstrap CI.")
    lines.append("")
    return "\n".join(lines)


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """``results.md``, ``results.json`` and ``paired.csv`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "results.md", "json": out_dir / "results.json", "paired": out_dir / "paired.csv"}
    paths["markdown"].write_text(to_markdown(report))
    paths["json"].write_text(json.dumps(report.to_json(), indent=2) + "\n")
    rows = [{"variant": v, "reference": ref, **p} for v, refs in report.paired.items() for ref, p in refs.items()]
    pd.DataFrame(rows, columns=["variant", "reference", "difference", "low", "high", "p_value", "n_valid"]).to_csv(
        paths["paired"], index=False, float_format="%.6f", lineterminator="\n")
    return paths
