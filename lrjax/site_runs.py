"""Sites costed as the traced net runs them: per example of the model's call, for every run of a
layer (shared weights, loop bodies), and left as they are where what splitting them saves cannot
be counted (inside a conditional branch) or is nothing (their output reaches none of the
model's outputs). Used by the linen and NNX surgeries after one traced count of the whole net
(:func:`lrjax.macs.traced_macs`, its layers marked by :func:`layer_indices`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from lrjax import costs
from lrjax.sites import ConvSite

__all__ = ["UNUSED", "BRANCHED", "example_batch", "per_example", "another_call",
           "layer_indices", "costed_as_run", "counted_as_run", "unused", "loop_note"]


def example_batch(args, outputs=None) -> int:
    """The batch of a model call's positional arguments: the leading dim of the first array
    among them (1 without one, or for a scalar); 1 too where ``outputs`` (the call's outputs, a
    pytree of arrays or of their shapes' structs) are given and none of them leads with it: a
    call on one unbatched example (google/dopamine's networks take one ``(84, 84, 4)``
    observation and flatten it whole; their agents ``jax.vmap`` them), whose costs are the
    call's, not per row of its first axis."""
    for a in args:
        if isinstance(a, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
            batch = int(a.shape[0]) if a.shape else 1
            break
    else:
        return 1
    if outputs is not None and batch > 1 and not any(
            tuple(getattr(o, "shape", np.shape(o)))[:1] == (batch,)
            for o in jax.tree.leaves(outputs)):
        return 1
    return batch


def per_example(site: ConvSite, batch: int) -> ConvSite:
    """``site`` with its geometry's ``images``, counted per call of the layer (the call's
    leading dims), made per example of a model called on ``batch`` examples: 1 for a layer
    called on the model's batch, more for one called on windows or frames folded into the
    batch or on a flattened ``(batch * tokens, C)`` input, less for one called unbatched."""
    if site.shape is None or batch == 1:
        return site
    return dataclasses.replace(site, shape=site.shape.times(1, batch),
                               param_cast_flops=site.param_cast_flops / batch)


def another_call(site: ConvSite, other: ConvSite) -> ConvSite:
    """``site`` (a layer's first call) with ``other`` (its site at a later call) among its
    shape's ``runs`` (:class:`lrjax.costs.ConvShape`) when its geometry is another (a detection
    head's conv shared by the levels of a feature pyramid: 16x16, 8x8, ..., whose padding taps
    are not in proportion), so that its cost, and what splitting it saves, sums over its calls'
    geometries; a geometry seen already adds nothing (lifted transforms trace a call more than
    once: how often each runs is the traced work's, :func:`counted_as_run`)."""
    if site.shape is None or other.shape is None or not site.candidate:
        return site
    call = dataclasses.replace(other.shape, name=site.shape.name, runs=())
    if any(dataclasses.replace(seen, runs=()) == call for seen in site.shape.calls):
        return site
    return dataclasses.replace(site, shape=dataclasses.replace(site.shape, runs=(
        *site.shape.runs, call)), param_cast_flops=site.param_cast_flops + other.param_cast_flops)


UNUSED = ("its output reaches none of the model's outputs (jax.jit computes none of its work: "
          "an output computed and dropped, such as a pooler whose result the model does not "
          "return): splitting it saves nothing")
BRANCHED = ("run inside a conditional branch (lax.cond / lax.switch, nn.cond, nnx.cond): which "
            "branch runs depends on the data, and the net's cost counts a conditional as its "
            "costliest branch (as XLA does), so what splitting it saves cannot be counted")


def layer_indices(found: Sequence[ConvSite]) -> dict[str, int]:
    """``{path: index}`` of the candidates among ``found``: the marks of their traced work
    (:func:`lrjax.macs.layer_scope`)."""
    return {s.path: i for i, s in enumerate(found) if s.candidate}


def costed_as_run(found: Sequence[ConvSite], counts: dict, batch: int) -> list[ConvSite]:
    """Every site of ``found`` through :func:`counted_as_run`, from a whole-net count
    (:func:`lrjax.macs.traced_macs` of a pass whose candidates were marked by their
    :func:`layer_indices`) of a batch of ``batch`` examples."""
    index = layer_indices(found)
    return [unused(s) if s.candidate and index.get(s.path) in counts.get("dead", ()) else
            counted_as_run(s, counts["layers"].get(index.get(s.path), 0) / batch,
                           index.get(s.path) in counts["branched"]) for s in found]


def unused(site: ConvSite) -> ConvSite:
    """``site`` left as it is (:data:`UNUSED`) and costed at nothing: ``jax.jit`` computes none
    of its work."""
    return dataclasses.replace(site, skip=UNUSED, shape=site.shape.times(0))


def counted_as_run(site: ConvSite, traced_macs: float, branched: bool = False) -> ConvSite:
    """``site`` costed for every run of its layer: ``traced_macs`` is its multiply-adds per
    example over all its runs in the traced forward pass (:func:`lrjax.macs.layer_scope`). A
    layer called more than once (shared weights) or inside a loop body (a ``scan`` with
    broadcast parameters, a ``fori_loop``) runs more often than the calls a site records (one
    per geometry, :func:`another_call`), and one whose last run XLA drops (its result unused,
    the loop unrolled) less often: their ``images`` are scaled by the ratio, so that its
    cost, and what splitting it saves, is what the net runs (exact when each geometry runs as
    often). A layer
    ``branched`` (run inside a conditional) is left as it is (:data:`BRANCHED`)."""
    if site.candidate and branched:
        return dataclasses.replace(site, skip=BRANCHED)
    if not site.candidate or traced_macs <= 0:
        return site
    runs = traced_macs / costs.conv_cost(site.shape).macs
    if abs(runs - 1) < 1e-6:
        return site
    return dataclasses.replace(site, shape=site.shape.times(runs),
                               param_cast_flops=site.param_cast_flops * runs)


def loop_note(counts: dict, batch: int) -> str | None:
    """A report's note where XLA's own count of the forward pass (``cost_analysis()`` of the
    lowered call, ``counts["xla_flops"]`` of :func:`lrjax.macs.traced_macs`) is not the whole
    net's cost counted here: it has the body of each scan XLA runs as a loop once, where the
    model runs it at every iteration (a ``speedup:S`` of a scanned stack of layers is of the
    work run; a ratio of XLA's counts weighs the loop bodies once). ``None`` otherwise."""
    every, xla = 2 * counts["total"] + counts["elementwise"], counts.get("xla_flops", 0)
    if not counts.get("rolled") or not xla or abs(every - xla) <= 1e-3 * every:
        return None
    loops = "its rolled loop (a scan)" if counts["rolled"] == 1 else \
        f"each of its {counts['rolled']} rolled loops (scans)"
    every = int(every // batch) if (every / batch).is_integer() else every / batch  # (as reported)
    return (f"XLA's own flop count of this forward pass (cost_analysis() of the lowered call) "
            f"has the body of {loops} once: {xla // batch:,} flops per example, against "
            f"{every:,} here with every iteration, as the model runs them; the costs and "
            "speedups here count every iteration")
