"""``python -m gradstep``: the command line (see :mod:`gradstep.cli`)."""

import sys

from .cli import main

sys.exit(main())
