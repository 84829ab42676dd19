"""The measured gate: which low-rank pairs pay off when each layer is timed alone, in JAX or in
the runtime a model is deployed to (what a ``+measured`` rank rule reads; :mod:`lrjax.rules`
applies it)."""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from lrjax import costs, runtimes, timing

__all__ = ["MIN_RETURN", "measured_gate", "poor_returns"]

# Under 'speedup:S+measured', a pair must save at least this fraction of the time its
# multiply-adds promise (timed alone): the budget is fungible, and a cut that saves
# multiply-adds but little time is better spent on a layer whose pair runs near its count.
MIN_RETURN = 1 / 3


def measured_gate(layers, ranks: Mapping[str, int], *, batch: int = 1, repeats: int = 3,
                  dtype=jnp.float32, runtime: str = "jax"):
    """Keep a layer full rank where its pair is not faster on the current backend, or in the
    runtime the model is deployed to.

    Each decomposed layer is timed alone (forward) as a full conv and as a pair: jitted
    (``runtime="jax"``), or exported and run in ONNX Runtime / LiteRT
    (:func:`lrjax.timing.layer_times` with :func:`lrjax.runtimes.layer_call`).

    Returns:
      ``(ranks, times)``: the gated ranks (None = keep full rank) and
      ``{layer: (full s, pair s)}``.
    """
    if runtime not in runtimes.RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {runtimes.RUNTIMES}")
    call = None if runtime == "jax" else runtimes.layer_call(runtime)
    times = timing.layer_times(layers, ranks, batch=batch, dtype=dtype, repeats=repeats,
                               call=call)
    gated = {}
    for name, rank in ranks.items():
        if name in times:
            full, pair = times[name]
            gated[name] = rank if pair < full else None
        else:
            gated[name] = rank
    return gated, times


def poor_returns(layers: Mapping[str, costs.ConvShape], ranks: Mapping[str, int],
                 times: Mapping[str, tuple[float, float]], *,
                 where: str) -> tuple[dict[str, str], dict[str, float]]:
    """The layers whose pair saves less than :data:`MIN_RETURN` of the time its multiply-adds
    promise.

    Args:
      layers: ``{path: ConvShape}``; ranks: ``{path: rank}`` of their pairs.
      times: ``{path: (full s, pair s)}`` as :func:`measured_gate` returns them.
      where: how the layers were timed (for the reason).

    Returns:
      ``(poor, returns)``: ``{path: why}`` of the poor ones and ``{path: time saved / time
      promised}`` of every layer judged.
    """
    poor, returns = {}, {}
    for path, rank in ranks.items():
        full, pair = times[path]
        shape = layers[path]
        saved = 1 - costs.lowrank_cost(shape, rank).macs / costs.conv_cost(shape).macs
        returns[path] = (full - pair) / (saved * full)
        if returns[path] < MIN_RETURN:
            poor[path] = (f"its pair (rank {rank}) saved {1 - pair / full:.0%} of the layer's "
                          f"time for {saved:.0%} of its multiply-adds, {where}; the rule's "
                          "budget went to other layers")
    return poor, returns
