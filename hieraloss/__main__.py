"""``python -m hieraloss``: the command line (see :mod:`hieraloss.cli`)."""

import sys

from .cli import main

sys.exit(main())
