"""``python -m edgecompress``: the command line, as the ``edgecompress`` script runs it."""

import sys

from edgecompress.cli import main

sys.exit(main())
