"""DVC stage `train@<variant>`: train one variant once per seed, keep its best checkpoints.

Usage (from dvc.yaml):
  python pipelines/train.py VARIANT PREPARED_DIR SPLIT_CSV TUNED_YAML OUT_DIR RESUME_DIR
Reads params.yaml: model, loss, train (``train.seeds``: one run per seed;
``train.micro_batches``: the shards each global batch is cut into, which the run config
carries to ``train``), variants; TUNED_YAML (the `tune` stage's output) may override them
for VARIANT (tuned loss weights).

Each seed is its own MLflow run (experiment `cxrgaze`, run name = variant, param
train.seed, tagged with the SHA-256 of its ``best.pt``: `evaluate` finds it by that) and
ends as OUT_DIR/seed<S>/ with ``best.pt``, ``history.csv`` and ``metrics.json``: files that
depend only on the inputs and the torch thread count (float summation order; ``metrics.json``
records it, with the world size and shard count: README "Several GPUs: torchrun"), so
the same params and data give the same ``dvc.lock`` on machines alike and DVC's run cache
can restore the stage (which it does only for a stage whose every output is cached: the
curves of every seed, a DVC plot committed to git, are written by `report` into
metrics/history/<variant>.csv).

Resuming lives outside the stage's output: a seed trains in RESUME_DIR/seed<S>/ (with
``last.pt`` written every epoch and ``run.json``, the MLflow run to continue), which is
not a DVC output, so `dvc repro` after a kill resumes the unfinished seed from its last
epoch and keeps the seeds that had finished. Resume state is used only when it was
written for the same inputs (:func:`fingerprint`: config, data, split and code);
anything else is discarded. When every seed is done, RESUME_DIR is removed.

A seed whose MLflow run missed records while the tracking server was away (its
``tracking_buffer.jsonl``: :mod:`cxrgaze.tracking_buffer`) keeps its resume folder and
the stage fails, naming what is missing: `evaluate` finds a run by its checkpoint tag,
so the pipeline must not go on without it. `dvc repro` once the server answers sends
the records (with their steps and times) and goes on, without training again.
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PARAMS, run_stage  # noqa: E402

DELIVERED = ("best.pt", "history.csv", "metrics.json")
"""What a finished seed leaves in OUT_DIR/seed<S>/."""
FINGERPRINT = "fingerprint.txt"


def fingerprint(config_dict: dict, prepared: Path, split_csv: Path) -> str:
    """What the resume state of one seed must have been written for: the run config, the
    prepared data (arrays included), the split, this stage and the cxrgaze code (a killed
    stage rerun after any of them changed must start over, as DVC would)."""
    import cxrgaze

    digest = hashlib.sha256(json.dumps(config_dict, sort_keys=True).encode())
    package = Path(cxrgaze.__file__).resolve().parent
    inputs = [*(prepared / name for name in ("manifest.csv", "meta.json", "images.npy", "gaze.npy")), split_csv,
              Path(__file__).resolve(), *sorted(package.rglob("*.py"))]
    for path in inputs:
        digest.update(str(path.relative_to(package) if path.is_relative_to(package) else path.name).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def resume_state(folder: Path, expected: str) -> bool:
    """Keep ``folder`` when it was written for ``expected``; remove it otherwise.
    Returns whether it holds a finished seed."""
    stamp = folder / FINGERPRINT
    if folder.exists() and (not stamp.exists() or stamp.read_text().strip() != expected):
        print(f"{folder}: resume state of other inputs; discarded")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(expected + "\n")
    finished = all((folder / name).exists() for name in DELIVERED)
    if finished:
        print(f"{folder}: finished before the stage was interrupted; kept")
    elif (folder / "last.pt").exists():
        print(f"{folder}: resuming an interrupted run from last.pt")
    return finished


def main() -> None:
    from cxrgaze.config import load_params
    from cxrgaze.experiment.training import finish_train_run, train_tracked
    from cxrgaze.config import resolve_run_config, run_seeds
    from cxrgaze.tracking import TrackingError, read_run_file
    from cxrgaze.tracking_buffer import BUFFER_FILE
    from cxrgaze.tune.overrides import load_tuned, merge_overrides

    variant, prepared, split_csv, tuned, out_dir, resume_dir = sys.argv[1:7]
    out, resume = Path(out_dir), Path(resume_dir)
    params = merge_overrides(load_params(PARAMS), load_tuned(tuned, variant), variant)
    where = f"{PARAMS} + {tuned}"
    seeds = run_seeds(params, where)
    for stale in (p for p in resume.iterdir() if p.name not in {f"seed{s}" for s in seeds}) if resume.is_dir() else ():
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    if out.exists():
        shutil.rmtree(out)  # DVC removes it too; a plain `python pipelines/train.py` must not mix runs
    incomplete = []
    for seed in seeds:
        config = resolve_run_config(params, variant, where=where, seed=seed)
        state = resume / f"seed{seed}"
        if resume_state(state, fingerprint(config.as_dict(), Path(prepared), Path(split_csv))):
            # what a tracking outage kept back, or a kill between its last file and the end of its run
            missing = finish_train_run(state)
        else:
            result, run_id = train_tracked(config, prepared, split_csv, state)
            print(f"{variant} seed {seed}: best epoch {result.best_epoch + 1}, val macro AUC "
                  f"{result.best.get('val_auc_macro', float('nan')):.4f}, MLflow run {run_id}")
            missing = read_run_file(state).get("tracking_incomplete")
        if missing:
            incomplete.append(f"seed {seed} lacks {missing}")
        (out / f"seed{seed}").mkdir(parents=True)
        for name in DELIVERED:
            shutil.copyfile(state / name, out / f"seed{seed}" / name)
    if incomplete:
        raise TrackingError(f"every seed trained, but MLflow runs are incomplete ({'; '.join(incomplete)}); kept in "
                            f"{resume}/seed<S>/{BUFFER_FILE}: run `dvc repro` again once the tracking server answers "
                            "(it sends them without training again)")
    shutil.rmtree(resume)
    if resume.parent.is_dir() and not any(resume.parent.iterdir()):
        resume.parent.rmdir()


if __name__ == "__main__":
    run_stage(f"train@{sys.argv[1] if len(sys.argv) > 1 else '?'}", main)
