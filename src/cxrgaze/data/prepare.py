"""``prepare``: decode every DICOM once into compact arrays with static gaze heatmaps.

Output folder (row i of every array is row i of ``manifest.csv``; S = ``image_size``):

- ``images.npy``  (N, S, S) float16 in [0, 1], bright = dense (MONOCHROME2 polarity)
- ``gaze.npy``    (N, S, S) float16 in [0, 1], the static gaze heatmap on the same grid
- ``manifest.csv`` ``dicom_id, patient_id, study_id, label, index, path, original_height,
  original_width, photometric, transfer_syntax, voi, n_fixations, n_fixations_outside``
- ``excluded.csv`` ``dicom_id, reason``: every listed image that could not be used
- ``fixations.csv`` ``dicom_id, x, y, duration, start``: the fixations inside the image, in
  TARGET pixel coordinates (for NSS / AUC-Judd), seconds for duration and start
- ``boxes.csv``   ``dicom_id, bbox_name, x1, x2, y1, y2`` in TARGET pixels (only when the
  EGD folder has ``bounding_boxes.csv``)
- ``meta.json``   the resolved data config (without ``workers``, which cannot change the
  output), counts, class counts and exclusions by kind

Rows follow the master sheet (or the id subset) order. Same inputs give the same bytes,
whatever the number of worker processes. :class:`cxrgaze.data.prepared.PreparedDir` names
these files and reads them back.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cxrgaze import CLASSES
from cxrgaze.config import DataConfig
from cxrgaze.data.dicom import ResizeMap
from cxrgaze.data.egd import read_bounding_boxes, read_fixations, read_id_subset, read_master_sheet
from cxrgaze.data.prepare_worker import ImageTask, decode_image
from cxrgaze.data.prepared import PreparedDir
from cxrgaze.data.schema import EXCLUDED_COLUMNS, MANIFEST_COLUMNS


class PrepareError(RuntimeError):
    """``prepare`` produced nothing usable (or its worker processes died)."""


@dataclass(frozen=True)
class PrepareResult:
    """What ``prepare`` wrote: counts and the paths of its outputs."""

    out_dir: Path
    n_listed: int
    n_prepared: int
    n_excluded: int
    class_counts: dict[str, int]
    excluded_by_kind: dict[str, int]
    files: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        """A few human-readable lines for the command line."""
        classes = ", ".join(f"{k} {v}" for k, v in self.class_counts.items())
        lines = [f"prepared {self.n_prepared} of {self.n_listed} images ({classes}) into {self.out_dir}"]
        if self.n_excluded:
            kinds = ", ".join(f"{k} {v}" for k, v in self.excluded_by_kind.items())
            lines.append(f"excluded {self.n_excluded} ({kinds}): see {self.files['excluded']}")
        return "\n".join(lines)


def prepare(
    egd_dir: str | Path,
    dicom_dir: str | Path,
    out_dir: str | Path,
    config: DataConfig = DataConfig(),
    ids_csv: str | Path | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Decode, resize and pair with gaze heatmaps every usable image; write ``out_dir``.

    ``egd_dir`` holds ``master_sheet.csv``, ``fixations.csv`` and optionally
    ``bounding_boxes.csv``; the master sheet's ``path`` is relative to ``dicom_dir``.
    ``ids_csv`` restricts (and orders) the images, in the paper's id-list format.
    Unusable images go to ``excluded.csv`` with a one-line reason and the run goes on;
    raises ``PrepareError`` when none is usable. Decodes in ``config.workers`` processes
    (0: one per core) with a progress bar when ``progress``.
    """
    egd_dir, dicom_dir, out = Path(egd_dir), Path(dicom_dir), PreparedDir(out_dir)
    if not dicom_dir.is_dir():
        raise FileNotFoundError(f"{dicom_dir}: no such DICOM folder")
    master, fixations, boxes, listed = _read_egd(egd_dir, ids_csv)
    by_id = {key: group for key, group in fixations.groupby("DICOM_ID", sort=False)}
    subset_name = Path(ids_csv).name if ids_csv is not None else "master_sheet.csv"
    tasks, excluded = _plan(listed, subset_name, master, by_id, dicom_dir, config)
    results = _run(tasks, config.workers, progress)
    for task in tasks:
        if "error" in results[task.index]:
            excluded[task.index] = results[task.index]["error"]

    out.path.mkdir(parents=True, exist_ok=True)
    out.remove_outputs()
    excluded_rows = _write_excluded(out, listed, excluded)
    kept = [task for task in tasks if "error" not in results[task.index]]
    by_kind = dict(sorted(Counter(kind for _, kind, _ in excluded_rows).items()))
    if not kept:
        common = ", ".join(f"{k} {v}" for k, v in Counter(kind for _, kind, _ in excluded_rows).most_common(3))
        raise PrepareError(f"no usable images: all {len(listed)} listed images were excluded ({common}); "
                           f"see {out.excluded_path}")

    rows = master.drop_duplicates("dicom_id").set_index("dicom_id")
    manifest = _write_arrays_and_manifest(kept, results, rows, out)
    _write_fixations(kept, results, out)
    if boxes is not None:
        _write_boxes(boxes, results, kept, out)
    class_counts = {c: int((manifest["label"] == c).sum()) for c in CLASSES}
    counts = {
        "listed": len(listed),
        "prepared": len(kept),
        "excluded": len(excluded_rows),
        "fixations_prepared": int(manifest["n_fixations"].sum()),
        "fixations_outside_image": int(manifest["n_fixations_outside"].sum()),
        "fixation_ids_not_in_master_sheet": len(set(by_id) - set(master["dicom_id"])),
    }
    _write_meta(out, config, counts, class_counts, by_kind, ids_csv)
    return PrepareResult(out.path, len(listed), len(kept), len(excluded_rows), class_counts, by_kind, out.existing())


