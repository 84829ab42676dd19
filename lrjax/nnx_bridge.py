"""Linen modules an NNX model runs through ``nnx.bridge.ToNNX`` ("islands"), decomposed as part
of the NNX model (:func:`lrjax.decompose_nnx`).

An NNX model may hold a linen module wrapped by Flax's bridge: ``nnx.bridge.ToNNX(LinenBlock(),
rngs=rngs)``, its variables NNX attributes of the wrapper named by their linen paths
(``block/Conv_0/kernel``), its call ``module.apply(variables, ...)`` (or another method of it:
``self.vae.encode(x)``). The linen surgery (:mod:`lrjax.surgery`) finds, costs and calibrates
such a module's layers on the inputs the wrapper is given in the model's example call and
calibration batches; they join the NNX model's rank problem under ``{wrapper path}/{linen
path}`` (``block/Conv_0``), so that one whole-net rule ranks every layer of the net. A
decomposed wrapper runs a :class:`lrjax.layers.LowRankModel` of its module on variables with
the pairs' in the kernels' places (``block/Conv_0/vertical/kernel``, ...), as the linen surgery
lays them out.

A wrapper may be called more than once, by several of its module's methods (a VAE's ``encode``
and ``decode``): each layer is costed over the calls that run it and calibrated on their inputs.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import numpy as np
from flax import nnx, traverse_util
from flax.nnx import bridge
from flax.nnx.bridge import variables as bridge_variables

from lrjax import linen_cells, nnx_products, site_runs, surgery
from lrjax.layers import LowRankModel
from lrjax.linen_kernels import SiteKernels, with_parametrization_flops
from lrjax.linen_trace import with_constants_evaluated
from lrjax.moments import split_keywords, static_argnums
from lrjax.nnx_views import eval_view, graph_keywords
from lrjax.sites import ConvSite, path_of, variable_key

__all__ = ["wrappers", "recording", "scoping", "island_sites", "island_of", "linen_variables",
           "island_kernels", "island_moments", "with_islands"]


def wrappers(model) -> dict:
    """``{graph path: wrapper}`` of the ``nnx.bridge.ToNNX`` wrappers in ``model``'s graph."""
    return {path_of(p): n for p, n in nnx.iter_graph(model) if isinstance(n, bridge.ToNNX)}


def _attributes(node) -> dict:
    """A wrapper's variables as its attributes hold them (its linen paths' first keys)."""
    return {k: v for k, v in vars(node).items()
            if not k.startswith("to_nnx__") and not k.startswith("_pytree__")}


def linen_variables(node) -> dict:
    """The linen variables ``{collection: tree}`` a ``ToNNX`` wrapper applies its module with."""
    return bridge_variables.nnx_attrs_to_linen_vars(_attributes(node))


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype)
                        if isinstance(a, (jax.Array, np.ndarray)) else a, tree)


def recording(node, path: str, record: dict):
    """``node`` (a ``ToNNX`` of a copy) with its class swapped for one recording each call's
    positional arguments, keywords (its ``method`` among them) and outputs, abstract, in
    ``record["islands"][path]`` (nothing while a module's own products are replayed)."""
    base = type(node)

    def __call__(self, *args, rngs=None, method=None, mutable=None, **kwargs):
        out = base.__call__(self, *args, rngs=rngs, method=method, mutable=mutable, **kwargs)
        if not nnx_products.tracing():
            keywords = dict(kwargs, **({} if method is None else {"method": method}))
            record.setdefault("islands", {}).setdefault(path, []).append(
                (_abstract(args), _abstract(keywords), _abstract(out)))
        return out

    node.__class__ = type(f"Recorded{base.__name__}", (base,), {"__call__": __call__})
    return node


def scoping(node, index: dict, path: str):
    """``node`` (a ``ToNNX`` of a copy) with its class swapped for one running its linen module
    with each of its layers' work marked as that layer's (:func:`lrjax.macs.layer_scope`, by
    ``index`` of ``{path}/{linen path}``), for the whole net's traced count."""
    base, intercept = type(node), surgery.layer_scopes(index, prefix=path)

    def __call__(self, *args, **kwargs):
        with linen_cells.as_sublayers(), nn.intercept_methods(intercept):  # (as linen's cost)
            return base.__call__(self, *args, **kwargs)

    node.__class__ = type(f"Scoped{base.__name__}", (base,), {"__call__": __call__})
    return node


