"""The ``cxrgaze`` command: a thin layer over the library's functions.

Every subcommand has ``--help``, shows progress on long work and, on bad input, exits
with status 2 and one line naming the file and the problem (no traceback). A traceback
means a bug in cxrgaze.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from cxrgaze.config import ConfigError, DataConfig, SplitConfig, from_mapping, load_params
from cxrgaze.variants import VARIANTS
from cxrgaze.errors import first_line

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError, RuntimeError, OSError)
"""Exceptions that mean bad input or environment, reported as one line
(set ``CXRGAZE_DEBUG=1`` to see the traceback instead)."""


def _params_section(params_path: str | None, section: str) -> dict:
    """The ``section`` mapping of a params file, or {} when no file is given/present."""
    if params_path is None:
        return {}
    return dict(load_params(params_path).get(section) or {})


def cmd_synth(args: argparse.Namespace) -> None:
    from cxrgaze.data.synth import synthesize

    kwargs = {"patients": args.patients, "seed": args.seed, "shortcut_strength": args.shortcut_strength,
              "workers": args.workers or (os.cpu_count() or 1), "progress": not args.quiet, "overwrite": args.overwrite}
    if args.image_size is not None:
        kwargs["image_size"] = args.image_size
    result = synthesize(Path(args.out), **kwargs)
    print(result.summary())


def cmd_prepare(args: argparse.Namespace) -> None:
    from cxrgaze.data.prepare import prepare

    values = _params_section(args.params, "data")
    for key in ("image_size", "resize", "gaze_sigma", "workers"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    config = from_mapping(DataConfig, values, where=f"{args.params}: data" if args.params else "data")
    result = prepare(Path(args.egd_dir), Path(args.dicom_dir), Path(args.out), config,
                     ids_csv=Path(args.ids) if args.ids else None, progress=not args.quiet)
    print(result.summary() if hasattr(result, "summary") else result)


def cmd_split(args: argparse.Namespace) -> None:
    from cxrgaze.data.split import write_split

    values = _params_section(args.params, "split")
    if args.seed is not None:
        values["seed"] = args.seed
    config = from_mapping(SplitConfig, values, where=f"{args.params}: split" if args.params else "split")
    summary = write_split(Path(args.prepared) / "manifest.csv", Path(args.out), config)
    print(summary.to_string())


def cmd_train(args: argparse.Namespace) -> None:
    from cxrgaze.experiment import train_tracked
    from cxrgaze.train import resolve_run_config, train

    params = load_params(args.params) if args.params else {}
    for key in ("epochs", "device", "batch_size", "lr"):
        if getattr(args, key) is not None:
            params.setdefault("train", {})
            params["train"] = {**(params["train"] or {}), key: getattr(args, key)}
    if args.seed is not None:  # one run with this seed, whatever train.seeds lists
        params["train"] = {k: v for k, v in (params.get("train") or {}).items() if k != "seeds"} | {"seed": args.seed}
    from cxrgaze.distributed import context_from_env, destroy

    main = context_from_env().is_main  # under torchrun only rank 0 reports
    variants = VARIANTS if args.variant == "all" else [args.variant]
    try:
        for variant in variants:
            config = resolve_run_config(params, variant, where=args.params or "defaults")
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


def cmd_evaluate(args: argparse.Namespace) -> None:
    from cxrgaze.evaluate import EvalConfig, evaluate
    from cxrgaze.experiment import evaluate_tracked

    values = _params_section(args.params, "evaluate")
    if args.resamples is not None:
        values["n_resamples"] = args.resamples
    config = from_mapping(EvalConfig, values, where=f"{args.params}: evaluate" if args.params else "evaluate")
    train_dir = Path(args.train_dir)
    if args.no_track:
        result = evaluate(train_dir / "best.pt", args.prepared, args.split, args.out, config,
                          history_csv=train_dir / "history.csv", progress=not args.quiet)
        where = ""
    else:
        result, run_id, model_uri = evaluate_tracked(train_dir, args.prepared, args.split, args.out,
                                                     config, progress=not args.quiet)
        where = f"; MLflow run {run_id}, model {model_uri}"
    m = result.metrics
    print(f"{result.variant}: test macro AUC {m['test_auc_macro']:.3f} [{m['test_auc_macro_ci95_low']:.3f}, "
          f"{m['test_auc_macro_ci95_high']:.3f}], val macro AUC {m['val_auc_macro']:.3f} -> {args.out}{where}")


def cmd_report(args: argparse.Namespace) -> None:
    from cxrgaze.report import build_report, read_tuning, write_report

    params = load_params(args.params) if args.params else {}
    variants = args.variants or list(params.get("variants") or {}) or sorted(
        p.name for p in Path(args.eval_root).iterdir() if (p / "metrics.json").exists())
    from cxrgaze.evaluate import EvalConfig

    config = from_mapping(EvalConfig, params.get("evaluate"), where=f"{args.params}: evaluate" if args.params else "evaluate")
    report = build_report(args.eval_root, variants, n_resamples=config.n_resamples, seed=config.seed,
                          confidence=config.confidence, specificity=config.specificity,
                          tuning=read_tuning(args.tune_json))
    paths = write_report(report, args.out, args.headline)
    print(paths["markdown"].read_text())


def cmd_register(args: argparse.Namespace) -> None:
    from cxrgaze.experiment import register_evaluated

    params = load_params(args.params) if args.params else {}
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

    from cxrgaze.serving.predict import predict_files

    failed = 0
    for result in predict_files(args.files, args.model, args.out, args.heatmap, args.heatmap_size):
        failed += "error" in result
        print(json.dumps(result), flush=True)
    if failed:
        raise ValueError(f"{failed} of {len(args.files)} files could not be predicted (see their `error`)")


def cmd_serve(args: argparse.Namespace) -> None:
    from cxrgaze.serving.serve import serve

    serve(args.model, args.host, args.port, args.workers)


def cmd_tune(args: argparse.Namespace) -> None:
    from cxrgaze.tune import tune_config, tune_variants, write_best

    params = load_params(args.params)
    cfg = tune_config(params, where=args.params, storage=args.storage, n_trials=args.n_trials,
                      workers=args.workers, seed=args.seed)
    variants = cfg.variants if args.variant == "all" else (args.variant,)
    results = tune_variants(params, cfg, variants, args.prepared, args.split)
    print(f"tuned overrides -> {write_best(args.out, params.get('variants') or {}, results)}")


def cmd_profile(args: argparse.Namespace) -> None:
    import yaml

    from cxrgaze.config import overlay

    merged = overlay(load_params(args.base), load_params(args.profile))
    text = (f"# {args.base} with the overlay {args.profile} (written by `cxrgaze profile`; "
            f"`git checkout {args.base}` restores the original)\n" + yaml.safe_dump(merged, sort_keys=False))
    if args.out == "-":
        print(text, end="")
    else:
        Path(args.out).write_text(text)
        print(f"{args.out}: {args.base} + {args.profile}")


def cmd_summary(args: argparse.Namespace) -> None:
    from cxrgaze.summary import print_summary

    print_summary(Path(args.root))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrgaze",
        description="Explainable chest X-ray classifiers supervised by radiologist eye gaze.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("profile", cmd_profile, "Apply a profile overlay (profiles/NAME.yaml: only what differs) to params.yaml.")
    p.add_argument("profile", help="the overlay file, e.g. profiles/study.yaml")
    p.add_argument("--base", default="params.yaml", help="the parameters to start from (default params.yaml)")
    p.add_argument("--out", default="params.yaml", help="where to write the result (default params.yaml; - for stdout)")

    p = add("synth", cmd_synth, "Write a synthetic dataset in the real EGD-CXR + MIMIC-CXR layout.")
    p.add_argument("out", help="output folder (gets egd-cxr/ and mimic-cxr/)")
    p.add_argument("--patients", type=int, default=420, help="number of patients (default 420: about 525 images, "
                   "170 of them in the shortcut-free test split)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--image-size", type=int, default=None, help="approximate image side in pixels (default ~256; real MIMIC-CXR is ~2500-3000)")
    p.add_argument("--shortcut-strength", type=float, default=0.9,
                   help="share of train/val images whose burned-in marker agrees with the label; 0 turns the shortcut off (default 0.9)")
    p.add_argument("--workers", type=int, default=0, help="processes (0: one per core); the output does not depend on it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("prepare", cmd_prepare, "Decode DICOMs once into arrays with gaze heatmaps; write manifest.csv and excluded.csv.")
    p.add_argument("--egd-dir", required=True, help="EGD-CXR folder (master_sheet.csv, fixations.csv, bounding_boxes.csv)")
    p.add_argument("--dicom-dir", required=True, help="MIMIC-CXR root: the master sheet's `path` column is relative to it")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--ids", default=None, help="optional id subset in the paper's format (header ',filename')")
    p.add_argument("--params", default=None, help="read the `data` section of this params.yaml (flags override it)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--resize", choices=("stretch", "pad"), default=None)
    p.add_argument("--gaze-sigma", type=float, default=None, help="Gaussian sigma in original pixels (reference: 150)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (0: one per core)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("split", cmd_split, "Patient-level train/val/test split of a prepared manifest.")
    p.add_argument("--prepared", required=True, help="folder written by `cxrgaze prepare`")
    p.add_argument("--out", required=True, help="split CSV to write (dicom_id, patient_id, label, split)")
    p.add_argument("--params", default=None, help="read the `split` section of this params.yaml")
    p.add_argument("--seed", type=int, default=None)

    p = add("train", cmd_train, "Train one variant (or all) on prepared arrays; checkpoints every epoch, resumable.")
    p.add_argument("--variant", required=True, help=f"{', '.join(VARIANTS)}, or all")
    p.add_argument("--prepared", default="outputs/prepared", help="folder written by prepare (default outputs/prepared)")
    p.add_argument("--split", default="outputs/split.csv", help="split table (default outputs/split.csv)")
    p.add_argument("--out", required=True, help="checkpoint folder (with --variant all: one subfolder per variant)")
    p.add_argument("--params", default=None, help="read model/loss/train/variants from this params.yaml")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="train this one seed (replaces train.seed and train.seeds)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing last.pt (its folder is overwritten)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = add("evaluate", cmd_evaluate, "Evaluate a trained model: AUCs with bootstrap CIs, heatmaps vs gaze, figures; "
            "logged into its MLflow run with the servable model.")
    p.add_argument("--train-dir", required=True, help="folder of one training run: `cxrgaze train --out`, or a "
                   "seed folder of the pipeline, e.g. outputs/train/unet/seed0 (best.pt, history.csv); its MLflow run is "
                   "found by the checkpoint's SHA-256")
    p.add_argument("--out", required=True, help="output folder (metrics.json, predictions.csv, saliency.csv, figures/)")
    p.add_argument("--prepared", default="outputs/prepared", help="folder written by prepare (default outputs/prepared)")
    p.add_argument("--split", default="outputs/split.csv", help="split table (default outputs/split.csv)")
    p.add_argument("--params", default=None, help="read the `evaluate` section of this params.yaml")
    p.add_argument("--resamples", type=int, default=None, help="percentile-bootstrap resamples (default 2000)")
    p.add_argument("--no-track", action="store_true", help="only write files; no MLflow run, no logged model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = add("report", cmd_report, "The paper's tables for evaluated variants, with paired tests against unet and baseline.")
    p.add_argument("--eval-root", default="outputs/eval", help="folder with one evaluate output per variant")
    p.add_argument("--out", default="reports", help="output folder (results.md, results.json, paired.csv)")
    p.add_argument("--params", default=None, help="params.yaml: variant order and evaluate settings")
    p.add_argument("--variants", nargs="+", default=None, help="variants to include (default: all evaluated)")
    p.add_argument("--tune-json", default="metrics/tune.json",
                   help="the tune stage's metrics: which variants were tuned (default metrics/tune.json)")
    p.add_argument("--headline", default="metrics/headline.json",
                   help="the per-variant headline numbers (a DVC metric; default metrics/headline.json)")

    p = add("register", cmd_register, "Register evaluated models in the MLflow registry; move `champion` by validation AUC.")
    p.add_argument("--eval-root", default="outputs/eval", help="folder with one evaluate output per variant")
    p.add_argument("--prepared", default="outputs/prepared")
    p.add_argument("--split", default="outputs/split.csv")
    p.add_argument("--dicom-dir", default="data/mimic-cxr", help="to re-evaluate the champion when the data changed")
    p.add_argument("--params", default=None, help="params.yaml: register section and variant list")
    p.add_argument("--variants", nargs="+", default=None)
    p.add_argument("--min-delta", type=float, default=None, help="validation AUC gain needed to move the champion")
    p.add_argument("--train-root", default=None,
                   help="checkpoints (e.g. outputs/train): log evaluations that no MLflow run holds (restored by DVC)")

    p = add("predict", cmd_predict, "Diagnose image files (DICOM, PNG, JPEG) with the served model, offline: "
            "a JSON line per file and an overlay PNG per file.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--model", default="models:/cxrgaze@champion",
                   help="model URI or local model folder (default models:/cxrgaze@champion)")
    p.add_argument("--out", default=None, help="folder for the overlay PNGs (none written without it)")
    p.add_argument("--heatmap", choices=("mask", "gbp", "gradcam", "none"), default=None,
                   help="heatmap (default: mask for a U-Net, gbp for a model without decoder: baseline, rrr-*)")
    p.add_argument("--heatmap-size", type=int, default=None, help="heatmap side in pixels (default: the model's input size)")

    p = add("serve", cmd_serve, "Serve the registered champion over HTTP (mlflow models serve, --env-manager local).")
    p.add_argument("--model", default="models:/cxrgaze@champion", help="model URI (default models:/cxrgaze@champion)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; the server has no authentication)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--workers", type=int, default=None, help="server worker processes (default: MLflow's, 1)")

    p = add("tune", cmd_tune, "Tune each variant's loss weights (params.yaml tune.space: gamma, set 3's alpha, the outside-gaze "
            "terms, rrr_weight, lr) "
            "with Optuna; write the best values as per-variant overrides.")

    p.add_argument("--variant", required=True, choices=[*VARIANTS, "all"],
                   help="a variant, or all (those of tune.variants)")
    p.add_argument("--params", default="params.yaml", help="read tune/model/loss/train/variants from this file (default params.yaml)")
    p.add_argument("--prepared", default="outputs/prepared", help="folder written by prepare (default outputs/prepared)")
    p.add_argument("--split", default="outputs/split.csv", help="split table (default outputs/split.csv)")
    p.add_argument("--storage", default=None, help="Optuna storage: sqlite:///FILE, journal:FILE (several workers, one "
                   "machine) or postgresql+psycopg2://USER:PASSWORD@HOST/DB (several machines); default tune.storage")
    p.add_argument("--n-trials", type=int, default=None, help="total trials wanted per study (a rerun adds the missing ones)")
    p.add_argument("--workers", type=int, default=None, help="worker processes on this machine (not with SQLite)")
    p.add_argument("--seed", type=int, default=None, help="TPE seed (default tune.seed); each trial is sampled with a seed from it and the trial number")
    p.add_argument("--out", default="outputs/tune/best.yaml", help="tuned overrides to write (default outputs/tune/best.yaml)")

    p = add("summary", cmd_summary, "Print what the pipeline produced and how to browse it.")
    p.add_argument("--root", default=".", help="project folder (default: .)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as exc:
        if os.environ.get("CXRGAZE_DEBUG"):
            raise
        message = first_line(exc)
        print(f"cxrgaze {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cxrgaze {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
