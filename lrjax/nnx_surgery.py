"""Compress Flax NNX models: :func:`decompose_nnx`.

The NNX counterpart of :func:`lrjax.decompose_linen`, with the same rank rules, calibration and
report: every linear layer :mod:`lrjax.sites` lists (``nnx.Conv``, ``nnx.ConvTranspose``,
``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``) is a candidate wherever it sits (attributes,
``nnx.List``, ``nnx.Sequential``), named by its graph path joined with ``/`` (``blocks/1/conv1``).
The result (a :class:`lrjax.report.Decomposition`) holds a copy of the model whose decomposed
layers are :class:`LowRankConvNNX` / :class:`LowRankLinearNNX` / :class:`LowRankEinsumNNX` pairs;
the original is left untouched.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import errors as flax_errors
from flax import nnx
from flax.nnx import bridge

from lrjax import (
    boxes,
    costs,
    lapack,
    macs,
    nnx_bridge,
    nnx_products,
    nnx_views,
    nnx_wrappers,
    nnx_written,
    own_code,
    ragged,
    rules,
    site_runs,
    sites,
)
from lrjax.conv_views import conv_view, nd_geometry, spatial_dims
from lrjax.layers import (
    conv_skip_reason,
    dense_skip_reason,
    dilated_conv_site,
    input_dilated,
    transposed_site,
)
from lrjax.linen_trace import check_model_kind, with_constants_evaluated
from lrjax.linen_wrappers import with_wrapper_flops
from lrjax.moments import (
    KeywordInputs,
    RunSums,
    calibrated_paths,
    split_keywords,
    static_argnums,
    uncalibrated_note,
    undersampled_note,
)
from lrjax.nnx_layers import (
    LowRankConvNNX,
    LowRankEinsumNNX,
    LowRankLinearNNX,
    base_view,
    delegating_base,
    hooked,
    pair_module,
    paired_in_place,
    placeholder_factors,
)
from lrjax.nnx_views import ScopedCall, ScopedLayer, eval_note, eval_view, graph_keywords, run_abstractly
from lrjax.problem import RankProblem, variable_leaves
from lrjax.report import Decomposition, build_report
from lrjax.sites import ConvSite, computes_as

__all__ = ["LowRankConvNNX", "LowRankLinearNNX", "LowRankEinsumNNX", "decompose_nnx", "with_pairs",
           "find_convs_nnx", "eval_view", "graph_keywords"]

_LINEAR = (nnx.Linear, nnx.LinearGeneral)
_SPLIT = (nnx.Conv, nnx.ConvTranspose, *_LINEAR, nnx.Einsum, ragged.RaggedDot)  # a pair replaces
_UNSPLIT: dict[type, str] = {}  # linear layers seen and left as they are, with the reason
# wrappers that re-parametrize the layer they run (``layer_instance``): it is left as it is
_WRAPPERS = (nnx.WeightNorm, nnx.SpectralNorm)
_FLAX_LAYERS = (*_SPLIT, *_WRAPPERS, bridge.ToNNX)  # matched by type; others may be written


def _splits(node) -> bool:
    """Whether ``node`` is a layer a pair replaces: of ``_SPLIT`` (a subclass too), or written."""
    return isinstance(node, _SPLIT) or _written(node)


_written = functools.partial(nnx_written.is_written, flax_layers=_FLAX_LAYERS)


def _canonical(model, products: dict):
    """A copy of ``model`` with the ``products`` of its modules' own code computed by layers
    (:func:`lrjax.nnx_products.canonical`)."""
    return nnx_products.canonical(nnx.clone(model), products, _FLAX_LAYERS)


def _input_axes(layer, equation) -> tuple[int, ...]:
    """The input axes a linear layer contracts (an einsum's from its equation)."""
    if isinstance(layer, nnx.Einsum) or nnx_written.batched_linear(layer):
        return sites.einsum_split(equation).input_axes
    return sites.contracted_axes(layer)


_path = sites.path_of


def _einsum_site(path: str, layer, shape, equation) -> ConvSite:
    """The site of an ``nnx.Einsum`` called with ``equation`` on an input of ``shape``."""
    reason = dense_skip_reason(layer, (nnx.Einsum,))
    if reason is None and layer.einsum_op is not jnp.einsum:
        reason = "a custom einsum_op: its own computation is kept"
    split = sites.einsum_split(equation or "")
    if reason is not None or isinstance(split, str):
        return ConvSite(path, None, skip=reason or split, equation=equation)
    kernel = tuple(layer.kernel[...].shape)  # a stack's (nnx.scan over nnx.vmap): its last axes
    return sites.einsum_site(path, shape, split, kernel[len(kernel) - len(split.kernel):],
                             layer.bias is not None, equation=equation)


def _site(path: str, layer, shape, equation=None) -> ConvSite:
    """The site of an NNX conv or linear layer first called on an input of ``shape``
    (``equation``: an einsum's)."""
    if type(layer) in _UNSPLIT:
        return ConvSite(path, None, skip=_UNSPLIT[type(layer)])
    if isinstance(layer, _WRAPPERS):
        return ConvSite(path, None, skip=sites.wrapped_reason(layer, "decompose_nnx" if
                                                              nnx_wrappers.foldable(layer) else None))
    if isinstance(layer, nnx.Einsum):
        return _einsum_site(path, layer, shape, equation)
    if equation is not None and nnx_written.batched_linear(layer):  # (as the einsum it computes)
        return _einsum_site(path, nnx_written.linear_as_einsum(layer, equation), shape, equation)
    if isinstance(layer, ragged.RaggedDot):
        return ragged.site(path, layer, shape)
    if isinstance(layer, nnx.ConvTranspose):
        return transposed_site(path, layer, shape, nnx.ConvTranspose)
    if isinstance(layer, _LINEAR):
        reason = dense_skip_reason(layer, _LINEAR)
        if reason is not None:
            return ConvSite(path, None, skip=reason)
        in_dims = tuple(int(shape[a]) for a in sites.contracted_axes(layer))
        out = layer.out_features
        out_dims = (int(out),) if isinstance(out, int) else tuple(int(d) for d in out)
        return ConvSite(path, sites.dense_shape(path, shape, in_dims, out_dims,
                                                bool(layer.use_bias)),
                        dense_dims=(in_dims, out_dims))
    reason = conv_skip_reason(layer, nnx.Conv)
    dims = spatial_dims(layer.kernel_size)
    if reason is not None and dims != 2:
        return ConvSite(path, None, skip=reason, conv_dims=dims)
    if reason is None and input_dilated(layer):
        return dilated_conv_site(path, layer, shape, nnx.Conv)
    view = conv_view(layer.kernel_size, layer.strides, _padding_key(layer.padding),
                           layer.kernel_dilation, shape)
    return ConvSite(path, costs.ConvShape(
        name=path, in_channels=int(shape[-1]), out_channels=int(layer.out_features),
        groups=int(layer.feature_group_count), use_bias=bool(layer.use_bias), **view),
        skip=reason, conv_dims=dims, nd_geometry=nd_geometry(
            layer.kernel_size, layer.strides, _padding_key(layer.padding), layer.kernel_dilation))


class _Moments(nnx.Variable):
    """A probe's input moments of the current batch: state, not a Python side effect, so that
    they leave the traces of transforms around the layer (``nnx.remat``, ``nnx.jit``)."""


class _Probe(nnx.Module):
    """Stands in for a layer while the model runs: records its input shape (and moments)."""

    def __init__(self, layer, path: str, record: dict):
        self.layer = layer
        self.path = path
        self._record = record
        self.moments = _Moments(None)
        # a dense layer written by hand contracts the last axis (known here, outside the traces)
        self.written = nnx_written.is_written(layer, _FLAX_LAYERS)

    def __getattr__(self, name):  # model code reading its layer's attributes: o_proj.kernel
        if name.startswith("_") or name == "layer":
            raise AttributeError(name)
        return getattr(self.layer, name)

    def __call__(self, x, *args, **kwargs):
        if nnx_products.tracing():  # observed when its module's call is replayed
            return self.layer(x, *args, **kwargs)
        if delegating_base(type(self.layer)) is None:  # else its base's call is observed
            self._observe(self.layer, x, args, kwargs)
        elif self.path not in self._record["shapes"]:  # (if it makes one: else its own code's)
            self._record["shapes"][self.path] = tuple(x.shape)
        return self.layer(x, *args, **kwargs)

    def _observe(self, layer, x, args, kwargs):
        record, moments = self._record, _moments
        if isinstance(layer, ragged.RaggedDot):  # seen as its rows in their groups' slots
            x, moments = ragged.Grouped(x, args[0], layer.used_shape[0]), ragged.grouped_moments
        inner = self.path in record["inner"] - record["seen"]  # its base's first call
        if self.path not in record["shapes"] or inner:
            if inner:
                record["seen"].add(self.path)
            record["shapes"][self.path] = tuple(x.shape)
            record["keywords"][self.path] = nnx_written.call_of(args, kwargs)
            record["equations"][self.path] = sites.called_equation(  # (a batched linear's too)
                layer.einsum_str, args, kwargs, x.ndim) if isinstance(layer, nnx.Einsum) else \
                nnx_written.batched_equation(layer, x)
        elif isinstance(layer, (nnx.Conv, nnx.ConvTranspose)):  # again: on another geometry?
            record.setdefault("again", {}).setdefault(self.path, {})[tuple(x.shape)] = None
        site, host = record["wanted"].get(self.path), record.get("host")
        if site is not None and host is None:  # a layer called again goes to the host pass
            record["calls"][self.path] = record["calls"].get(self.path, 0) + 1
        if site is not None and (host is not None or self.path not in record["batch"]):
            # in the geometry of one run (a stacked layer's: one slice)
            s, n = moments(x, site.restacked(1) if site.lifted else site,
                            nnx_written.input_axes(site) if self.written else
                            _input_axes(layer, site.equation))
            if host is not None:  # inside a loop: each run to the host
                kernel = nnx_written.kernel_of(layer)
                key, ndim = RunSums.key(None if kernel is None else kernel[...])
                jax.debug.callback(functools.partial(host.add, self.path), s, n, key, ndim)
            else:  # its first call per batch (in a loop of JAX's own, nnx.merge-d in its
                try:  # body: set at another trace level, refused; the host pass then takes it)
                    self.moments.set_value((s, n))
                    record["batch"][self.path] = True
                except flax_errors.TraceContextError:
                    pass


class _InnerProbe(_Probe):
    """A subclass's probe in its base's call (:func:`lrjax.nnx_layers.hooked`): the input the
    base's computation gets (padded, say), the layer's own code running around it."""

    def __init__(self, path: str, record: dict):
        super().__init__(None, path, record)
        record["inner"].add(path)

    def __call__(self, layer, base_call, x, *args, **kwargs):
        if not nnx_products.tracing():
            self._observe(layer, x, args, kwargs)
        return base_call(x, *args, **kwargs)


def _padding_key(padding):
    """A hashable form of a padding (sites are static arguments of the jitted moments)."""
    if isinstance(padding, (str, int)):
        return padding
    return tuple(p if isinstance(p, int) else tuple(p) for p in padding)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _moments(x, site, axes):
    return sites.input_moments(site, x, axes)


_CARRIED, _BROADCAST = "carry input and carry output", "but output was batched"  # JAX's errors


def _run_probed(model, batches, wanted: Sequence[ConvSite] = (), kwargs=None, eval_mode=True,
                products=None, recorded: dict | None = None):
    """Run a copy of ``model`` (an eval view of it with ``eval_mode``) with every conv and linear
    layer (subclasses included) behind a probe; the ``wanted`` sites' input moments summed.

    The probed model is traced, not run op by op: abstractly (``jax.eval_shape``) when no
    moments are wanted, else as one ``jax.jit`` program reused for every batch of the same
    shapes (eager execution compiled each op's own program: 15 s of a ConvNeXt-T's first
    calibrated decomposition at 64x64). A call that cannot be traced (Python control flow on
    values, arguments that are not arrays) runs eagerly instead. ``products``: the modules'
    own products run as layers; ``recorded``: filled with the products the run finds in the
    modules of the user's own (:func:`lrjax.nnx_products.recording`)."""
    check_model_kind(model, "nnx")
    record = {"shapes": {}, "equations": {}, "keywords": {}, "sums": {}, "counts": {},
              "batch": {}, "calls": {}, "wanted": {s.path: s for s in wanted}, "inner": set(),
              "seen": set()}
    convs = {}

    wrapped = {tuple(p) for p, n in nnx.iter_graph(model) if isinstance(n, _WRAPPERS)}

    def probe(path, node):
        if isinstance(node, _WRAPPERS) and isinstance(node.layer_instance, _SPLIT):
            name = _path((*path, "layer_instance"))  # the layer, run through its wrapper
            convs[name] = node
            return _Probe(node, name, record)
        if any(tuple(path[:len(w) + 1]) == (*w, "layer_instance") for w in wrapped):
            return node  # inside a wrapper, which reads its layer's variables by their paths
        if isinstance(node, bridge.ToNNX):  # a linen module's layers (lrjax.nnx_bridge)
            convs[_path(path)] = node
            return nnx_bridge.recording(node, _path(path), record)
        if isinstance(node, tuple(_UNSPLIT)) or _splits(node):
            name = _path(path)
            convs[name] = node
            base = delegating_base(type(node))
            if base is not None:  # observed in its base's call, if it makes one
                node.__class__ = hooked(type(node), base)
                node.lrjax_hook = _InnerProbe(name, record)
            return _Probe(node, name, record)
        return node

    probing = _canonical(model, products or {})
    watched = contextlib.nullcontext() if recorded is None else \
        nnx_products.Recording(probing, _FLAX_LAYERS)  # (before the probes: the user's paths)
    probed = nnx.recursive_map(probe, probing)
    if eval_mode:
        probed = eval_view(probed)
    kwargs, nodes = graph_keywords(kwargs)
    graphdef, state = nnx.split((probed, nodes))

    def run(state, *batch):
        record["batch"], record["calls"] = {}, {}
        module, copies = nnx.merge(graphdef, state)
        args, keywords = split_keywords(batch, kwargs)
        record["outputs"] = [jax.ShapeDtypeStruct(np.shape(o), np.float32) for o in
                             jax.tree.leaves(module(*args, **keywords, **copies))]
        return {p.path: p.moments.get_value() for _, p in nnx.iter_graph(module)
                if isinstance(p, _Probe) and p.path in record["batch"]
                and p.moments.get_value() is not None}  # None: set inside a loop, lost

    static = static_argnums(batches)  # model(x, False): the flag not traced
    traced = jax.jit(run, static_argnums=static) if wanted else \
        functools.partial(jax.eval_shape, run)
    with watched as seen:
        carried = False  # a layer whose module a scan carries (nnx.RNN's cell) or nnx.vmap
        for args in batches:  # shares (in_axes=None): its moments go to the host, as a loop's
            try:  # (they would change the carry's structure, or be batched on the shared module)
                if not all(isinstance(a, (jax.Array, np.ndarray, KeywordInputs))
                           for i, a in enumerate(args) if 1 + i not in static or not wanted):
                    raise TypeError("arguments that are not arrays")
                moments = with_constants_evaluated(traced, state, *args)  # .item() of constants
            except (TypeError, ValueError) as e:  # (JAX's ConcretizationTypeError: a TypeError)
                carried = _CARRIED in str(e) or _BROADCAST in str(e)
                if carried:
                    break
                if isinstance(e, ValueError):
                    raise
                moments = run(state, *args)
            for path, (sums, count) in (moments if wanted else {}).items():
                sums, count = np.array(sums, np.float64), np.asarray(count, np.float64)  # writable
                if count.ndim:  # a probe stacked by nnx.vmap / nnx.scan: one per iteration
                    sums = sums.reshape(-1, *sums.shape[-2:])
                    count = np.repeat(count, sums.shape[0] // count.size)[:, None, None]
                held = record["sums"].get(path)  # summed in place: no new m x m array a batch
                record["sums"][path] = sums if held is None else np.add(held, sums, out=held)
                record["counts"][path] = record["counts"].get(path, 0.0) + count
    if recorded is not None:
        recorded.update(seen.products)
    # set inside a loop (lost), or called more than once: a second pass, each run's moments
    # to the host (lrjax.moments.RunSums)
    looped = set(record["wanted"]) if carried else {
        p for p in record["wanted"] if p not in record["sums"] or record["calls"][p] > 1}
    if looped:
        kernels = {p: nnx_written.kernel_of(convs[p]) for p in looped}
        record["host"] = RunSums({p: k[...] for p, k in kernels.items() if k is not None})
        record["wanted"] = {p: record["wanted"][p] for p in looped}
        hosted = jax.jit(lambda st, *a: run(st, *a))
        for args in batches:
            hosted(state, *args)
        jax.effects_barrier()
        for path in looped:
            record["sums"].pop(path, None)
        for path, (sums, count) in record.pop("host").totals().items():
            record["sums"][path], record["counts"][path] = sums, count
    return convs, record


def find_convs_nnx(model, *example_args, eval_mode: bool = True, **example_kwargs) -> list[ConvSite]:
    """Every conv and linear layer (``nnx.Conv``, ``nnx.ConvTranspose``, ``nnx.Linear``,
    ``nnx.LinearGeneral``, ``nnx.Einsum``) the model calls on the example inputs, in
    call order; run on an eval view of a copy with ``eval_mode``."""
    recorded: dict = {}
    convs, record = _run_probed(model, [tuple(example_args)], kwargs=example_kwargs,
                                eval_mode=eval_mode, recorded=recorded)
    batch = site_runs.example_batch(example_args, record.get("outputs"))
    found = _sites(convs, record, batch)
    # the products of modules of the user's own (lrjax.nnx_products), but of the one-kernel
    # layers split whole: then run as layers in a second pass
    whole = {p for p, s in found.items() if s is not None and s.candidate and _written(convs[p])}
    products = nnx_products.checked(
        model, functools.partial(run_abstractly, example_args=example_args,
                                 example_kwargs=example_kwargs, eval_mode=eval_mode),
        {p: v for p, v in recorded.items() if p not in whole}, _FLAX_LAYERS)
    if products:
        convs, record = _run_probed(model, [tuple(example_args)], kwargs=example_kwargs,
                                    eval_mode=eval_mode, products=products)
        found = _sites(convs, record, batch)
    found = nnx_products.with_specs([s for s in found.values() if s is not None], products)
    split = {s.path: s for s in found if s.path in record["seen"] and s.candidate}
    kept = _reading_their_kernels(model, split, example_args, example_kwargs, eval_mode)
    found = [ConvSite(s.path, None, skip=f"{type(convs[s.path]).__name__} (a subclass that runs "
                      "its base's __call__ but also reads its kernel: its own computation is "
                      "kept)") if s.path in kept else s for s in found]
    return [site_runs.per_example(sites.unless_stacked(site, _kernel_shape(convs[site.path]),
                                                       any_axis=False), batch) for site in found
            ] + [s for p, calls in record.get("islands", {}).items()
                 for s in nnx_bridge.island_sites(p, convs[p], calls, batch)]


def _kernel_shape(layer) -> tuple | None:
    """A layer's kernel shape as its product uses it (a ragged product's through its steps)."""
    if isinstance(layer, ragged.RaggedDot):
        return layer.used_shape
    return getattr(nnx_written.kernel_of(layer), "shape", None)


def _sites(convs: dict, record: dict, batch: int) -> dict:
    """``{path: site}`` of the layers a probed run found (``None``: a written module that is
    no layer, not listed)."""
    def site_of(path, layer, shape):
        if _written(layer):
            return nnx_written.linear_site(path, layer, shape, record["keywords"].get(path), batch)
        if path in record["seen"]:  # a subclass, split in its base's call: as its base
            layer = base_view(layer, delegating_base(type(layer)))
        return sites.with_param_casts(_site(path, layer, shape, record["equations"].get(path)), layer)

    found = {p: site_of(p, convs[p], shape) for p, shape in record["shapes"].items()}
    for p, shapes in record.get("again", {}).items():  # (site_runs.another_call)
        for shape in shapes if found.get(p) is not None else ():
            found[p] = site_runs.another_call(found[p], site_of(p, convs[p], shape))
    return found


def _reading_their_kernels(model, split, example_args, example_kwargs, eval_mode) -> set[str]:
    """The paths of subclasses split in their base's call (``split``: their sites) whose own
    code reads the layer's kernel too: the model with them split fails to trace (each tried
    alone where all together fail)."""
    def fails(paths) -> bool:
        trial = with_pairs(model, split, {p: placeholder_factors(split[p], split[p].shape.groups)
                                          for p in paths})
        try:
            run_abstractly(trial, example_args, example_kwargs, eval_mode)
        except Exception:  # noqa: BLE001 - its own code needs what the pair no longer holds
            return True
        return False

    if not split or not fails(list(split)):
        return set()
    return {p for p in split if len(split) == 1 or fails([p])}


def _build(model, problem: RankProblem, ranks) -> tuple[nnx.Module, dict]:
    chosen = {p: r for p, r in ranks.items() if r is not None}
    problem.prepare_factors(chosen)  # the layers not decomposed yet, in parallel on CPU
    factors = {p: problem.factors(p, r) for p, r in chosen.items()}
    return with_pairs(model, {p: problem.site(p) for p in factors}, factors), factors


def with_pairs(model, found: dict[str, ConvSite], factors: dict) -> nnx.Module:
    """A copy of ``model`` with each layer named in ``factors`` (``{path: Factors}``) replaced
    by its pair (:func:`lrjax.nnx_layers.pair_module`; ``found``: its site)."""
    replaced = set()

    def replace(path, node):
        name = _path(path)
        written = name in factors and nnx_written.is_written(node, _FLAX_LAYERS)
        own = written or computes_as(node, _SPLIT) is not None
        base = None if own else delegating_base(type(node))
        if name in factors and (own or base is not None):
            replaced.add(name)
            layer = nnx_written.as_layer(node, found[name]) if written or \
                nnx_written.batched_linear(node) else node  # (a batched linear: its einsum)
            pair = pair_module(layer, found[name], factors[name])
            boxes.shard_pair_like(layer, pair, found[name])
            if written:
                nnx_written.keep_attributes(node, pair)
            return pair if base is None else paired_in_place(node, pair, base)
        return node

    bridged = nnx_bridge.wrappers(model)
    inside = {p: f for p, f in factors.items() if nnx_bridge.island_of(p, bridged)}
    factors = {p: f for p, f in factors.items() if p not in inside}
    products = nnx_products.from_sites([found[p] for p in factors])
    new_model = nnx.recursive_map(replace, _canonical(model, products))
    nnx_bridge.with_islands(new_model, found, inside)
    if replaced != set(factors):
        raise ValueError(f"layers {sorted(set(factors) - replaced)} were decomposed but not "
                         "found in the model's graph")
    return new_model


def _net_cost(model, example_args, example_kwargs, eval_mode, found: Sequence[ConvSite],
              work) -> tuple[int | None, int, int, list[ConvSite], tuple]:
    """Multiply-adds, element-wise flops and multiply-adds of products with constants per example
    of the whole forward pass (traced on a copy, :func:`lrjax.macs.traced_macs`), or ``(None, 0,
    0)`` where the call cannot be traced abstractly (a training-mode call updating its own state);
    the sites ``found`` costed for every run of their layers (:func:`lrjax.site_runs.counted_as_run`;
    as they are where not traced; ``work``: folded wrappers' flops per call); its notes:
    :func:`lrjax.site_runs.loop_note`, and, in ``eval_mode``, :func:`lrjax.nnx_views.drawn_note`."""
    index = site_runs.layer_indices(found)
    wrapped = set()  # the paths of the layers stood in for by a ScopedLayer (variables: .layer)

    def scoped(path, node):
        if isinstance(node, bridge.ToNNX):  # its linen layers' work marked as theirs
            return nnx_bridge.scoping(node, index, _path(path))
        i = index.get(_path(path))
        base = delegating_base(type(node))
        if i is not None and base is not None:  # its base's call is the layer's work
            node.__class__ = hooked(type(node), base)
            node.lrjax_hook = ScopedCall(i)
            return node
        if i is not None and _splits(node):
            wrapped.add(tuple(str(p) for p in path))
            return ScopedLayer(node, i)
        return node

    view = nnx.recursive_map(scoped, _canonical(model, nnx_products.from_sites(found)))
    example_kwargs, nodes = graph_keywords(example_kwargs)
    graphdef, state = nnx.split((eval_view(view) if eval_mode else view, nodes))

    drawn: list = []  # (the streams the eval view still samples from: nnx_views.drawing)
    try:  # the state as an argument: the weights are not constants of the lowered module
        counts = with_constants_evaluated(macs.traced_macs, nnx_views.drawing(
            graphdef, example_kwargs, drawn), state, *example_args)
    except Exception:  # noqa: BLE001 - then only the 2-D convs are counted, as before
        return None, 0, 0, list(found), ()
    batch = site_runs.example_batch(example_args, counts["outputs"])
    names = [n[1:] if n[:1] == ("0",) else ("<keywords>", *n[1:])
             for n in own_code.variable_names(state, collections=False)]
    names = [next((n[:k] + n[k + 1:] for k in range(len(n)) if n[:k] in wrapped and
                   n[k] == "layer"), n) for n in names]  # (as the layers' own: their kernel keys)
    found = own_code.with_own_code(site_runs.costed_as_run(found, counts, batch), counts["weighted"],
                                   names, counts["total"])
    return (counts["total"] // batch, (counts["elementwise"] + sum(work.values())) / batch,
            counts["constant"] // batch, with_wrapper_flops(found, work, batch),
            (site_runs.loop_note(counts, batch),
             nnx_views.drawn_note(eval_mode and counts["sampled"] and drawn)))


@lapack.small_pages()
def decompose_nnx(model: nnx.Module, *example_args, rule, calibration=None,
                  multiple: int | None = None, measure_batch: int = 1, eval_mode: bool = True,
                  problem=None, **example_kwargs) -> Decomposition:
    """Compress a Flax NNX model: its convs and linear layers become pairs of smaller ones.

    Args:
      model: an ``nnx.Module`` (not modified).
      *example_args, **example_kwargs: an example call ``model(*example_args,
        **example_kwargs)`` (run once, on a copy, to find the convs and their input shapes).
      rule: the rank rule (:data:`lrjax.rules.RULE_HELP`), keyed by graph path; for
        :class:`lrjax.ranks.EvalGuided`, ``eval_fn(model) -> float``.
      calibration: optional batch (or iterable of batches) of inputs: calibration-aware factors
        (see :func:`lrjax.decompose.vh_decompose`).
      multiple: round ranks to multiples of this; or the rule's ``multiple=`` option.
      measure_batch: batch of ``+measured`` timings.
      eval_mode: find the layers and calibrate on an eval view of the model (batch norm on its
        running statistics, dropout off; NNX models are built in training mode, where
        calibration statistics would be the batch's and dropout would corrupt them); the report
        says so. ``False``: run the model as it is.
      problem: the ``.problem`` of an earlier result for this model (same weights): its
        calibration and every layer's SVD are reused (:meth:`lrjax.problem.RankProblem.reusing`);
        ``calibration`` must then be ``None``.

    Returns:
      A :class:`lrjax.report.Decomposition`: ``.module`` is a copy of ``model`` with the chosen
      layers replaced by :class:`LowRankConvNNX` / :class:`LowRankLinearNNX` /
      :class:`LowRankEinsumNNX` pairs, ``.variables`` is ``None`` (the model carries its
      state), ``.report`` the per-layer report.

    Raises:
      ValueError: a bad rule (unknown layer, rank out of range), or bad calibration data.
    """
    rule = rules.parse_rule(rule, multiple=multiple)
    model, wrappers, work = nnx_wrappers.folded(model)  # nnx.WeightNorm / nnx.SpectralNorm
    found = find_convs_nnx(model, *example_args, eval_mode=eval_mode, **example_kwargs)
    candidates = [s for s in found if s.candidate]
    products = nnx_products.from_sites(candidates)
    graph = dict((_path(p), n) for p, n in nnx.iter_graph(_canonical(model, products))
                 if _splits(n))
    bridged = nnx_bridge.wrappers(model)
    inside = {s.path: nnx_bridge.island_of(s.path, bridged) for s in candidates}
    kernels = {s.path: s.to_hwio(nnx_written.used_kernel(graph[s.path], s)) for s in candidates
               if inside[s.path] is None} | nnx_bridge.island_kernels(bridged, candidates)
    covs, note, few = None, None, None
    net_macs, net_elementwise, net_constant, found, looped = _net_cost(
        model, example_args, example_kwargs, eval_mode, found, work)
    # costed first: a layer in a conditional branch is never split (its statistics break nnx.cond)
    if calibration is not None and problem is None:
        batches = rules.calibration_batches(calibration, example_args, example_kwargs)
        costed = {s.path for s in found if s.candidate}
        paths, note = calibrated_paths([s for s in candidates if s.path in costed])
        _, record = _run_probed(model, batches, [s for s in candidates if s.path in paths and
                                                 inside[s.path] is None],
                                example_kwargs, eval_mode, products)
        covs = {p: np.divide(s, record["counts"][p], out=s) for p, s in record["sums"].items()}
        covs |= nnx_bridge.island_moments(model, batches, example_kwargs, eval_mode, [
            s for s in candidates if s.path in paths and inside[s.path]], record["counts"])
        note = uncalibrated_note(note, paths, covs)
        few = undersampled_note(record["counts"], candidates)
    problem = RankProblem(found, kernels, covs, rule.multiple, net_macs=net_macs,
                          net_elementwise=net_elementwise, net_constant=net_constant,
                          notes=tuple(filter(None, (note, few, *looped))),
                          source=variable_leaves(nnx.state(model, nnx.Not(nnx.RngState)))
                          ).reusing(problem, calibration)
    if rule.eval_fn is not None:
        problem.score = lambda ranks: float(rule.eval_fn(_build(model, problem, ranks)[0]))
    kept_full = {}
    ranks = rules.select_ranks(rule, problem, measure_batch=measure_batch, kept_full=kept_full)
    new_model, factors = _build(model, problem, ranks)
    new_model, folded = nnx_wrappers.restored(new_model, wrappers, factors)
    notes = [eval_note(model)] if eval_mode else []
    report = build_report(problem, ranks, factors, kept_full, notes + nnx_wrappers.notes(wrappers, folded))
    return Decomposition(new_model, None, report, problem)