def island_sites(path: str, node, calls: list, batch: int) -> list[ConvSite]:
    """The sites of the layers of the linen module ``node`` (a ``ToNNX``) runs, named
    ``{path}/{linen path}``, costed per example of the model's ``batch``, from the ``calls``
    :func:`recording` recorded in the example run (a wrapper called more than once, by one
    method or several: each layer's site from the calls that run it, its geometries summed over
    them, :func:`lrjax.site_runs.another_call`)."""
    module = node.to_nnx__module
    flat = traverse_util.flatten_dict(dict(linen_variables(node)))
    merged: dict[str, ConvSite] = {}
    for args, keywords, outputs in calls:
        own_batch = site_runs.example_batch(args, jax.tree.leaves(outputs))
        for site in with_parametrization_flops(surgery.find_convs(module, *args, **keywords),
                                               flat, own_batch):
            site = _stacked(site, flat).renamed(_joined(path, site.path), own_batch / batch)
            held = merged.get(site.path)
            merged[site.path] = site if held is None else site_runs.another_call(held, site)
    return list(merged.values())


def _stacked(site: ConvSite, flat: dict) -> ConvSite:
    """``site`` left as it is where its wrapper is one of a stack (``ToNNX`` made under
    ``nnx.vmap``, run by ``nnx.scan``): its stored kernel has the stack's axis, which a linen
    call of one of the wrappers does not."""
    stored = flat.get(("params", *site.kernel_key))
    if not site.candidate or stored is None or np.ndim(stored) <= len(site.kernel_variable_shape):
        return site
    return dataclasses.replace(site, skip=(
        f"its ToNNX wrapper is one of a stack (nnx.vmap / nnx.scan): its kernel has shape "
        f"{tuple(np.shape(stored))}, the layer's {site.kernel_variable_shape} per wrapper; "
        "stacked wrappers are not split"))


def _joined(path: str, local: str) -> str:
    """A layer's name in the NNX model: its linen ``local`` path under wrapper ``path``."""
    return path_of((*variable_key(path), *variable_key(local)))


def _local(path: str, name: str) -> str:
    """A layer's linen path in its wrapper's module (``""``: the module itself)."""
    return name[len(path) + 1:]


def island_of(path: str, islands) -> str | None:
    """The path among ``islands`` (wrappers' paths) of the wrapper a site ``path`` is under."""
    return next((p for p in islands if path == p or path.startswith(p + "/")), None)


def _flat_under(node, path: str) -> dict:
    """A wrapper's linen variables, flat, their keys under the wrapper's path (as a prefixed
    site's ``kernel_key`` reads them)."""
    key = variable_key(path)
    return {(k[0], *key, *k[1:]): v for k, v in
            traverse_util.flatten_dict(dict(linen_variables(node))).items()}


def island_kernels(bridged: dict, candidates: list[ConvSite]) -> dict:
    """``{site path: HWIO kernel}`` of the ``candidates`` under the wrappers ``bridged``
    (``{path: ToNNX}``)."""
    out = {}
    for path, node in bridged.items():
        mine = [s for s in candidates if island_of(s.path, [path]) == path]
        out.update(SiteKernels(_flat_under(node, path), mine))
    return out


