"""The handlers of the commands that use trained models and their results: ``report``,
``register``, ``predict``, ``serve`` and ``summary``."""

# Heavy modules (torch, mlflow, pandas and what pulls them in) are imported inside each
# handler, on purpose: `cxrgaze --help` and the other commands start without loading them.

from __future__ import annotations

import argparse
from pathlib import Path

from cxrgaze.cli.data_commands import read_params


def cmd_report(args: argparse.Namespace) -> None:
    from cxrgaze.report import build_report, read_tuning, write_report

    params = read_params(args.params)
    variants = args.variants or list(params.get("variants") or {}) or sorted(
        p.name for p in Path(args.eval_root).iterdir() if (p / "metrics.json").exists())
    from cxrgaze.config import eval_config

    config = eval_config(params, args.params)
    report = build_report(args.eval_root, variants, n_resamples=config.n_resamples, seed=config.seed,
                          confidence=config.confidence, specificity=config.specificity,
                          tuning=read_tuning(args.tune_json))
    paths = write_report(report, args.out, args.headline)
    print(paths["markdown"].read_text())


def cmd_register(args: argparse.Namespace) -> None:
    from cxrgaze.experiment.evaluation import register_evaluated

    params = read_params(args.params)
    variants = args.variants or list(params.get("variants") or {})
    register = dict(params.get("register") or {})
    if args.min_delta is not None:
        register["min_delta"] = args.min_delta
    decision = register_evaluated(args.eval_root, variants, args.prepared, args.split, args.dicom_dir, register,
                                  where=f"{args.params}: register" if args.params else "register",
                                  train_root=args.train_root)
    print(f"registered: {decision.versions}; champion: v{decision.champion_version}; {decision.reason}")
    for variant, why in decision.skipped.items():
        print(f"not registered: {variant}: {why}")


def cmd_predict(args: argparse.Namespace) -> None:
    import json

    if args.dicomweb is not None or args.study is not None:
        _predict_pacs(args)
        return
    if args.series is not None or args.instance is not None:
        raise ValueError("--series and --instance need --dicomweb URL --study UID")
    if not args.files:
        raise ValueError("give image files, or --dicomweb URL --study UID")
    from cxrgaze.serving.predict import predict_files

    failed = 0
    for result in predict_files(args.files, args.model, args.out, args.heatmap, args.heatmap_size):
        failed += "error" in result
        print(json.dumps(result), flush=True)
    if failed:
        raise ValueError(f"{failed} of {len(args.files)} files could not be predicted (see their `error`)")


def _predict_pacs(args: argparse.Namespace) -> None:
    """``predict --dicomweb URL --study UID``: a JSON line per image, once everything is stored."""
    import json

    if args.dicomweb is None or args.study is None:
        raise ValueError("--dicomweb URL and --study UID go together")
    if args.files or args.out is not None:
        raise ValueError("--dicomweb reads its images from the PACS and stores the results there: "
                         "no FILE arguments and no --out")
    from cxrgaze.serving.pacs import predict_study

    results = predict_study(args.dicomweb, args.study, args.series, args.instance, args.model, args.heatmap,
                            args.heatmap_size)
    for result in results:
        print(json.dumps(result), flush=True)
    refused = sum("error" in result for result in results)
    if refused:
        raise ValueError(f"{refused} of {len(results)} images were refused by the model (see their `error`); "
                         "the results of the others were stored")


def cmd_serve(args: argparse.Namespace) -> None:
    from cxrgaze.serving.serve import serve

    serve(args.model, args.host, args.port, args.workers)


def cmd_summary(args: argparse.Namespace) -> None:
    from cxrgaze.cli.summary import print_summary

    print_summary(Path(args.root))
