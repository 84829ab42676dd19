"""``python -m lrjax.convert``: see :mod:`lrjax.cli.convert`."""

import sys

from lrjax.cli.convert import main

sys.exit(main())
