"""Calibration statistics of a linen model's layers: the second moments of each layer's first
factor's input over calibration batches (:func:`calibration_moments`).

Two passes, both jitted once per batch shape. The first sows each listed layer's moments into a
collection (a layer under ``nn.remat`` or ``nn.jit`` runs in that transform's trace, and only
its collections leave it), summed over its calls (a layer applied twice is fitted to both
inputs). A layer inside a loop body, whose sown values do not leave the loop
(``nn.scan`` with broadcast parameters: a weight-tied recurrence, Flax's ``nn.RNN`` cells; a
layer stacked by ``nn.scan`` / ``nn.vmap``), gets a second pass that hands each run's moments to
the host (``jax.debug.callback``): all runs are summed, and a stacked layer's runs go to the
iteration (or ensemble member) whose kernel slice ran, identified by its values, so that each
iteration's closed form is calibrated on its own inputs. A model whose call fails when a
collection is mutable (Flax's ``nn.map_variables(..., init=True)``) gets the second pass alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from lrjax import sites
from lrjax.layers import module_path, split_call
from lrjax.linen_trace import layer_input
from lrjax.moments import RunSums, calibration_batches, split_keywords, static_argnums
from lrjax.written_products import stored_kernel

__all__ = ["calibration_moments"]

_MOMENTS = "lrjax_calibration"  # the collection calibration statistics are sown into


def _layer_moments(module, path, call_args, call_kwargs, site_of):
    """The moments of one call's input, in the layer's geometry as it runs (one slice of a
    stack)."""
    x = layer_input(call_args, call_kwargs)
    axes, equation = sites.contracted_axes(module), None
    if isinstance(module, nn.Einsum):
        equation = sites.called_equation(module.einsum_str, call_args[1:], call_kwargs,
                                         x.ndim)
        axes = sites.einsum_split(equation).input_axes
    return sites.input_moments(site_of(path, module, x, equation), x, axes)


def _wanted_calls(wanted, site_of, take):
    """A method interceptor calling ``take(module, path, moments)`` on each call of a layer in
    ``wanted`` (its input's moments, :func:`_layer_moments`), then the layer itself."""
    def intercept(next_fun, call_args, call_kwargs, context):
        module = context.module
        found = split_call(module, context)  # (a subclass: its base's call, super().__call__)
        if found is not None:
            path = module_path(module)
            if path in wanted:
                take(module, path, _layer_moments(found[1], path, call_args, call_kwargs,
                                                  site_of))
        return next_fun(*call_args, **call_kwargs)

    return intercept


def calibration_moments(model: nn.Module, variables, calibration,
                        paths: Sequence[str] | Mapping[str, sites.ConvSite],
                        example_kwargs: Mapping | None = None,
                        example_args: tuple | None = None, strict: bool = True, *,
                        site_of: Callable, counts_out: dict | None = None
                        ) -> dict[str, np.ndarray]:
    """Second moments ``E[p p^T]`` of the first factor's input patches of each layer in
    ``paths`` (see the module docstring); sums in float64 on the host.

    Args:
      paths: the layers' paths, or ``{path: its site}`` (:class:`lrjax.sites.ConvSite`: a
        written layer's kernel is its module's parameter, under its own name; a stacked one's
        iterations may be on another axis than the first).
      calibration: one batch of model inputs (an array, or a tuple of positional arguments), or
        an iterable of such batches.
      example_kwargs: keyword arguments of every call (e.g. ``train=False``).
      example_args: the example call's positional arguments, which each batch must match.
      site_of: ``site_of(path, module, x, equation)``, the :class:`lrjax.sites.ConvSite` of a
        layer's call.
      counts_out: filled with ``{path: input vectors seen}`` (first pass only).

    Returns:
      ``{path: (groups, C_g * kh, C_g * kh) float64}``; a stacked layer's groups are its
      iterations' (each iteration's own groups, in order).

    Raises:
      ValueError: no batch, a batch with NaN/Inf values, or (``strict``) a listed layer whose
        statistics never came back (without ``strict`` it is left out).
    """
    kwargs = dict(example_kwargs or {})
    wanted = set(paths)
    found = dict(paths) if isinstance(paths, Mapping) else {}
    batches = calibration_batches(calibration, example_args, kwargs)

    def moments(variables, *batch):
        def sow(module, path, moments):
            module.sow(_MOMENTS, path, moments)

        args, keywords = split_keywords(batch, kwargs)
        with nn.intercept_methods(_wanted_calls(wanted, site_of, sow)):
            _, state = model.apply(variables, *args, mutable=[_MOMENTS], **keywords)
        sown = traverse_util.flatten_dict(flax.core.unfreeze(state.get(_MOMENTS, {})))
        return {key[-1]: (sum(c[0] for c in calls), sum(c[1] for c in calls))  # every call
                for key, calls in sown.items()}

    fn = jax.jit(moments, static_argnums=static_argnums(batches))
    sums, counts = {}, {}
    try:
        for i, args in enumerate(batches):
            for path, (s, n) in _run(fn, variables, args, i, example_args).items():
                s = np.array(s, np.float64)  # a writable copy, summed in place: no new m x m array
                sums[path] = np.add(sums[path], s, out=sums[path]) if path in sums else s
                counts[path] = counts.get(path, 0.0) + float(n)
    except flax.errors.ScopeCollectionNotFound:
        # a model whose call fails with a mutable collection (``nn.map_variables(...,
        # init=True)`` re-initializes then): every layer's moments through the host instead
        sums, counts = {}, {}
    covs = {path: np.divide(sums[path], counts[path], out=sums[path]) for path in sums}
    if counts_out is not None:
        counts_out.update(counts)
    if wanted - set(covs):
        covs.update(_looped_moments(model, variables, batches, kwargs, wanted - set(covs),
                                    site_of, found, counts_out))
    missing = sorted(wanted - set(covs))
    if missing and strict:
        raise ValueError(f"calibration never ran layers {missing}")
    return covs


def _run(fn, variables, args, index: int, example_args):
    """``fn(variables, *args)`` on calibration batch ``index``, with a one-line error for a
    model that cannot run at this batch size (a parameter shaped by the batch)."""
    try:
        return fn(variables, *args)
    except flax.errors.ScopeParamShapeError as e:
        sizes = {np.shape(a)[0] for a in args if np.ndim(a)}
        example = {np.shape(a)[0] for a in example_args or () if np.ndim(a)}
        raise ValueError(
            f"the model does not run on calibration batch {index} (batch size "
            f"{', '.join(map(str, sorted(sizes)))}): {str(e).split(' (https')[0]} -- a "
            f"parameter shaped by the batch size; give calibration batches of the example "
            f"call's size ({', '.join(map(str, sorted(example)))}), e.g. a list of them") from None


def _looped_moments(model, variables, batches, kwargs, wanted, site_of, found,
                    counts_out: dict | None = None) -> dict:
    """The second pass (see the module docstring): every run's moments summed on the host, a
    stacked layer's by iteration (:class:`lrjax.moments.RunSums`: by its kernel variable, as
    its site in ``found`` names it, its iterations at the site's ``stack_axis``; else
    ``{path}/kernel``, iterations first); ``counts_out`` gets their input vectors."""
    flat = traverse_util.flatten_dict(flax.core.unfreeze(nn.meta.unbox(dict(variables))))
    keys = {p: ("params", *(found[p].kernel_key if p in found else
                            (*sites.variable_key(p), "kernel"))) for p in wanted}
    sums = RunSums({p: np.moveaxis(flat[k], found[p].stack_axis if p in found else 0, 0)
                    for p, k in keys.items() if k in flat})

    def moments(variables, *batch):
        def to_host(module, path, moments):
            key, ndim = RunSums.key(stored_kernel(module))
            jax.debug.callback(functools.partial(sums.add, path), *moments, key, ndim)

        args, keywords = split_keywords(batch, kwargs)
        with nn.intercept_methods(_wanted_calls(wanted, site_of, to_host)):
            model.apply(variables, *args, **keywords)

    fn = jax.jit(moments, static_argnums=static_argnums(batches))
    for args in batches:
        fn(variables, *args)
    jax.effects_barrier()
    covs = sums.covariances()
    if counts_out is not None:
        counts_out.update({p: n for p, n in sums.counts().items() if p in covs})
    return covs
