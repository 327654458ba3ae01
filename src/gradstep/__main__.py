"""``python -m gradstep``: the command line (see :mod:`gradstep.lab.cli`)."""

import sys

from .lab.cli import main

sys.exit(main())
