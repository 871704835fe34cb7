"""Throughput of ``prepare`` on full-size DICOMs (about 2500 x 3000, 12-bit).

Writes 12 MIMIC-like DICOMs (6 uncompressed, 6 JPEG 2000 lossless; some MONOCHROME1, some
windowed) with EGD-CXR tables into a temporary folder, then runs ``prepare`` at 224 px on
the uncompressed ones, the JPEG 2000 ones and all (id subsets), each with 1 and with 2
worker processes, and prints images per second. Also times decoding alone per transfer
syntax, to show where the time goes.

Run: .venv/bin/python bench/bench_prepare.py   (about 2 minutes on a 2-core CPU)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dicoms import write_layout  # noqa: E402

from cxrgaze.config import DataConfig  # noqa: E402
from cxrgaze.data.dicom import read_dicom  # noqa: E402
from cxrgaze.data.prepare import prepare  # noqa: E402

SYNTAXES = [ExplicitVRLittleEndian, JPEG2000Lossless] * 6
SIZE = 224


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        egd, dicoms = write_layout(root, SYNTAXES)
        print(f"wrote {len(SYNTAXES)} DICOMs in {time.perf_counter() - t0:.1f} s "
              f"({sum(p.stat().st_size for p in dicoms.rglob('*.dcm')) / 2**20:.0f} MiB)")

        decode = {}
        for path in sorted(dicoms.rglob("*.dcm"))[:4]:
            t0 = time.perf_counter()
            _, info = read_dicom(path)
            decode.setdefault(info.transfer_syntax_name, []).append(time.perf_counter() - t0)

        ids = {"uncompressed": [f"bench-{i:03d}" for i in range(0, len(SYNTAXES), 2)],
               "JPEG 2000": [f"bench-{i:03d}" for i in range(1, len(SYNTAXES), 2)],
               "mixed": [f"bench-{i:03d}" for i in range(len(SYNTAXES))]}
        rows = []
        for kind, listed in ids.items():
            ids_csv = root / f"ids-{len(rows)}.csv"
            ids_csv.write_text(",filename\n" + "".join(f"{k},{d}\n" for k, d in enumerate(listed, 1)))
            for workers in (1, 2):
                config = DataConfig(image_size=SIZE, resize="stretch", gaze_sigma=150.0, workers=workers)
                t0 = time.perf_counter()
                result = prepare(egd, dicoms, root / f"out-{kind}-{workers}", config, ids_csv=ids_csv, progress=False)
                seconds = time.perf_counter() - t0
                rows.append((kind, workers, result.n_prepared, seconds, result.n_prepared / seconds))

    print(f"\nprepare, {SIZE} px, full-size 12-bit DICOMs, {os.cpu_count()} CPU cores (wall time incl. process start)")
    print(f"{'images':<13} {'workers':>7} {'n':>3} {'seconds':>8} {'images/s':>9}")
    for kind, workers, n, seconds, rate in rows:
        print(f"{kind:<13} {workers:>7} {n:>3} {seconds:8.1f} {rate:9.2f}")
    print("\ndecode + grayscale pipeline alone (one process, s/image)")
    for name, times in decode.items():
        print(f"  {name}: {sum(times) / len(times):.2f}")


if __name__ == "__main__":
    main()
