"""Worker of tests/test_distributed_faults.py: ``torchrun ... tests/torchrun_faults.py PID_DIR ARGS...``.

Writes this process's pid to ``PID_DIR/rank<RANK>.pid`` (so that the test can stop or kill
one rank), then runs ``cxrgaze ARGS...`` with ``{rank}`` in the arguments replaced by
``RANK`` (an ``--out`` that each rank sees differently, as on storage that is not shared).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> int:
    pid_dir, args = Path(sys.argv[1]), sys.argv[2:]
    rank = os.environ["RANK"]
    (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    from cxrgaze.cli import main as cli_main

    return cli_main([a.replace("{rank}", rank) for a in args])


if __name__ == "__main__":
    sys.exit(main())
