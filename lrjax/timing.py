"""Wall-clock timing of jitted functions, of single conv layers (full vs low-rank pair) and of
contenders taking turns."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrjax import costs, formulations
from lrjax.layers import LowRankConv

__all__ = ["median_time", "layer_times", "interleaved_times", "RUNTIMES"]


def median_time(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn(*args)`` (blocked until ready) after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def _layer_module(layer: costs.ConvShape, rank: int | None, dtype) -> nn.Module:
    kwargs = dict(strides=layer.strides, padding=layer.padding, kernel_dilation=layer.dilation,
                  feature_group_count=layer.groups, use_bias=layer.use_bias, dtype=dtype)
    if rank is None:
        return nn.Conv(layer.out_channels, layer.kernel_size,
                       conv_general_dilated=formulations.conv_general_dilated, **kwargs)
    return LowRankConv(layer.out_channels, layer.kernel_size, rank=rank, **kwargs)


RUNTIMES = ("jax", "onnxruntime", "litert")


def _runtime_call(module, variables, x, runtime: str) -> Callable[[], object]:
    """A zero-argument call running ``module`` on ``x`` in an exported runtime (float32)."""
    import os
    import tempfile

    import numpy as np

    from lrjax import export

    xs = np.asarray(x, np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "layer")
        if runtime == "onnxruntime":
            export.to_onnx(module, variables, xs, path, check=False)
            session = export.onnx_session(path)
            return lambda: session.run(None, {"input": xs})
        export.to_tflite(module, variables, xs, path, check=False)
        with open(path, "rb") as f:
            run = export.litert_runner(export.litert_interpreter(f.read()))
        return lambda: run(xs)


def layer_times(
    layers: Sequence[costs.ConvShape],
    ranks: Mapping[str, int | None],
    *,
    batch: int = 1,
    dtype=jnp.float32,
    repeats: int = 5,
    backward: bool = False,
    runtime: str = "jax",
) -> dict[str, tuple[float, float]]:
    """Median forward (or forward+backward) seconds of each decomposed layer, full and as a pair.

    Each layer runs alone on a random ``(batch, H, W, C)`` input of its own size: jitted, with
    the formulations :mod:`lrjax.formulations`' policy picks (``runtime="jax"``), or exported
    with :mod:`lrjax.export` and run in ONNX Runtime (``"onnxruntime"``) or LiteRT
    (``"litert"``; forward only, float32). The full conv and its pair take turns.

    Returns:
      ``{layer: (full seconds, pair seconds)}``.

    Raises:
      ValueError: an unknown runtime, or ``backward`` outside JAX.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {RUNTIMES}")
    if backward and runtime != "jax":
        raise ValueError(f"backward timings need runtime='jax'; got {runtime!r}")
    out = {}
    for layer in layers:
        rank = ranks.get(layer.name)
        if rank is None:
            continue
        x = jax.random.normal(jax.random.key(0), (batch, *layer.input_hw, layer.in_channels),
                              dtype)
        if runtime != "jax":
            calls = {}
            for r in (None, rank):
                module = _layer_module(layer, r, jnp.float32)
                variables = module.init(jax.random.key(1), x[:1])
                calls[r] = _runtime_call(module, variables, x, runtime)
            times = interleaved_times(calls, repeats, settle_s=0.05)
            out[layer.name] = (statistics.median(times[None]), statistics.median(times[rank]))
            continue
        pair = []
        for r in (None, rank):
            module = _layer_module(layer, r, dtype)
            variables = module.init(jax.random.key(1), x[:1])
            if backward:
                fn = jax.jit(jax.grad(lambda v, x, m=module: jnp.sum(m.apply(v, x).astype(
                    jnp.float32) ** 2), argnums=(0, 1)))
            else:
                fn = jax.jit(module.apply)
            pair.append(median_time(fn, variables, x, repeats=repeats))
        out[layer.name] = tuple(pair)
    return out


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
