"""``python -m cxrgaze.cli``: the ``cxrgaze`` command (torchrun runs it this way)."""

import sys

from cxrgaze.cli import main

sys.exit(main())