def _island_inputs(model, batches, kwargs, eval_mode: bool, paths) -> dict:
    """``{wrapper path: [([(positional arguments, keyword arrays) per batch], other keywords)
    per call]}``: what each wrapper in ``paths`` was given in the model's calls on ``batches``
    (one jitted pass each). Arguments holding no array (a ``train=False`` flag) are as the call
    gave them; a wrapper given an argument mixing arrays and other values, or called a
    different number of times in another batch, gets none. A call inside a loop body of the
    model's code (a ``while_loop``: openpi's pi0 samples actions so) is one more call, its
    inputs those of every run of the body (copied to the host as the body runs)."""
    copy, held, fixed = nnx.clone(model), {}, {}
    top, looped, ran, seen = [None], {}, {}, {}  # (the model call's trace; a loop call's
    # structure and runs, by wrapper and order in the trace; loop calls seen in this trace)

    def kind(tree) -> bool | None:  # all arrays (traced), none (as given: [None, None] too),
        leaves = [isinstance(a, jax.Array) for a in jax.tree.leaves(tree)]  # or a mix
        return bool(leaves) and all(leaves) if all(leaves) or not any(leaves) else None

    def in_loop(path: str, args, kwargs) -> None:  # a call in a loop body: its runs' inputs
        inner = [v for v in jax.tree.leaves((args, kwargs)) if getattr(v, "_trace", top[0])
                 is not top[0]]  # (a vmap's or a gradient's values: not taken)
        if not inner or any(type(v._trace) is not type(top[0]) for v in inner) or \
                None in map(kind, (*args, *kwargs.values())):
            return
        key = (path, seen.get(path, 0))
        seen[path] = key[1] + 1
        looped[key] = ([None if kind(v) else v for v in args],
                       {k: v for k, v in kwargs.items() if not kind(v)})
        jax.debug.callback(functools.partial(_kept, ran.setdefault(key, [])),
                           ([v for v in args if kind(v)], {k: v for k, v in kwargs.items()
                                                           if kind(v)}))

    for path, node in wrappers(copy).items():
        if path in paths:
            _capturing(node, path, held, in_loop)
    kwargs, nodes = graph_keywords(kwargs)
    graphdef, state = nnx.split((eval_view(copy) if eval_mode else copy, nodes))

    def run(state, *batch):
        held.clear()
        seen.clear()
        top[0] = getattr(jax.tree.leaves(state)[0], "_trace", None)
        module, copies = nnx.merge(graphdef, state)
        args, given = split_keywords(batch, kwargs)
        module(*args, **given, **copies)
        for p in held:  # (a call's values in a loop body are that body's: taken by in_loop)
            held[p] = [call for call in held[p] if all(
                getattr(v, "_trace", top[0]) is top[0] for v in jax.tree.leaves(call))]
        fixed.update({p: [([None if kind(v) else v for v in a],
                           {k: v for k, v in kw.items() if not kind(v)}) for a, kw in calls]
                      for p, calls in held.items()})
        return {p: [([v for v in a if kind(v)], {k: v for k, v in kw.items() if kind(v)})
                    for a, kw in calls] for p, calls in held.items()
                if all(None not in map(kind, (*a, *kw.values())) for a, kw in calls)}

    def whole(given: list, traced) -> tuple:  # the call's arguments, in order
        it = iter(traced[0])
        return tuple(next(it) if v is None else v for v in given), traced[1]

    traced = jax.jit(run, static_argnums=static_argnums(batches))
    out: dict = {}
    for batch in batches:
        for p, calls in with_constants_evaluated(traced, state, *batch).items():
            out.setdefault(p, []).append(calls)
    jax.effects_barrier()  # (the loop bodies' copies to the host)
    inputs = {p: [([whole(fixed[p][i][0], b[i]) for b in got], fixed[p][i][1])
                  for i in range(len(got[0]))] for p, got in out.items()
              if len(got) == len(batches) and len({len(b) for b in got}) == 1}
    for key, (given, keywords) in looped.items():
        if ran.get(key):
            inputs.setdefault(key[0], []).append(([whole(given, r) for r in ran[key]], keywords))
    return inputs


def _kept(store: list, arrays) -> None:
    """A host callback: ``arrays`` (a loop body's values of one run) kept in ``store``."""
    store.append(jax.tree.map(np.asarray, arrays))


def _capturing(node, path: str, held: dict, in_loop) -> None:
    """``node``'s class swapped for one keeping each call's positional arguments and keywords
    in ``held[path]`` (and telling ``in_loop(path, args, kwargs)`` of each)."""
    base = type(node)

    def __call__(self, *args, **kwargs):
        held.setdefault(path, []).append((args, kwargs))
        in_loop(path, args, kwargs)
        return base.__call__(self, *args, **kwargs)

    node.__class__ = type(f"Captured{base.__name__}", (base,), {"__call__": __call__})


