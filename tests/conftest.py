"""Test-session setup: the tests run under lrjax's recommended XLA flags (as its entry points do),
unless XLA_FLAGS is set already."""

import os
import signal

import pytest

from lrjax import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags.RECOMMENDED)


@pytest.fixture
def preempt_at_step(monkeypatch):
    """``preempt_at_step(n)``: runs set up by ``lrjax.train.setup`` from then on receive a SIGTERM
    right after their step ``n`` (global step), as a preempted job would; ``preempt_at_step(None)``
    stops that. The training loop itself has no test hook."""
    from lrjax import train

    wanted = {"step": None}
    real_setup = train.setup

    def setup(*args, **kwargs):
        run = real_setup(*args, **kwargs)
        real_step = run.train_step

        def train_step(state, batch, metrics):
            state, metrics = real_step(state, batch, metrics)
            if wanted["step"] is not None and int(state.step) == wanted["step"]:
                os.kill(os.getpid(), signal.SIGTERM)
            return state, metrics

        run.train_step = train_step
        return run

    monkeypatch.setattr(train, "setup", setup)

    def arm(step):
        wanted["step"] = step

    return arm
