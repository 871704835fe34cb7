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
    from cxrgaze.config import VARIANTS
    from cxrgaze.train import resolve_run_config, train

    params = load_params(args.params) if args.params else {}
    for key in ("epochs", "device", "seed", "batch_size", "lr"):
        if getattr(args, key) is not None:
            params.setdefault("train", {})
            params["train"] = {**(params["train"] or {}), key: getattr(args, key)}
    variants = VARIANTS if args.variant == "all" else [args.variant]
    for variant in variants:
        config = resolve_run_config(params, variant, where=args.params or "defaults")
        out = Path(args.out) / variant if args.variant == "all" else Path(args.out)
        result = train(config, args.prepared, args.split, out, progress=not args.quiet, resume=not args.no_resume)
        print(f"{variant}: best epoch {result.best_epoch + 1}/{config.train.epochs}, "
              + ", ".join(f"{k}={v:.4f}" for k, v in result.best.items() if k.startswith("val_auc")) + f"  -> {out}")


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

    p = add("synth", cmd_synth, "Write a synthetic dataset in the real EGD-CXR + MIMIC-CXR layout.")
    p.add_argument("out", help="output folder (gets egd-cxr/ and mimic-cxr/)")
    p.add_argument("--patients", type=int, default=240, help="number of patients (default 240)")
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
    p.add_argument("--variant", required=True, help="baseline, unet, set1-gbp, set1-deconv, set2-gbp, set2-deconv, "
                   "set3-gbp, set3-deconv, set3-grad, or all")
    p.add_argument("--prepared", default="outputs/prepared", help="folder written by prepare (default outputs/prepared)")
    p.add_argument("--split", default="outputs/split.csv", help="split table (default outputs/split.csv)")
    p.add_argument("--out", required=True, help="checkpoint folder (with --variant all: one subfolder per variant)")
    p.add_argument("--params", default=None, help="read model/loss/train/variants from this params.yaml")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing last.pt (its folder is overwritten)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

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
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"cxrgaze {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cxrgaze {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
