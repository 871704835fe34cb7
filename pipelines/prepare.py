"""DVC stage `prepare`: decode the DICOMs once, gaze heatmaps, manifest and exclusions.

Usage (from dvc.yaml): python pipelines/prepare.py EGD_DIR DICOM_DIR OUT_DIR METRICS_JSON [IDS_CSV]
METRICS_JSON (counts of kept and excluded images, by class and reason; a DVC metric,
committed to git) sits outside OUT_DIR because DVC does not allow a metric inside a
stage's output folder.
Reads params.yaml: data.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PARAMS, run_stage  # noqa: E402


def main() -> None:
    from cxrgaze.config import DataConfig, load_section
    from cxrgaze.data.prepare import prepare
    from cxrgaze.data.prepared import PreparedDir

    egd_dir, dicom_dir, out_dir, metrics_json, *ids = sys.argv[1:]
    result = prepare(Path(egd_dir), Path(dicom_dir), Path(out_dir), load_section(DataConfig, "data", PARAMS),
                     ids_csv=Path(ids[0]) if ids and ids[0] else None)
    meta = PreparedDir(out_dir).meta()
    Path(metrics_json).parent.mkdir(parents=True, exist_ok=True)  # the counts; the config is in params.yaml
    Path(metrics_json).write_text(json.dumps({k: meta[k] for k in ("counts", "classes", "excluded_by_kind")},
                                             indent=2) + "\n")
    print(result.summary() if hasattr(result, "summary") else result)


if __name__ == "__main__":
    run_stage("prepare", main)
