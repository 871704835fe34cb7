"""DVC stage `split`: patient-level train/val/test split of the prepared manifest.

Usage (from dvc.yaml): python pipelines/split.py PREPARED_DIR OUT_CSV COUNTS_JSON
Reads params.yaml: split. COUNTS_JSON gets the images per split and class (a DVC metric,
committed to git).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PARAMS, run_stage  # noqa: E402


def main() -> None:
    from cxrgaze.config import SplitConfig, load_section
    from cxrgaze.data.prepared import PreparedDir
    from cxrgaze.data.split import write_split

    prepared, out_csv, counts_json = sys.argv[1:4]
    counts = write_split(PreparedDir(prepared).manifest_path, Path(out_csv), load_section(SplitConfig, "split", PARAMS),
                         counts_json=counts_json)
    print(counts.to_string())


if __name__ == "__main__":
    run_stage("split", main)
