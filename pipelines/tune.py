"""DVC stage `tune`: tune the loss weights (tune.space) of every variant in tune.variants with Optuna.

Usage (from dvc.yaml): python pipelines/tune.py PREPARED_DIR SPLIT_CSV BEST_YAML METRICS_JSON
Reads params.yaml: tune, model, loss, train, variants.

The studies live in tune.storage (default sqlite:///optuna.db in the repository root), not
in the stage's outputs, so they survive `dvc repro`: a rerun adds trials up to
tune.n_trials and rewrites BEST_YAML from all trials so far. BEST_YAML has one key per
entry of params.yaml `variants` (the tuned overrides, `{}` for the others); each
`train@<variant>` stage reads its own key as a DVC param.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PARAMS, run_stage  # noqa: E402


def main() -> None:
    from cxrgaze.config import load_params
    from cxrgaze.config import tune_config
    from cxrgaze.tune.overrides import write_best
    from cxrgaze.tune.study import tune_variants, write_metrics

    prepared, split_csv, best_yaml, metrics_json = sys.argv[1:5]
    params = load_params(PARAMS)
    cfg = tune_config(params, where=str(PARAMS))
    results = tune_variants(params, cfg, cfg.variants, prepared, split_csv)
    Path(best_yaml).unlink(missing_ok=True)  # written afresh: no entry of an earlier params.yaml survives
    write_best(best_yaml, params.get("variants") or {}, results)
    write_metrics(metrics_json, results)


if __name__ == "__main__":
    run_stage("tune", main)
