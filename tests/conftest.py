"""Test-session setup: the tests run under lrjax's recommended XLA flags (as its entry points do),
unless XLA_FLAGS is set already."""

import os

from lrjax import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags.RECOMMENDED)
