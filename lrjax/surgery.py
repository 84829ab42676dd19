"""Model surgery for any Flax linen model: find its convs, decompose them, run the low-rank model.

One mechanism serves a user's model and lrjax's zoo alike, with no change to the model's code;
layers are named by their full module path joined with ``/`` everywhere (rank maps, reports,
JSON rank files, the command line):

* :func:`find_convs` traces the model once with ``jax.eval_shape`` under a method interceptor
  that records every linear layer's call: its full module path (``ResNetBlock_3/Conv_1``),
  input shape and hyper-parameters, and why it cannot be split if it cannot.
* :class:`lrjax.layers.LowRankModel` wraps the model: while it runs, an interceptor replaces
  each conv named in its rank map by a vertical/horizontal pair created *inside the conv's own
  scope* (:func:`lrjax.layers.pair_forward`), so the factors live under the conv's path
  (``conv1_1/vertical/kernel``, ``conv1_1/horizontal/{kernel,bias}``) and every other variable
  keeps its place.
* :func:`decompose_linen` turns the model's trained variables into the low-rank model's: the
  rank rule is resolved (:func:`lrjax.rules.select_ranks`), each chosen layer gets the
  closed-form factors (data-free or calibrated), checked against the wrapped model's variables.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lrjax import (
    boxes,
    lapack,
    linen_calls,
    linen_cells,
    linen_moments,
    linen_placeholders,
    linen_products,
    linen_wrappers,
    macs,
    own_code,
    rules,
    sites,
)
from lrjax import ranks as rank_lib
from lrjax.batchnorm import fold_batch_norms
from lrjax.layers import (
    FactorConv,
    FactorConvTranspose,
    FactorDense,
    FactorEinsum,
    LowRankConv,
    LowRankModel,
    as_base,
    delegated_base,
    delegates,
    module_path,
    split_type,
)
from lrjax.linen_bridge import string_keys
from lrjax.linen_kernels import SiteKernels, site_parameters, with_parametrization_flops
from lrjax.linen_trace import (
    TRAINING_FLAGS,
    abstract_init,
    as_jax_types,
    constants_evaluated,
    knowing_variables,
    known_variables,
    layer_input,
    raising_modules,
    split_static,
    split_static_call,
    unjitted,
)
from lrjax.linen_unbound import applied_at
from lrjax.moments import calibrated_paths, uncalibrated_note, undersampled_note
from lrjax.problem import RankProblem, variable_leaves
from lrjax.report import Decomposition, build_report
from lrjax.site_runs import another_call, costed_as_run, example_batch, layer_indices, loop_note, per_example
from lrjax.sites import ConvSite, variable_key
from lrjax.splittable import conv_shape, linen_site

__all__ = ["find_convs", "check_variables", "check_inference_call", "decompose_linen",
           "calibration_moments", "rank_problem", "linen_scorer", "search", "fold_batch_norms"]


# ---------------------------------------------------------------------------------------------
# Finding the convs of a model


def used_parameters(layer: nn.Module, params: Mapping[str, Any]) -> dict:
    """``{"kernel": ..., "bias": ...}`` as a linen layer's own ``param`` returns them for its
    stored ``params``: the weights its computation uses, for a subclass that redefines
    ``param`` (BiT's weight-standardized ``StdConv``). Read inside the layer's ``__call__``
    (intercepted; the layer itself does not run)."""
    stored = {"kernel": linen_products.kernel_name(layer), "bias": "bias"}  # (a written one's)

    def read(next_fun, args, kwargs, context):
        if context.method_name != "__call__":  # the subclass's own param, wrapped by Flax
            return next_fun(*args, **kwargs)
        return {name: context.module.param(name, lambda *_, v=params[key]: v,
                                           np.shape(params[key]), params[key].dtype)
                for name, key in stored.items() if key in params and
                (name == "kernel" or getattr(layer, "use_bias", True))}

    with nn.intercept_methods(read):
        return layer.apply({"params": dict(params)}, jnp.zeros((1,)))


def _site(path: str, module, x, equation=None) -> ConvSite:
    """The site of a conv or dense layer called on ``x`` (``equation``: an einsum's)."""
    site = sites.with_param_casts(_plain_site(path, module, x, equation), module)
    base = split_type(module)
    if site.candidate and base is not None and sites.reparametrizes(module, base):
        layer = module.clone(parent=None)
        site = dataclasses.replace(site, parametrization=functools.partial(used_parameters, layer))
    return site


def _plain_site(path: str, module, x, equation=None) -> ConvSite:
    if isinstance(module, LowRankConv):
        return ConvSite(path, conv_shape(path, module, x), rank=module.rank)
    return linen_site(path, module, x, equation)


DETACHED = ("applied inside another layer with the parameters that layer gives it "
            "(module.apply, e.g. weight normalization): no kernel variable of the model to split")
# wrappers that re-parametrize the weights of the layers they run: those are left as they are
_WRAPPERS = (nn.WeightNorm, nn.SpectralNorm)
MAPPED = ("its variables pass through nn.map_variables: it computes with trans_in_fn of the "
          "stored kernel, not the kernel lrjax would split")
# linear layers seen and left as they are, with the reason
_UNSPLIT = {nn.ConvLocal: "ConvLocal: unshared weights, no one kernel to split"}


def _mapped(module: nn.Module) -> bool:
    """Whether a bound module runs inside ``nn.map_variables`` (Flax records each lifted
    transform a scope was made by in its ``debug_path``, e.g. ``'map_variables(Conv_0)'``)."""
    return any(str(p).startswith("map_variables(") for p in getattr(module.scope, "debug_path", ()))


@linen_cells.as_sublayers()
@constants_evaluated
def find_convs(model: nn.Module, *example_args, **example_kwargs) -> list[ConvSite]:
    """Every linear layer of a linen model, in call order, found by tracing it on example inputs.

    ``nn.Conv``, ``nn.ConvTranspose``, ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum`` (and
    subclasses, listed as not decomposable), ``LowRankConv``, and layers seen but never split
    (``nn.ConvLocal``, layers another layer applies with the parameters it computes:
    ``self.conv.apply({"params": ...}, x)``) are recorded; a pair's own halves are not. A layer
    called more than once is listed once (its first call); a module's own products, and layers
    left for how the net runs them (in a conditional, their output dropped), are found when it is
    costed (:mod:`lrjax.own_code`, :mod:`lrjax.site_runs`). For a :class:`LowRankModel` the
    sites are its base model's, with the wrapper's ranks attached.

    Args:
      model: any ``flax.linen`` module.
      *example_args, **example_kwargs: what ``model.init`` / ``model.apply`` take after the
        variables (arrays or ``jax.ShapeDtypeStruct``\\s; other values are passed as they are).
    """
    model = unjitted(model)
    if isinstance(model, LowRankModel):
        base_sites = find_convs(model.base, *example_args, **example_kwargs)
        ranks = dict(model.ranks)  # each iteration's, for a stacked layer
        return [dataclasses.replace(s, rank=ranks[s.path] * s.stack) if s.path in ranks else s
                for s in base_sites]
    found: dict[str, ConvSite] = {}
    delegated: dict[str, str] = {}  # path: the subclass split in its base's call
    # (path, prefix, scope, wrapper, module) of the modules running; prefix: the path of the module
    # applied apart that this one is in (None: in the model)
    running: list[tuple[str, str | None, Any, Any, nn.Module]] = []
    elsewhere: dict[str, str] = {}  # path: another method of a module whose product is a layer
    owners: dict[str, str] = {}  # path: the module applying that layer apart (conv.apply)

    def record(next_fun, args, kwargs, context):
        module = context.module
        prefix = running[-1][1] if running else None
        if running and module.scope.parent is None and not module.scope.path and \
                module.scope is not running[0][2] and not isinstance(module, type(model)) and \
                applied_at(module) is None:  # (an unbound copy of its own: named in the model)
            # a module applied inside another with the parameters it is given (a weight-normed
            # conv's self.conv.apply); not the model (its methods, nn.jit(Net.body)(self, x))
            prefix = sites.path_of((*variable_key(running[-1][0]), *filter(None, [module.name])))
            owners.setdefault(prefix, running[-1][0])
        path = module_path(module) if prefix is None else \
            "/".join(p for p in (prefix, module_path(module)) if p)
        wrapper = module if isinstance(module, _WRAPPERS) else running[-1][3] if running else None
        if context.method_name not in ("__call__", "setup") and linen_products.runs_as_layer(
                module) and not hasattr(nn.Module, context.method_name) and not any(
                scope is module.scope or linen_calls.lifted_clone(module, other)
                for _, _, scope, _, other in running):  # (a tied embedding's attend; not a
            elsewhere.setdefault(path, context.method_name)  # helper its call runs, nor its
        running.append((path, prefix, module.scope, wrapper, module))  # lifted code's clone)
        try:
            _record(module, path, prefix is not None, wrapper, args, kwargs, context)
            return next_fun(*args, **kwargs)
        finally:
            running.pop()

    def _record(module, path, detached, wrapper, args, kwargs, context):
        base = delegated_base(module, context)  # a subclass's super().__call__: as its base
        if base is not None and path not in delegated:
            delegated[path] = type(module).__name__
            module = as_base(module, base)
            found.pop(path, None)  # its own __call__'s entry (left as is) replaced
        if context.method_name == "__call__" and (path not in found or (
                found[path].skip == DETACHED and not detached)):  # (its owner's written layer)
            linear = isinstance(module, (nn.Conv, nn.ConvTranspose, nn.Dense, nn.DenseGeneral,
                                         nn.Einsum, nn.ConvLocal))
            if linear and (detached or wrapper is not None):
                folds = None if detached or not linen_wrappers.foldable(wrapper) else "decompose_linen"
                found[path] = ConvSite(path, None, skip=DETACHED if detached else
                                       sites.wrapped_reason(wrapper, folds))
            elif linear and _mapped(module):
                found[path] = ConvSite(path, None, skip=MAPPED)
            elif type(module) in _UNSPLIT:
                found[path] = ConvSite(path, None, skip=_UNSPLIT[type(module)])
            elif isinstance(module, (nn.Conv, nn.ConvTranspose, LowRankConv, nn.Dense,
                                     nn.DenseGeneral, nn.Einsum)) and not isinstance(
                    module, (FactorConv, FactorConvTranspose, FactorDense, FactorEinsum)):
                equation = sites.called_equation(
                    module.einsum_str, args[1:], kwargs, jnp.ndim(layer_input(args, kwargs))) \
                    if isinstance(module, nn.Einsum) else None
                found[path] = _site(path, module, layer_input(args, kwargs), equation)
                if linen_products.is_written_layer(module):  # a module's own product
                    found[path] = dataclasses.replace(
                        found[path], written=True, kernel_name=linen_products.kernel_name(module),
                        named_by_kernel=getattr(module, "named_by_kernel", False),
                        companions=linen_products.companions(getattr(module, "steps", ())))
        elif context.method_name == "__call__" and path in found and isinstance(
                module, (nn.Conv, nn.ConvTranspose)):  # called again: on another geometry?
            found[path] = another_call(found[path], _site(path, module, layer_input(args, kwargs)))

    outputs, made = abstract_init(model, example_args, example_kwargs, record, with_output=True)
    shapes, batch = _flat(made.get("params", {})), example_batch(example_args, outputs)
    found.update(_reading_their_kernels(model, example_args, example_kwargs, {
        p: (found[p], name) for p, name in delegated.items() if found[p].candidate}))
    sites.keep_read_elsewhere(found, elsewhere)
    linen_products.drop_applied_apart(found, owners, DETACHED)
    return [per_example(sites.unless_stacked(
        site, getattr(shapes.get(site.kernel_key), "shape", None)), batch)
        for site in found.values()]


def _reading_their_kernels(model, example_args, example_kwargs, split) -> dict[str, ConvSite]:
    """The sites of subclasses split in their base's call (``split``: ``{path: (site, class
    name)}``) whose own code reads the layer's kernel too (normalizing by it, say), left as they
    are: traced once with all of them split, a kernel still made, or a call that fails, tells."""
    def kept(paths) -> set[str]:
        trial = LowRankModel.wrap(model, {p: split[p][0].shape.groups for p in paths})
        try:
            made = _flat(abstract_init(trial, example_args, example_kwargs).get("params", {}))
        except Exception:  # noqa: BLE001 - its own code needs what the pair no longer holds
            return set(paths) if len(paths) == 1 else set().union(*(kept([p]) for p in paths))
        return {p for p in paths if (*variable_key(p), "kernel") in made}

    return {p: ConvSite(p, None, skip=f"{split[p][1]} (a subclass that runs its base's __call__ "
                        "but also reads its kernel: its own computation is kept)")
            for p in (kept(list(split)) if split else ())}


# ---------------------------------------------------------------------------------------------
# Variables


def _flat(tree) -> dict[tuple[str, ...], Any]:
    """A variable tree as a flat dict of plain arrays (partitioning boxes taken off)."""
    return traverse_util.flatten_dict(dict(boxes.unboxed(tree))) if tree else {}


def _shape(leaf) -> tuple | None:
    return None if leaf is None else tuple(np.shape(leaf))  # a variable set to None (a mask)


def _other_method(call_kwargs: Mapping) -> bool:
    """Whether a call runs another method (``method="encode"``): a VAE's decoder left unused."""
    return call_kwargs.get("method") not in (None, "__call__")


def _structure_problems(expected: Mapping, got: Mapping, extra_ok: bool = False) -> list[str]:
    missing = sorted("/".join(k) for k in expected if k not in got)
    extra = [] if extra_ok else sorted("/".join(k) for k in got if k not in expected)
    wrong = sorted(f"{'/'.join(k)} {_shape(got[k])} (expected {_shape(v)})"
                   for k, v in expected.items() if k in got and _shape(got[k]) != _shape(v))
    return [f"{what}: {items[:4]}{' ...' if len(items) > 4 else ''}"
            for what, items in (("missing", missing), ("unexpected", extra),
                                ("wrong shape", wrong)) if items]


@linen_cells.as_sublayers()
@constants_evaluated
@knowing_variables
def check_variables(model: nn.Module, variables, *example_args, **example_kwargs) -> None:
    """Raise ``ValueError`` unless ``variables`` has exactly ``model``'s arrays and shapes, and
    the example call is an inference call (see :func:`check_inference_call`). A call of another
    method (``method="encode"``) may leave variables unused (a VAE's decoder): only missing and
    misshapen ones are problems then."""
    expected = _flat(abstract_init(model, example_args, example_kwargs))
    problems = _structure_problems(expected, _flat(variables), extra_ok=_other_method(example_kwargs))
    if problems:
        raise ValueError("variables do not match the model: " + "; ".join(problems))
    check_inference_call(model, variables, *example_args, **example_kwargs)


@linen_cells.as_sublayers()
@constants_evaluated
def check_inference_call(model: nn.Module, variables, *example_args, **example_kwargs) -> None:
    """Raise a one-line ``ValueError`` if ``model.apply(variables, *example_args, **example_kwargs)``
    writes a variable collection (batch statistics in training mode) or draws randomness (active
    dropout): surgery, calibration and export run the inference call. Traced abstractly."""
    arrays, rebuild = split_static_call(example_args, example_kwargs)  # keyword inputs too

    def call(v, *traced):  # (given as shapes by the exporters) traced too
        args, keywords = rebuild(traced)
        return as_jax_types(model.apply(v, *args, **keywords))

    try:
        with raising_modules() as raising:  # (the module writing or drawing, then its callers)
            jax.eval_shape(call, variables, *arrays)
    except flax.errors.ModifyScopeVariableError as e:
        found = re.search(r'collection "(\w+)"', str(e))
        what = f"its {found.group(1)!r} collection" if found else "a variable collection"
        raise ValueError(f"the example call of {type(model).__name__} writes {what} (a "
                         f"training-mode call): {_inference_hint(model, raising)}") from None
    except flax.errors.InvalidRngError as e:
        raise ValueError(f"the example call of {type(model).__name__} draws randomness "
                         f"({str(e).split(' (')[0]}; dropout in training mode): "
                         f"{_inference_hint(model, raising)}; or, for randomness the model draws at "
                         f"inference, pass its keys as the call's rngs=") from None


def _inference_hint(model: nn.Module, inner=()) -> str:
    """How to make the call an inference call: a training-mode field set so on the model, or on a
    module of the user's own among ``inner`` (innermost first), else the call's arguments."""
    for module in (model, *[m for m in inner if type(m).__module__.partition(".")[0] != "flax"]):
        for name, training in TRAINING_FLAGS.items():
            if getattr(module, name, None) is training and name in module.__dataclass_fields__:
                return (f"build {module.name or 'the model'} in inference mode ({type(module).__name__}"
                        f"(..., {name}={not training})): its field {name} is {training}")
    return "pass the inference call's arguments, e.g. train=False"


# ---------------------------------------------------------------------------------------------
# Calibration


@linen_cells.as_sublayers()
def calibration_moments(model: nn.Module, variables, calibration, paths,
                        example_kwargs: Mapping | None = None,
                        example_args: tuple | None = None,
                        strict: bool = True, counts_out: dict | None = None
                        ) -> dict[str, np.ndarray]:
    """Second moments ``E[p p^T]`` of the first factor's input patches of each layer in ``paths``
    (:func:`lrjax.linen_moments.calibration_moments`, with this module's sites; ``paths`` as
    there): sown from each listed layer's first call, or, for a layer inside a loop body (a
    recurrence, a stacked layer), summed over every run on the host (by iteration).

    Returns:
      ``{path: (groups, C_g * kh, C_g * kh) float64}``.

    Raises:
      ValueError: no batch, a batch with NaN/Inf values, or (``strict``) a listed layer whose
        statistics never came back.
    """
    return linen_moments.calibration_moments(model, variables, calibration, paths,
                                             example_kwargs, example_args, strict, site_of=_site,
                                             counts_out=counts_out)


# ---------------------------------------------------------------------------------------------
# Decomposition


def layer_scopes(index: Mapping[str, int], prefix: str = ""):
    """A linen interceptor marking each layer's work (a call of a layer named ``{prefix}/{its
    path}`` in ``index``, :func:`lrjax.site_runs.layer_indices`) as that layer's in a traced
    count (:func:`lrjax.macs.layer_scope`): each layer's runs counted."""
    def scoped(next_fun, args, kwargs, context):
        module = context.module
        i = index.get("/".join(filter(None, (prefix, module_path(module))))) \
            if context.method_name == "__call__" else None
        if i is not None and (linen_products.runs_as_layer(module) or not (  # (its layer's
                delegated_base(module, context) if delegates(module)  # call is)
                else split_type(module) is not None)):  # a module sharing the layer's scope
            i = None  # is not the layer (a LoRA wrapper: nn.share_scope)
        if i is None:
            return next_fun(*args, **kwargs)
        with macs.layer_scope(i):
            return next_fun(*args, **kwargs)

    return scoped


@linen_cells.as_sublayers()
@knowing_variables
def rank_problem(model: nn.Module, variables, example_args, example_kwargs, *,
                 calibration=None, multiple: int | None = None, sites=None, score=None,
                 wrapped=None) -> RankProblem:
    """The :class:`RankProblem` of a linen model and its variables (calibrated if asked);
    ``wrapped``: the flops per call of wrappers folded into the variables, by the path of the
    module they wrap (:meth:`lrjax.linen_wrappers.Folding.flops`): whole-net work, which
    splitting their layers saves."""
    model = unjitted(model)
    found = find_convs(model, *example_args, **example_kwargs) if sites is None else sites
    variables = boxes.unboxed(string_keys(variables))
    flat = _flat(variables)
    arrays, rebuild = split_static(example_args)
    candidates = [s for s in found if s.candidate]
    kernels = SiteKernels(flat, candidates)
    covs, note, few = None, None, None
    with nn.intercept_methods(layer_scopes(layer_indices(found))):
        counts = macs.traced_macs(lambda v, *t: as_jax_types(
            model.apply(v, *rebuild(t), **example_kwargs)), variables, *arrays)
    batch = example_batch(arrays, counts["outputs"])
    found = linen_wrappers.with_wrapper_flops(with_parametrization_flops(found, flat, batch),
                                              wrapped or {}, batch)
    found = own_code.with_own_code(costed_as_run(found, counts, batch), counts["weighted"],
                                   own_code.variable_names(variables, collections=True), counts["total"])
    if calibration is not None:
        # costed first: a layer in a conditional branch is never split, and its statistics,
        # sown in one branch only, would break nn.cond; it is not calibrated
        costed = {s.path for s in found if s.candidate}
        paths, note = calibrated_paths([s for s in candidates if s.path in costed])
        seen = {}
        wanted = {s.path: s for s in candidates if s.path in paths}  # (their kernels)
        covs = calibration_moments(model, variables, calibration, wanted, example_kwargs,
                                   example_args, strict=False, counts_out=seen)
        note = uncalibrated_note(note, paths, covs)
        few = undersampled_note(seen, candidates)
    return RankProblem(found, kernels, covs, multiple, score, counts["total"] // batch,
                       (counts["elementwise"] + sum((wrapped or {}).values())) / batch,
                       counts["constant"] // batch,
                       tuple(filter(None, (note, few, loop_note(counts, batch)))),
                       source=variable_leaves(variables))


def apply_factors(flat, problem: RankProblem, ranks, batch: bool = True) -> tuple[dict, dict]:
    """Replace each decomposed conv's kernel/bias in a flat variable dict by its factors."""
    out, factors = dict(flat), {}
    chosen = {p: r for p, r in ranks.items() if r is not None}
    if batch:  # the layers not decomposed yet, on parallel host threads on CPU
        problem.prepare_factors(chosen)
    for path, rank in chosen.items():
        factors[path] = problem.factors(path, rank)
        prefix = ("params", *variable_key(path))
        site = problem.site(path)
        bias = out.pop((*prefix, "bias"), None) if site.shape.use_bias else None
        # (a product written by hand has no bias of its own: the module's stays the module's)
        if site.parametrization is not None and bias is not None:
            bias = site_parameters(flat, site)["bias"]
        for name in (site.kernel_key[-1], *site.companions):  # (and a gain its kernel read)
            del out[("params", *site.kernel_key[:-1], name)]
        vertical, horizontal = problem.site(path).factor_variables(factors[path])
        out[(*prefix, "vertical", "kernel")] = vertical
        out[(*prefix, "horizontal", "kernel")] = horizontal
        if bias is not None:
            out[(*prefix, "horizontal", "bias")] = bias
    return out, factors


def _call_ranks(problem: RankProblem, ranks) -> dict:
    """Ranks per call: a stacked layer's covers its iterations (``ConvSite.stack``)."""
    return {p: None if r is None else r // problem.site(p).stack for p, r in ranks.items()}


def linen_scorer(model: nn.Module, variables, problem: RankProblem, eval_fn, unwrapped=()):
    """``score(ranks) = eval_fn(module, variables)`` of the model decomposed with ``ranks``
    (factors from ``problem``'s cache), for eval-guided rank selection (``unwrapped``: the
    wrappers folded into ``variables``, :mod:`lrjax.linen_wrappers`)."""
    flat = _flat(variables)

    def score(ranks):
        new_flat, _ = apply_factors(flat, problem, ranks, batch=False)
        return float(eval_fn(LowRankModel.wrap(model, _call_ranks(problem, ranks),
                                               unwrapped=unwrapped),
                             traverse_util.unflatten_dict(new_flat)))

    return score


@linen_cells.as_sublayers()
@lapack.small_pages()
@constants_evaluated
@knowing_variables
def decompose_linen(model: nn.Module, variables, *example_args, rule, calibration=None,
                    multiple: int | None = None, measure_batch: int = 1, problem=None,
                    **example_kwargs) -> Decomposition:
    """Compress any linen model: its linear layers become pairs of smaller ones.

    No change to the model's code is needed: every 2-D ``nn.Conv`` (``k x k`` into a vertical /
    horizontal pair, 1x1 into two 1x1 convs), ``nn.Dense`` and ``nn.DenseGeneral`` is a
    candidate wherever it sits (auto-named, in submodules, created in ``@nn.compact``); the
    variable layout is :mod:`lrjax.sites`'; an ``nn.Einsum`` is a candidate when its equation is
    one product of input axes into output axes (:func:`lrjax.sites.einsum_split`), and an
    ``nn.ConvTranspose`` becomes a vertical / horizontal pair of transposed convs. Layers that
    cannot be split (input dilation, masks, subclasses, custom ``dot_general``, circular
    transposed convs, ``nn.ConvLocal``, batched einsums, layers applied by another with given
    parameters) are left as they are and listed in the report with the reason.

    Args:
      model: the full-rank linen module.
      variables: its variables (``{"params": ..., "batch_stats": ..., ...}``).
      *example_args, **example_kwargs: an example call of ``model.apply`` after the variables
        (e.g. ``images, train=False``); arrays or ``jax.ShapeDtypeStruct``\\s, traced only.
      rule: the rank rule (:data:`lrjax.rules.RULE_HELP`, or a parsed
        :class:`lrjax.rules.RankRule`), keyed by full module path.
      calibration: optional batch (or iterable of batches) of model inputs. The factors then
        minimise each layer's output error instead of its kernel error (see
        :func:`lrjax.decompose.vh_decompose`), and the ``energy:``/``speedup:`` rules use the
        calibrated spectra. ``None``: the exact data-free closed form. Batches are given as
        :func:`lrjax.moments.calibration_batches` reads them (keyword inputs as a dict).
      multiple: round ranks to multiples of this (hardware tiles); or the rule's
        ``multiple=`` option.
      measure_batch: batch of ``+measured`` timings.
      problem: the ``.problem`` of an earlier result for this model and these variables: its
        calibration and every layer's SVD are reused (a sweep of rules pays for them once;
        :meth:`lrjax.problem.RankProblem.reusing`); ``calibration`` must then be ``None``.

    Returns:
      A :class:`lrjax.report.Decomposition` (``.module``: a :class:`lrjax.layers.LowRankModel`,
      ``.variables``, ``.report``).

    Raises:
      ValueError: variables that do not match the model, a bad rule (unknown layer, rank out of
        range), or bad calibration data (empty, NaN/Inf).
    """
    if isinstance(model, LowRankModel):
        raise ValueError("decompose_linen takes the full-rank model, not a LowRankModel")
    model = unjitted(model)  # nn.jit(Net)(): Net (the same variables), so its calls are seen
    rule, variables = rules.parse_rule(rule, multiple=multiple), string_keys(variables)
    # checked; nn.WeightNorm / nn.SpectralNorm folded into the kernels their layers compute with
    folding = linen_wrappers.checked(check_variables, model, variables, example_args, example_kwargs)
    boxed = traverse_util.flatten_dict(dict(variables))  # boxes given back to the factors
    stored, variables, wrapped = variables, folding.variables, tuple(folding.layers)
    with linen_wrappers.unwrapped(wrapped):
        problem = rank_problem(model, variables, example_args, example_kwargs,
                               multiple=rule.multiple, calibration=None if problem else calibration,
                               wrapped=folding.flops).reusing(problem, calibration)
        if rule.eval_fn is not None:
            problem.score = linen_scorer(model, variables, problem, rule.eval_fn, wrapped)
        kept_full = {}
        ranks = rules.select_ranks(rule, problem, measure_batch=measure_batch, kept_full=kept_full)
    flat, factors = apply_factors(_flat(variables), problem, ranks)
    if wrapped:  # kept folded around split layers only
        wrapped = folding.kept(factors)
        flat = linen_wrappers.restored(folding, flat, _flat(stored), wrapped)
    module = LowRankModel.wrap(model, _call_ranks(problem, ranks), unwrapped=wrapped)
    with known_variables(module, traverse_util.unflatten_dict(flat)):
        expected = _flat(abstract_init(module, example_args, example_kwargs))
    problems = _structure_problems(expected, flat, extra_ok=_other_method(example_kwargs))
    if problems:  # a bug, not a user error: the two structures are built from the same sites
        raise AssertionError("decomposed variables do not match the low-rank model: "
                             + "; ".join(problems))
    flat = {k: v if v is None or not hasattr(expected.get(k), "dtype") else  # None: a mask;
            sites.device_array(v, expected[k].dtype) for k, v in flat.items()}  # unused, or
    # metadata (t5x's params_axes): as given
    new_variables = traverse_util.unflatten_dict(boxes.reboxed(
        flat, boxed, {p: problem.site(p) for p in factors}))
    if any(problem.site(p).written for p in factors):  # their kernel read elsewhere: an error
        arrays, rebuild = split_static(example_args)
        linen_placeholders.check_unread(
            lambda v, *t: as_jax_types(module.apply(v, *rebuild(t), **example_kwargs)), new_variables,
            *arrays)
    report = build_report(problem, ranks, factors, kept_full, folding.notes(wrapped))
    return Decomposition(module, new_variables, report, problem)


@linen_cells.as_sublayers()
@constants_evaluated
@knowing_variables
def search(model: nn.Module, variables, *example_args, eval_fn, target_speedup: float,
           candidates=None, calibration=None, multiple: int | None = None,
           **example_kwargs) -> rank_lib.SearchResult:
    """Eval-guided per-layer ranks for a linen model (see :class:`lrjax.ranks.EvalGuided`).

    Args:
      model, variables, *example_args, **example_kwargs: as for :func:`decompose_linen`.
      eval_fn: ``eval_fn(module, variables) -> float``, higher is better.
      target_speedup: times fewer flops of the whole net (see ``speedup:S``).
      candidates: fractions of the break-even rank, or ``{path: [ranks]}``.
      calibration: optional calibration batches (calibration-aware factors while searching).
      multiple: round candidate ranks to multiples of this.

    Returns:
      A :class:`lrjax.ranks.SearchResult`; its ``ranks`` can be passed as ``rule=`` to
      :func:`decompose_linen`.
    """
    model, variables = unjitted(model), string_keys(variables)
    folding = linen_wrappers.checked(check_variables, model, variables, example_args, example_kwargs)
    with linen_wrappers.unwrapped(folding.layers):  # (as decompose_linen folds them)
        problem = rank_problem(model, folding.variables, example_args, example_kwargs,
                               calibration=calibration, multiple=multiple, wrapped=folding.flops)
        problem.score = linen_scorer(model, folding.variables, problem, eval_fn,
                                     tuple(folding.layers))
        return rank_lib.search_problem(problem, target_speedup=target_speedup,
                                       candidates=candidates)
