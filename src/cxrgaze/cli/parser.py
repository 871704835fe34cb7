"""The ``cxrgaze`` argument parser: one function per group of commands, called in the
order that ``cxrgaze --help`` lists them. Defaults that are pipeline paths come from
:mod:`cxrgaze.layout`."""

from __future__ import annotations

import argparse
from typing import Callable

from cxrgaze import layout
from cxrgaze.cli.data_commands import cmd_prepare, cmd_profile, cmd_split, cmd_synth
from cxrgaze.cli.model_commands import cmd_predict, cmd_register, cmd_report, cmd_serve, cmd_summary
from cxrgaze.cli.training_commands import cmd_evaluate, cmd_train, cmd_tune
from cxrgaze.variants import VARIANTS

Add = Callable[[str, Callable[[argparse.Namespace], None], str], argparse.ArgumentParser]
"""``add(name, handler, help)``: a new subcommand's parser, its handler set."""

_PREPARED_HELP = f"folder written by prepare (default {layout.PREPARED})"
_SPLIT_HELP = f"split table (default {layout.SPLIT})"
_EVAL_ROOT_HELP = "folder with one evaluate output per variant"


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

    _add_input_commands(add)
    _add_training_commands(add)
    _add_model_commands(add)
    _add_tune_command(add)
    p = add("summary", cmd_summary, "Print what the pipeline produced and how to browse it.")
    p.add_argument("--root", default=".", help="project folder (default: .)")
    return parser