def _read_egd(egd_dir: Path, ids_csv: str | Path | None
              ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None, list[str]]:
    """Master sheet, fixations, bounding boxes (None without the file) and the listed ids."""
    master = read_master_sheet(egd_dir / "master_sheet.csv")
    fixations = read_fixations(egd_dir / "fixations.csv")
    boxes_csv = egd_dir / "bounding_boxes.csv"
    boxes = read_bounding_boxes(boxes_csv) if boxes_csv.is_file() else None
    listed = read_id_subset(ids_csv) if ids_csv is not None else master["dicom_id"].tolist()
    if not listed:
        raise PrepareError(f"{ids_csv or egd_dir / 'master_sheet.csv'}: no images listed")
    return master, fixations, boxes, listed


def _write_excluded(out: PreparedDir, listed: list[str],
                    excluded: dict[int, tuple[str, str]]) -> list[tuple[str, str, str]]:
    """``excluded.csv`` in listed order; returns its rows as ``(dicom_id, kind, reason)``."""
    excluded_rows = [(listed[i], *excluded[i]) for i in sorted(excluded)]
    report = pd.DataFrame([(d, r) for d, _, r in excluded_rows], columns=list(EXCLUDED_COLUMNS))
    _write_csv(report, out.excluded_path)
    return excluded_rows


def _write_meta(out: PreparedDir, config: DataConfig, counts: dict, class_counts: dict, by_kind: dict,
                ids_csv: str | Path | None) -> None:
    """``meta.json``: the config that shaped the arrays, counts, classes, exclusions by kind."""
    meta = {
        "config": {k: v for k, v in asdict(config).items() if k != "workers"},  # workers cannot change the output
        "counts": counts,
        "classes": class_counts,
        "excluded_by_kind": by_kind,
        "arrays": {"shape": [counts["prepared"], config.image_size, config.image_size], "dtype": "float16"},
        "id_subset": Path(ids_csv).name if ids_csv is not None else None,
    }
    out.meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def _plan(listed: list[str], listed_in: str, master: pd.DataFrame, fixations: dict[str, pd.DataFrame],
          dicom_dir: Path, config: DataConfig) -> tuple[list[ImageTask], dict[int, tuple[str, str]]]:
    """The decode tasks and the exclusions known without decoding, by listed position.

    Exclusions are ``(kind, reason)``; reasons name the file at fault and never hold an
    absolute path, so the report is the same on every machine.
    """
    root = dicom_dir.resolve()
    first_row = {}
    for position, dicom_id in enumerate(master["dicom_id"]):
        first_row.setdefault(dicom_id, position)
    copies = master["dicom_id"].value_counts()
    tasks: list[ImageTask] = []
    excluded: dict[int, tuple[str, str]] = {}
    seen: set[str] = set()
    for index, dicom_id in enumerate(listed):
        if dicom_id in seen:
            excluded[index] = ("duplicate", f"{listed_in}: listed more than once (only the first is used)")
            continue
        seen.add(dicom_id)
        if dicom_id not in first_row:
            excluded[index] = ("not_in_master_sheet", f"{listed_in}: listed but not in master_sheet.csv")
            continue
        row = master.iloc[first_row[dicom_id]]
        if copies[dicom_id] > 1:
            excluded[index] = ("duplicate", f"master_sheet.csv: listed {copies[dicom_id]} times")
            continue
        if isinstance(row["label_error"], str):
            excluded[index] = ("label", f"master_sheet.csv: {row['label_error']}")
            continue
        if dicom_id not in fixations:
            excluded[index] = ("no_fixations", "fixations.csv: no fixations for this image")
            continue
        rel = row["path"]
        if not rel:
            excluded[index] = ("missing_file", "master_sheet.csv: empty path")
            continue
        target = (root / rel).resolve()
        if not target.is_relative_to(root):
            excluded[index] = ("path_outside", f"{rel}: path resolves outside the DICOM folder (refused)")
            continue
        if not target.is_file():
            excluded[index] = ("missing_file", f"{rel}: missing file")
            continue
        fix = fixations[dicom_id]
        tasks.append(ImageTask(index, dicom_id, str(target), rel,
                           fix["X_ORIGINAL"].to_numpy(), fix["Y_ORIGINAL"].to_numpy(),
                           fix["FPOGD"].to_numpy(), fix["FPOGS"].to_numpy(),
                           config.image_size, config.resize, config.gaze_sigma, config.gaze_duration_weighted))
    return tasks, excluded


