"""Seed-ensemble test macro AUCs and their paired difference, for evaluation folders
written outside the pipeline (the selection ablation of this study's README).

    python paired_ensembles.py EVAL_ROOT VARIANT REFERENCE

EVAL_ROOT/<variant>/seed<S>/scores.npz for S = 0, 1, 2 (``cxrgaze evaluate --out``).
"""
import sys

import numpy as np

from cxrgaze.evaluation.bootstrap import paired_auc_bootstrap, percentile_bootstrap
from cxrgaze.evaluation.scores import load_scores


def ensemble(root: str, variant: str):
    splits = [load_scores(f"{root}/{variant}/seed{s}/scores.npz").splits["test"] for s in range(3)]
    if any(list(x.dicom_ids) != list(splits[0].dicom_ids) for x in splits):
        raise SystemExit(f"{root}/{variant}: the seeds were scored on different test cases")
    return splits[0].labels, np.mean([x.scores for x in splits], axis=0), list(splits[0].dicom_ids)


root, variant, reference = sys.argv[1:4]
y, a, ids = ensemble(root, variant)
_, b, ids_ref = ensemble(root, reference)
if ids != ids_ref:
    raise SystemExit(f"{variant} and {reference} were scored on different test cases")
for name, scores in ((variant, a), (reference, b)):
    ci = percentile_bootstrap(y, scores, n_resamples=10000, seed=0)["macro"]
    print(f"{name}: test macro AUC {ci.estimate:.3f} [{ci.low:.3f}, {ci.high:.3f}]")
d = paired_auc_bootstrap(y, a, b, n_resamples=10000, seed=0)["macro"]
print(f"{variant} - {reference}: {d.difference:+.3f} [{d.low:+.3f}, {d.high:+.3f}], paired-bootstrap p {d.to_dict()['p_value']:.4g}")