def _add_input_commands(add: Add) -> None:
    """``profile`` (the parameters), ``synth``, ``prepare`` and ``split`` (the data)."""
    p = add("profile", cmd_profile, "Apply a profile overlay (profiles/NAME.yaml: only what differs) to params.yaml.")
    p.add_argument("profile", help="the overlay file, e.g. profiles/study.yaml")
    p.add_argument("--base", default=layout.PARAMS, help=f"the parameters to start from (default {layout.PARAMS})")
    p.add_argument("--out", default=layout.PARAMS, help=f"where to write the result (default {layout.PARAMS}; - for stdout)")

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
    p.add_argument("--image-size", type=int, default=None, help="side of the square arrays in pixels (data.image_size)")
    p.add_argument("--resize", choices=("stretch", "pad"), default=None,
                   help="stretch to the square like the reference, or pad to keep the aspect (data.resize)")
    p.add_argument("--gaze-sigma", type=float, default=None, help="Gaussian sigma in original pixels (reference: 150)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (0: one per core)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("split", cmd_split, "Patient-level train/val/test split of a prepared manifest.")
    p.add_argument("--prepared", required=True, help="folder written by `cxrgaze prepare`")
    p.add_argument("--out", required=True, help="split CSV to write (dicom_id, patient_id, label, split)")
    p.add_argument("--params", default=None, help="read the `split` section of this params.yaml")
    p.add_argument("--seed", type=int, default=None, help="seed of the patient assignment (split.seed)")


def _add_training_commands(add: Add) -> None:
    """``train`` and ``evaluate``."""
    p = add("train", cmd_train, "Train one variant (or all) on prepared arrays; checkpoints every epoch, resumable.")
    p.add_argument("--variant", required=True, help=f"{', '.join(VARIANTS)}, or all")
    p.add_argument("--prepared", default=layout.PREPARED, help=_PREPARED_HELP)
    p.add_argument("--split", default=layout.SPLIT, help=_SPLIT_HELP)
    p.add_argument("--out", required=True, help="checkpoint folder (with --variant all: one subfolder per variant)")
    p.add_argument("--params", default=None, help="read model/loss/train/variants from this params.yaml")
    p.add_argument("--epochs", type=int, default=None, help="replaces train.epochs")
    p.add_argument("--batch-size", type=int, default=None, help="the global batch; replaces train.batch_size")
    p.add_argument("--micro-batches", type=int, default=None, metavar="N",
                   help="cut each process's part of a global batch into N shards run in turn, accumulating "
                   "their gradients: one process computes what N torchrun ranks do (batch-norm statistics and "
                   "dropout per shard); replaces train.micro_batches (default 1)")
    p.add_argument("--lr", type=float, default=None, help="replaces train.lr")
    p.add_argument("--seed", type=int, default=None, help="train this one seed (replaces train.seed and train.seeds)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing last.pt (its folder is overwritten)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = add("evaluate", cmd_evaluate, "Evaluate a trained model: AUCs with bootstrap CIs, heatmaps vs gaze, figures; "
            "logged into its MLflow run with the servable model.")
    p.add_argument("--train-dir", required=True, help="folder of one training run: `cxrgaze train --out`, or a "
                   f"seed folder of the pipeline, e.g. {layout.TRAIN_ROOT}/unet/seed0 (best.pt, history.csv); its "
                   "MLflow run is found by the checkpoint's SHA-256")
    p.add_argument("--out", required=True, help="output folder (metrics.json, predictions.csv, saliency.csv, figures/)")
    p.add_argument("--prepared", default=layout.PREPARED, help=_PREPARED_HELP)
    p.add_argument("--split", default=layout.SPLIT, help=_SPLIT_HELP)
    p.add_argument("--params", default=None, help="read the `evaluate` section of this params.yaml")
    p.add_argument("--resamples", type=int, default=None, help="percentile-bootstrap resamples (default 2000)")
    p.add_argument("--no-track", action="store_true", help="only write files; no MLflow run, no logged model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_model_commands(add: Add) -> None:
    """``report``, ``register``, ``predict`` and ``serve``."""
    p = add("report", cmd_report, "The paper's tables for evaluated variants, with paired tests against unet and baseline.")
    p.add_argument("--eval-root", default=layout.EVAL_ROOT, help=_EVAL_ROOT_HELP)
    p.add_argument("--out", default=layout.REPORTS, help="output folder (results.md, results.json, paired.csv)")
    p.add_argument("--params", default=None, help="params.yaml: variant order and evaluate settings")
    p.add_argument("--variants", nargs="+", default=None, help="variants to include (default: all evaluated)")
    p.add_argument("--tune-json", default=layout.TUNE_METRICS,
                   help=f"the tune stage's metrics: which variants were tuned (default {layout.TUNE_METRICS})")
    p.add_argument("--headline", default=layout.HEADLINE,
                   help=f"the per-variant headline numbers (a DVC metric; default {layout.HEADLINE})")

    p = add("register", cmd_register, "Register evaluated models in the MLflow registry; move `champion` by validation AUC.")
    p.add_argument("--eval-root", default=layout.EVAL_ROOT, help=_EVAL_ROOT_HELP)
    p.add_argument("--prepared", default=layout.PREPARED, help=_PREPARED_HELP)
    p.add_argument("--split", default=layout.SPLIT, help=_SPLIT_HELP)
    p.add_argument("--dicom-dir", default=layout.DICOM_DIR, help="to re-evaluate the champion when the data changed")
    p.add_argument("--params", default=None, help="params.yaml: register section and variant list")
    p.add_argument("--variants", nargs="+", default=None, help="variants to register (default: params.yaml's)")
    p.add_argument("--min-delta", type=float, default=None, help="validation AUC gain needed to move the champion")
    p.add_argument("--train-root", default=None, help=f"checkpoints (e.g. {layout.TRAIN_ROOT}): log evaluations that "
                   "no MLflow run holds (restored by DVC)")

    p = add("predict", cmd_predict, "Diagnose image files (DICOM, PNG, JPEG) with the served model, offline: "
            "a JSON line per file and an overlay PNG per file; or a PACS study over DICOMweb (--dicomweb), "
            "storing a structured report and a heatmap image per image back into the study.")
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="DICOM files (PNG or JPEG where the X-ray gate allows them; not with --dicomweb)")
    p.add_argument("--dicomweb", default=None, metavar="URL", help="DICOMweb root of a PACS, e.g. "
                   "http://localhost:8042/dicom-web (Orthanc): read the images by WADO-RS, store the results by STOW-RS")
    p.add_argument("--study", default=None, metavar="UID", help="StudyInstanceUID to diagnose (with --dicomweb)")
    p.add_argument("--series", default=None, metavar="UID", help="only this SeriesInstanceUID of the study")
    p.add_argument("--instance", default=None, metavar="UID", help="only this SOPInstanceUID (needs --series)")
    p.add_argument("--model", default="models:/cxrgaze@champion",
                   help="model URI or local model folder (default models:/cxrgaze@champion)")
    p.add_argument("--out", default=None, help="folder for the overlay PNGs (none written without it; "
                   "with --dicomweb the overlays go to the PACS instead)")
    p.add_argument("--heatmap", choices=("mask", "gbp", "gradcam", "none"), default=None,
                   help="heatmap (default: mask for a U-Net, gbp for a model without decoder: baseline, rrr-*)")
    p.add_argument("--heatmap-size", type=int, default=None, help="heatmap side in pixels (default: the model's input size)")

    p = add("serve", cmd_serve, "Serve the registered champion over HTTP: MLflow's scoring app, plus raw DICOM "
                                "bodies, clean errors and the model's version in each answer.")
    p.add_argument("--model", default="models:/cxrgaze@champion", help="model URI (default models:/cxrgaze@champion)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; the server has no authentication)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--workers", type=int, default=None, help="server worker processes (default 1)")


def _add_tune_command(add: Add) -> None:
    """``tune`` (listed after the model commands, as it always was)."""
    p = add("tune", cmd_tune, "Tune each variant's loss weights (params.yaml tune.space: gamma, set 3's alpha, the "
            "outside-gaze terms, rrr_weight, lr) with Optuna; write the best values as per-variant overrides.")
    p.add_argument("--variant", required=True, choices=[*VARIANTS, "all"],
                   help="a variant, or all (those of tune.variants)")
    p.add_argument("--params", default=layout.PARAMS,
                   help=f"read tune/model/loss/train/variants from this file (default {layout.PARAMS})")
    p.add_argument("--prepared", default=layout.PREPARED, help=_PREPARED_HELP)
    p.add_argument("--split", default=layout.SPLIT, help=_SPLIT_HELP)
    p.add_argument("--storage", default=None, help="Optuna storage: sqlite:///FILE, journal:FILE (several workers, one "
                   "machine) or postgresql+psycopg2://USER:PASSWORD@HOST/DB (several machines); default tune.storage")
    p.add_argument("--n-trials", type=int, default=None, help="total trials wanted per study (a rerun adds the missing ones)")
    p.add_argument("--workers", type=int, default=None, help="worker processes on this machine (not with SQLite)")
    p.add_argument("--seed", type=int, default=None,
                   help="TPE seed (default tune.seed); each trial is sampled with a seed from it and the trial number")
    p.add_argument("--out", default=layout.TUNE_BEST, help=f"tuned overrides to write (default {layout.TUNE_BEST})")