def island_moments(model, batches, kwargs, eval_mode: bool, wanted: list[ConvSite],
                   counts: dict) -> dict:
    """Calibration moments (:func:`lrjax.surgery.calibration_moments`) of the ``wanted`` sites
    under wrappers of ``model``, from the inputs each wrapper gets in the model's calls on the
    calibration ``batches`` (a layer run by several of a wrapper's calls: over all of them,
    weighted by their sample counts); ``counts`` gets their sample counts. A wrapper whose
    inputs could not be taken (an argument mixing arrays and other values) gets none
    (data-free, noted)."""
    bridged = wrappers(model)
    mine = {p: [s for s in wanted if island_of(s.path, [p]) == p] for p in bridged}
    inputs = _island_inputs(model, batches, kwargs, eval_mode, [p for p, s in mine.items() if s])
    sums: dict = {}
    for path, calls in inputs.items():
        node = bridged[path]
        for given, keywords in calls:  # (keyword arrays as calibration_batches takes them)
            example = {**keywords, **given[0][1]}
            reached = {s.path for s in surgery.find_convs(node.to_nnx__module, *given[0][0],
                                                          **example)}
            local = {_local(path, s.path): s.renamed(_local(path, s.path)) for s in mine[path]
                     if _local(path, s.path) in reached}
            seen: dict = {}
            got = surgery.calibration_moments(
                node.to_nnx__module, linen_variables(node),
                [(*a, kw) if kw else tuple(a) for a, kw in given], local, example,
                tuple(given[0][0]), strict=False, counts_out=seen)
            for p, cov in got.items():
                total, n = sums.get(_joined(path, p), (0.0, 0.0))
                sums[_joined(path, p)] = (total + cov * seen.get(p, 1.0), n + seen.get(p, 1.0))
    counts.update({p: n for p, (_, n) in sums.items()})
    return {p: total / n for p, (total, n) in sums.items()}


class _Given:
    """The factors of sites given (what :func:`lrjax.surgery.apply_factors` reads of a
    problem)."""

    def __init__(self, found: dict, factors: dict):
        self.found, self.given = found, factors

    def site(self, path):
        return self.found[path]

    def factors(self, path, rank):
        return self.given[path]

    def prepare_factors(self, chosen):
        pass


def with_islands(model, found: dict[str, ConvSite], factors: dict) -> None:
    """Each wrapper of ``model`` (changed in place: a copy) holding layers in ``factors``
    (``{site path: Factors}``; ``found``: their sites) set to run its module's
    :class:`LowRankModel` with those pairs, its variables the pairs' in their kernels' places."""
    for path, node in wrappers(model).items():
        mine = {p: f for p, f in factors.items() if island_of(p, [path]) == path}
        if not mine:
            continue
        ranks = {p: int(np.shape(f.vertical)[-1]) for p, f in mine.items()}
        flat, _ = surgery.apply_factors(_flat_under(node, path), _Given(found, mine), ranks)
        depth = len(variable_key(path))
        variables = traverse_util.unflatten_dict({(k[0], *k[1 + depth:]): v
                                                  for k, v in flat.items()})
        for name in _attributes(node):
            delattr(node, name)
        for name, value in bridge_variables.linen_vars_to_nnx_attrs(variables).items():
            setattr(node, name, nnx.data(value))
        node.to_nnx__module = LowRankModel.wrap(node.to_nnx__module, {
            _local(path, p): ranks[p] // found[p].stack for p in mine}, partial=True)
        node.__class__ = _decomposed(type(node))


@functools.cache
def _decomposed(cls: type) -> type:
    """``cls`` (a ``ToNNX``) whose module's other methods (``wrapper.encode(x)``) are found on
    the module the :class:`LowRankModel` wraps and run decomposed, by name (``ToNNX`` looks
    them up on its module's class)."""
    def __getattr__(self, name):
        module = vars(self).get("to_nnx__module")
        if not name.startswith("_") and isinstance(module, LowRankModel) and callable(
                getattr(type(module.base), name, None)):
            return functools.partial(self.__call__, method=name)
        return cls.__getattr__(self, name)

    return type(f"Decomposed{cls.__name__}", (cls,), {"__getattr__": __getattr__})
