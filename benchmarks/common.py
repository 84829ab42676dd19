"""Helpers shared by the benchmark scripts: setup, the facts recorded with every figure, timing."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping

from lrjax import checkpoint, xla_flags


def setup() -> None:
    """Every benchmark's first call: lrjax's recommended XLA flags unless the user set
    ``XLA_FLAGS`` (before JAX starts its backends)."""
    xla_flags.use_recommended_flags()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine(*extra_packages: str) -> dict:
    """The facts a benchmark figure needs next to it: machine, versions, flags, policy."""
    import jax

    from lrjax import formulations

    packages = ("jax", "jaxlib", "flax", "numpy", *extra_packages)
    return {
        "platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "versions": {p: _version(p) for p in packages},
        "xla_flags": xla_flags.flags_in_effect(),
        "ld_preload": os.environ.get("LD_PRELOAD"),  # e.g. tcmalloc: see BENCHMARKS.md
        "formulation_policy": formulations.get_policy(),
        "formulations_active": formulations.active(),
    }


def write_json(path: str, data) -> None:
    """Write ``data`` to ``path`` atomically (no half-written result file on failure)."""
    checkpoint.write_json(path, data)


def interleaved_times(calls: Mapping[object, Callable[[], object]], rounds: int,
                      warmup: int = 1, settle_s: float = 0.0, min_time_s: float = 0.0,
                      max_rounds: int = 100, burst: int = 1,
                      burst_warmup: int = 0) -> dict[object, list[float]]:
    """Seconds of each zero-argument call (which must block until its result is ready), timed
    with the contenders taking turns.

    Taking turns spreads the slow phases of a shared machine evenly over every contender, and
    the median of single calls ignores the odd call a neighbour slowed down. Each of the
    ``rounds`` turns of a contender is: a pause of ``settle_s`` (so that the worker threads the
    previous contender keeps spinning after its call returns, as ONNX Runtime's do, are idle),
    ``burst_warmup`` untimed calls, then ``burst`` timed calls back to back. ``burst=1,
    burst_warmup=0`` times each call after a pause (cold worker threads); a burst after an
    untimed call times a runtime serving calls back to back (steady state). ``min_time_s``: at
    least enough rounds (but no more than ``max_rounds``) for the fastest contender, at the
    speed of its last warm-up call, to be timed this many seconds in all, so that millisecond
    calls get a median over enough of them.
    """
    if burst < 1 or burst_warmup < 0:
        raise ValueError(f"burst must be >= 1 and burst_warmup >= 0; got {burst}, "
                         f"{burst_warmup}")
    last = {}
    for key, run in calls.items():
        for _ in range(warmup):  # compile + warm-up
            t0 = time.perf_counter()
            run()
            last[key] = time.perf_counter() - t0
    if min_time_s and last:
        fastest = max(min(last.values()), 1e-6)
        wanted = math.ceil(math.ceil(min_time_s / fastest) / burst)
        rounds = max(rounds, min(max_rounds, wanted))
    times = {key: [] for key in calls}
    for _ in range(rounds):
        for key, run in calls.items():
            if settle_s:
                time.sleep(settle_s)
            for _ in range(burst_warmup):
                run()
            for _ in range(burst):
                t0 = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - t0)
    return times


def median(values) -> float:
    return statistics.median(values)
