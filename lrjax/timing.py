"""Wall-clock timing of jitted functions and of single conv layers (full vs low-rank pair)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrjax import costs, formulations
from lrjax.layers import LowRankConv

__all__ = ["median_time", "layer_times"]


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


def layer_times(
    layers: Sequence[costs.ConvShape],
    ranks: Mapping[str, int | None],
    *,
    batch: int = 1,
    dtype=jnp.float32,
    repeats: int = 5,
    backward: bool = False,
) -> dict[str, tuple[float, float]]:
    """Median forward (or forward+backward) seconds of each decomposed layer, full and as a pair.

    Each layer runs alone, jitted, on a random ``(batch, H, W, C)`` input of its own size, with
    the formulations :mod:`lrjax.formulations`' policy picks.

    Returns:
      ``{layer: (full seconds, pair seconds)}``.
    """
    out = {}
    for layer in layers:
        rank = ranks.get(layer.name)
        if rank is None:
            continue
        x = jax.random.normal(jax.random.key(0), (batch, *layer.input_hw, layer.in_channels),
                              dtype)
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
