"""The handlers of the commands that fit and measure models: ``train``, ``tune`` and
``evaluate``."""

# Heavy modules (torch, mlflow, optuna and what pulls them in) are imported inside each
# handler, on purpose: `cxrgaze --help` and the other commands start without loading them.

from __future__ import annotations

import argparse
from pathlib import Path

from cxrgaze.config import DataConfig, check_params, from_mapping, load_params
from cxrgaze.variants import VARIANTS


def open_prepared(prepared: str, params: dict, params_path: str | None) -> None:
    """Refuse, before any work, a params file with a bad setting in any section, also one
    the command does not use (:func:`cxrgaze.config.check_params`), an inconsistent prepared
    folder (:meth:`PreparedDir.check`) and a ``data`` section that contradicts the folder
    (:meth:`PreparedDir.check_settings`): ``train``, ``tune`` and ``evaluate`` read the
    arrays, never ``data``, so such a section would otherwise be ignored in silence."""
    from cxrgaze.data.prepared import PreparedDir

    if params_path:
        check_params(params, params_path)
    folder = PreparedDir(prepared)
    folder.check()
    if params_path and "data" in params:
        folder.check_settings(from_mapping(DataConfig, params["data"], where=f"{params_path}: data"), params_path)


def cmd_train(args: argparse.Namespace) -> None:
    from cxrgaze.config import resolve_run_config
    from cxrgaze.experiment.training import train_tracked
    from cxrgaze.train import train

    params = load_params(args.params) if args.params else {}
    for key in ("epochs", "device", "batch_size", "micro_batches", "lr"):
        if getattr(args, key) is not None:
            params.setdefault("train", {})
            params["train"] = {**(params["train"] or {}), key: getattr(args, key)}
    if args.seed is not None:  # one run with this seed, whatever train.seeds lists
        params["train"] = {k: v for k, v in (params.get("train") or {}).items() if k != "seeds"} | {"seed": args.seed}
    from cxrgaze.distributed import context_from_env, destroy

    main = context_from_env().is_main  # under torchrun only rank 0 reports
    variants = VARIANTS if args.variant == "all" else [args.variant]
    configs = [resolve_run_config(params, variant, where=args.params or "defaults") for variant in variants]
    open_prepared(args.prepared, params, args.params)
    try:
        for variant, config in zip(variants, configs):
            out = Path(args.out) / variant if args.variant == "all" else Path(args.out)
            if args.no_track:
                result, where = train(config, args.prepared, args.split, out, progress=not args.quiet,
                                      resume=not args.no_resume), ""
            else:
                result, run_id = train_tracked(config, args.prepared, args.split, out, progress=not args.quiet,
                                               resume=not args.no_resume)
                where = f", MLflow run {run_id}"
            if main:
                print(f"{variant}: best epoch {result.best_epoch + 1}/{config.train.epochs}, "
                      + ", ".join(f"{k}={v:.4f}" for k, v in result.best.items() if k.startswith("val_auc"))
                      + f"  -> {out}{where}")
    finally:
        destroy()  # leave the torchrun process group, if train() joined one


def cmd_tune(args: argparse.Namespace) -> None:
    from cxrgaze.config import tune_config
    from cxrgaze.tune.overrides import write_best
    from cxrgaze.tune.study import tune_variants

    params = load_params(args.params)
    cfg = tune_config(params, where=args.params, storage=args.storage, n_trials=args.n_trials,
                      workers=args.workers, seed=args.seed)
    open_prepared(args.prepared, params, args.params)
    variants = cfg.variants if args.variant == "all" else (args.variant,)
    results = tune_variants(params, cfg, variants, args.prepared, args.split)
    print(f"tuned overrides -> {write_best(args.out, params.get('variants') or {}, results)}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from cxrgaze.config import eval_config
    from cxrgaze.evaluate import evaluate
    from cxrgaze.experiment.evaluation import evaluate_tracked

    params = load_params(args.params) if args.params else {}
    config = eval_config(params, args.params, n_resamples=args.resamples)
    train_dir = Path(args.train_dir)
    if not (train_dir / "best.pt").is_file():  # the model first: without one, the data does not matter
        raise FileNotFoundError(f"{train_dir / 'best.pt'}: no such checkpoint (is --train-dir a training run's "
                                "folder?)")
    open_prepared(args.prepared, params, args.params)
    if args.no_track:
        result = evaluate(train_dir / "best.pt", args.prepared, args.split, args.out, config,
                          history_csv=train_dir / "history.csv", progress=not args.quiet)
        where = ""
    else:
        from cxrgaze.experiment.training import flush_train_run

        flush_train_run(train_dir)  # first what its training run missed while the tracking server was away
        result, run_id, model_uri = evaluate_tracked(train_dir, args.prepared, args.split, args.out,
                                                     config, progress=not args.quiet)
        where = f"; MLflow run {run_id}, model {model_uri}"
    m = result.metrics
    print(f"{result.variant}: test macro AUC {m['test_auc_macro']:.3f} [{m['test_auc_macro_ci95_low']:.3f}, "
          f"{m['test_auc_macro_ci95_high']:.3f}], val macro AUC {m['val_auc_macro']:.3f} -> {args.out}{where}")
