"""Test-session setup.

Unless XLA_FLAGS is set already, the tests run under lrjax's recommended XLA flags (as its entry
points do) plus :data:`FAST_COMPILE`: the suite is compile-bound (small shapes, few steps), and
no test measures speed (the benchmarks do, under the recommended flags alone). LLVM at -O0
compiles it about twice as fast; XLA:CPU's older loop emitters instead of its fusion emitters
(``--xla_cpu_use_fusion_emitters=false``, same results) another 15-25% (test_rules 11.3 ->
8.6 s, test_surgery_convert 40.6 -> 30.5 s, 2026-12-03). The digits learning test, bound by
execution, runs in its own process without the -O0. The tests share one JAX compilation cache
(a fresh temporary folder per session, inherited by pytest-xdist workers and the subprocesses
tests start), so that a computation compiled by one test is not compiled again by another.
"""

import atexit
import os
import shutil
import signal
import tempfile

import pytest

from lrjax import xla_flags
from tests.helpers import LOOP_EMITTERS

FAST_COMPILE = f"--xla_backend_optimization_level=0 {LOOP_EMITTERS}"
os.environ.setdefault("XLA_FLAGS", f"{xla_flags.RECOMMENDED} {FAST_COMPILE}")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the first process of the session
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lrjax-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


@pytest.fixture(autouse=True)
def _short_settle(monkeypatch):
    """No test measures speed: the pause before each contender's turn in a timing
    (``lrjax.timing.SETTLE_S``, 50 ms, so that a runtime's worker threads fall asleep as between
    real calls) is 0.1 ms here, instead of seconds of sleep per timed layer."""
    from lrjax import timing

    monkeypatch.setattr(timing, "SETTLE_S", 1e-4)


@pytest.fixture
def preempt_at_step(monkeypatch):
    """``preempt_at_step(n)``: runs set up by ``lrjax.train.setup`` from then on receive a SIGTERM
    right after their step ``n`` (global step), as a preempted job would; ``preempt_at_step(None)``
    stops that. The training loop itself has no test hook."""
    from lrjax import train
    from tests.helpers import after_each_step

    wanted = {"step": None}

    def preempt(step):
        if wanted["step"] is not None and step == wanted["step"]:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "setup", after_each_step(train.setup, preempt))

    def arm(step):
        wanted["step"] = step

    return arm


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 4 (each worker holds its own JAX runtime and
    TensorFlow; more workers only add memory on a small machine)."""
    return max(1, min(os.cpu_count() or 1, 4))


def pytest_collection_modifyitems(config, items):
    """In a run that includes tests marked ``slow`` (end-to-end runs, mostly in their own
    processes; ``-m slow``), those run first, so that pytest-xdist's workers share them and finish
    together instead of one waiting on the other."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