def _run(tasks: list[ImageTask], workers: int, progress: bool) -> dict[int, dict]:
    """Run ``decode_image`` over the tasks, in processes when more than one worker is useful."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(workers or cores, max(len(tasks), 1))
    bar = tqdm(total=len(tasks), desc="prepare", unit="img", disable=not progress)
    results: dict[int, dict] = {}
    try:
        if workers <= 1:
            for task in tasks:
                results[task.index] = decode_image(task)
                bar.update()
            return results
        context = multiprocessing.get_context("spawn")  # no fork of a parent that may hold threads (torch)
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
        try:
            futures = [pool.submit(decode_image, task) for task in tasks]
            for future in as_completed(futures):
                result = future.result()
                results[result["index"]] = result
                bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C does not wait for the queue
    except BrokenProcessPool as exc:
        raise PrepareError(f"a decoding process died ({exc}); workers are spawned, so a script that calls "
                           "prepare() needs an `if __name__ == '__main__':` guard; else try fewer workers") from None
    finally:
        bar.close()
    return results


def _write_arrays_and_manifest(kept: list[ImageTask], results: dict[int, dict], rows: pd.DataFrame,
                               out: PreparedDir) -> pd.DataFrame:
    """``images.npy``, ``gaze.npy`` and ``manifest.csv``, row i = kept[i]."""
    np.save(out.images_path, np.stack([results[t.index]["image"] for t in kept]))  # (N, S, S)
    np.save(out.gaze_path, np.stack([results[t.index]["gaze"] for t in kept]))  # (N, S, S)
    records = []
    for position, task in enumerate(kept):
        result = results[task.index]
        info = result["info"]
        row = rows.loc[task.dicom_id]
        records.append({
            "dicom_id": task.dicom_id, "patient_id": row["patient_id"], "study_id": row["study_id"],
            "label": row["label"],
            "index": position, "path": task.name, "original_height": info.original_height,
            "original_width": info.original_width, "photometric": info.photometric,
            "transfer_syntax": info.transfer_syntax, "voi": info.voi,
            "n_fixations": len(result["fixations"]), "n_fixations_outside": result["n_outside"],
        })
    manifest = pd.DataFrame.from_records(records)
    assert tuple(manifest.columns[:4]) == MANIFEST_COLUMNS
    _write_csv(manifest, out.manifest_path)
    return manifest


def _write_fixations(kept: list[ImageTask], results: dict[int, dict], out: PreparedDir) -> None:
    """``fixations.csv``: the inside fixations of every prepared image, target pixels."""
    frames = []
    for task in kept:
        values = results[task.index]["fixations"]  # (F_in, 4)
        frame = pd.DataFrame(values, columns=["x", "y", "duration", "start"])
        frame.insert(0, "dicom_id", task.dicom_id)
        frames.append(frame)
    _write_csv(pd.concat(frames, ignore_index=True), out.fixations_path, float_format="%.3f")


def _write_boxes(boxes: pd.DataFrame, results: dict[int, dict], kept: list[ImageTask], out: PreparedDir) -> None:
    """``boxes.csv``: the boxes of prepared images in target pixels, manifest order."""
    by_id = {key: group for key, group in boxes.groupby("dicom_id", sort=False)}
    frames = []
    for task in kept:
        info = results[task.index]["info"]
        mine = by_id.get(task.dicom_id)
        if mine is None:
            continue
        resize_map = ResizeMap.create((info.original_height, info.original_width), task.size, task.resize)
        x1, x2, y1, y2 = resize_map.map_boxes(mine["x1"], mine["x2"], mine["y1"], mine["y2"])
        frames.append(pd.DataFrame({"dicom_id": task.dicom_id, "bbox_name": mine["bbox_name"].to_numpy(),
                                    "x1": x1, "x2": x2, "y1": y1, "y2": y2}))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(boxes.columns))
    _write_csv(table, out.boxes_path, float_format="%.3f")


def _write_csv(table: pd.DataFrame, path: Path, float_format: str | None = None) -> None:
    """CSV with LF line ends and no index (byte-stable)."""
    table.to_csv(path, index=False, lineterminator="\n", float_format=float_format)
