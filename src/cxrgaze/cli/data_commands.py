"""The handlers of the commands that make the inputs: ``profile`` (parameters), ``synth``,
``prepare`` and ``split`` (data), and the params-file helper the handlers share."""

# Heavy modules (torch, mlflow, pandas and what pulls them in) are imported inside each
# handler, on purpose: `cxrgaze --help` and the other commands start without loading them.

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cxrgaze.config import DataConfig, SplitConfig, check_params, from_mapping, load_params


def read_params(params_path: str | None) -> dict:
    """The mapping of a params file, every section checked (:func:`cxrgaze.config.check_params`:
    also those the command does not use); {} when no file is given."""
    if params_path is None:
        return {}
    params = load_params(params_path)
    check_params(params, params_path)
    return params


def params_section(params_path: str | None, section: str) -> dict:
    """The ``section`` mapping of a params file (checked whole: :func:`read_params`), or {}
    when no file is given."""
    return dict(read_params(params_path).get(section) or {})


def cmd_profile(args: argparse.Namespace) -> None:
    import yaml

    from cxrgaze.config import overlay

    merged = overlay(load_params(args.base), load_params(args.profile))
    check_params(merged, f"{args.base} + {args.profile}")
    text = (f"# {args.base} with the overlay {args.profile} (written by `cxrgaze profile`; "
            f"`git checkout {args.base}` restores the original)\n" + yaml.safe_dump(merged, sort_keys=False))
    if args.out == "-":
        print(text, end="")
    else:
        Path(args.out).write_text(text)
        print(f"{args.out}: {args.base} + {args.profile}")


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

    values = params_section(args.params, "data")
    for key in ("image_size", "resize", "gaze_sigma", "workers"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    config = from_mapping(DataConfig, values, where=f"{args.params}: data" if args.params else "data")
    result = prepare(Path(args.egd_dir), Path(args.dicom_dir), Path(args.out), config,
                     ids_csv=Path(args.ids) if args.ids else None, progress=not args.quiet)
    print(result.summary() if hasattr(result, "summary") else result)


def cmd_split(args: argparse.Namespace) -> None:
    from cxrgaze.data.split import write_split

    values = params_section(args.params, "split")
    if args.seed is not None:
        values["seed"] = args.seed
    config = from_mapping(SplitConfig, values, where=f"{args.params}: split" if args.params else "split")
    summary = write_split(Path(args.prepared) / "manifest.csv", Path(args.out), config)
    print(summary.to_string())
