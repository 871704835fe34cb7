"""DVC stage `split`: patient-level train/val/test split of the prepared manifest.

Usage (from dvc.yaml): python pipelines/split.py PREPARED_DIR OUT_CSV
Reads params.yaml: split. Also writes OUT_CSV's .json twin (counts, a DVC metric).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PARAMS, run_stage  # noqa: E402


def main() -> None:
    from cxrgaze.config import SplitConfig, load_section
    from cxrgaze.data.split import write_split

    prepared, out_csv = sys.argv[1:3]
    counts = write_split(Path(prepared) / "manifest.csv", Path(out_csv), load_section(SplitConfig, "split", PARAMS))
    print(counts.to_string())


if __name__ == "__main__":
    run_stage("split", main)
