"""The ``cxrgaze`` command: a thin layer over the library's functions.

Every subcommand has ``--help``, shows progress on long work and, on bad input, exits
with status 2 and one line naming the file and the problem (no traceback). A traceback
means a bug in cxrgaze.

This package holds :func:`main` and :data:`USER_ERRORS`; :mod:`~cxrgaze.cli.parser` the
argument parser; :mod:`~cxrgaze.cli.data_commands`, :mod:`~cxrgaze.cli.training_commands`
and :mod:`~cxrgaze.cli.model_commands` the handlers by group; :mod:`cxrgaze.layout`
the pipeline's default paths; :mod:`~cxrgaze.cli.summary` what ``cxrgaze summary`` prints.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from cxrgaze.cli.parser import build_parser
from cxrgaze.errors import USER_ERRORS, first_line
from cxrgaze.layout import export_data_version

__all__ = ["USER_ERRORS", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        export_data_version()
        args.func(args)
    except USER_ERRORS as exc:
        if os.environ.get("CXRGAZE_DEBUG"):
            raise
        message = first_line(exc)
        sys.stderr.write(f"cxrgaze {args.command}: error: {message}\n")  # one write: ranks of a job share stderr
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM under torchrun (cxrgaze.distributed.Terminated)
        print(f"cxrgaze {args.command}: interrupted" + (f": {first_line(exc)}" if str(exc).strip() else ""),
              file=sys.stderr)
        return 130
    return 0
