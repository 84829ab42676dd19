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
from lrjax.layers import LowRankConv, LowRankConvTranspose

__all__ = ["median_time", "layer_times", "interleaved_times", "steady_times"]


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
    if layer.transposed:
        kwargs = dict(strides=layer.strides, padding=layer.padding,
                      kernel_dilation=layer.dilation, use_bias=layer.use_bias, dtype=dtype)
        if rank is None:
            return nn.ConvTranspose(layer.out_channels, layer.kernel_size, **kwargs)
        return LowRankConvTranspose(layer.out_channels, layer.kernel_size, rank=rank, **kwargs)
    kwargs = dict(strides=layer.strides, padding=layer.padding, kernel_dilation=layer.dilation,
                  feature_group_count=layer.groups, use_bias=layer.use_bias, dtype=dtype)
    if rank is None:
        return nn.Conv(layer.out_channels, layer.kernel_size,
                       conv_general_dilated=formulations.conv_general_dilated, **kwargs)
    return LowRankConv(layer.out_channels, layer.kernel_size, rank=rank, **kwargs)


def layer_times(
    layers: Sequence[costs.ConvShape],
    ranks: Mapping[str, int | None],
    *,
    batch: int = 1,
    dtype=jnp.float32,
    repeats: int = 5,
    backward: bool = False,
    call: Callable | None = None,
    min_time_s: float = 0.1,
) -> dict[str, tuple[float, float]]:
    """Median forward (or forward+backward) seconds of each decomposed layer, full and as a pair.

    Each layer runs alone on a random ``(batch, H, W, C)`` input of its own size: jitted, with
    the formulations :mod:`lrjax.formulations`' policy picks (``call=None``), or in another
    runtime: ``call(module, variables, x)`` returns a zero-argument call running the linen
    ``module`` there (forward only, float32; e.g. :func:`lrjax.runtimes.layer_call`
    ``("onnxruntime")``). The full conv and its pair take turns, timed in
    steady state (:func:`steady_times`): at least ``repeats`` calls each, and at least
    ``min_time_s`` seconds of calls for the faster of the two (at most 300 calls).

    Returns:
      ``{layer: (full seconds, pair seconds)}``.

    Raises:
      ValueError: ``backward`` outside JAX.
    """
    if backward and call is not None:
        raise ValueError("backward timings run in JAX only (call=None)")
    out = {}
    for layer in layers:
        rank = ranks.get(layer.name)
        if rank is None:
            continue
        x = jax.random.normal(jax.random.key(0), (batch, *layer.input_hw, layer.in_channels),
                              dtype)
        calls = {}
        for r in (None, rank):
            module = _layer_module(layer, r, dtype if call is None else jnp.float32)
            variables = module.init(jax.random.key(1), x[:1])
            if call is not None:
                calls[r] = call(module, variables, x)
                continue
            if backward:
                fn = jax.jit(jax.grad(lambda v, x, m=module: jnp.sum(m.apply(v, x).astype(
                    jnp.float32) ** 2), argnums=(0, 1)))
            else:
                fn = jax.jit(module.apply)
            calls[r] = lambda fn=fn, v=variables, x=x: jax.block_until_ready(fn(v, x))
        times = steady_times(calls, repeats, min_time_s=min_time_s)
        out[layer.name] = (statistics.median(times[None]), statistics.median(times[rank]))
    return out


# Steady state: each turn of a contender is a pause of SETTLE_S, STEADY_WARMUP untimed calls,
# then STEADY_BURST timed calls back to back (a runtime serving requests). A pause is needed
# because ONNX Runtime's worker threads keep spinning after a call returns and, on 2 cores,
# slowed the LiteRT call that followed from 34 to 53 ms (low-rank VGG-16, batch 1); the untimed
# call is needed because after the pause the runtimes' worker threads are asleep, and waking them
# costs every parallel section (~30 us per node: a full ResNet-18 in ONNX Runtime took 3.56 ms
# after a pause, 2.58 ms back to back; one conv1_1 in PyTorch 8.6 vs 0.4 ms).
SETTLE_S = 0.05
STEADY_BURST, STEADY_WARMUP = 3, 1


def steady_times(calls: Mapping[object, Callable[[], object]], repeats: int,
                 min_time_s: float = 0.0) -> dict[object, list[float]]:
    """Seconds of each zero-argument call in steady state, the contenders taking turns.

    At least ``repeats`` timed calls per contender (rounded up to whole bursts of
    ``STEADY_BURST``), and more (up to 100 turns) until the fastest contender has been timed
    ``min_time_s`` seconds in all. See :func:`interleaved_times` and ``SETTLE_S``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    return interleaved_times(calls, math.ceil(repeats / STEADY_BURST), settle_s=SETTLE_S,
                             min_time_s=min_time_s, burst=STEADY_BURST,
                             burst_warmup=STEADY_WARMUP)


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
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
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
