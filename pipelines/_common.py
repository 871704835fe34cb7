"""Shared glue for the stage entries: params loading with errors as one line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

PARAMS = Path(os.environ.get("CXRGAZE_PARAMS", "params.yaml"))


def run_stage(name: str, body: Callable[[], None]) -> None:
    """Run a stage body; report user errors as one line and exit 2 (tracebacks are bugs)."""
    from cxrgaze.config import check_params, load_params
    from cxrgaze.errors import USER_ERRORS, first_line
    from cxrgaze.layout import export_data_version

    try:
        export_data_version()
        check_params(load_params(PARAMS), str(PARAMS))  # every section, also those this stage does not read
        body()
    except USER_ERRORS as exc:
        if os.environ.get("CXRGAZE_DEBUG"):
            raise
        print(f"stage {name}: error: {first_line(exc)}", file=sys.stderr)
        sys.exit(2)
