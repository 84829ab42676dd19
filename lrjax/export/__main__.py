"""``python -m lrjax.export``: see :mod:`lrjax.cli.export`."""

import sys

from lrjax.cli.export import main

sys.exit(main())
