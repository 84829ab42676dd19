"""Model surgery for any Flax linen model: find its convs, decompose them, run the low-rank model.

One mechanism serves a user's model and lrjax's zoo alike, with no change to the model's code:

* :func:`find_convs` traces the model once with ``jax.eval_shape`` (no compute, no memory) under a
  method interceptor (``nn.intercept_methods``) that records every 2-D ``nn.Conv`` call: its full
  module path (``ResNetBlock_3/Conv_1``; auto-named convs included), input shape and
  hyper-parameters, and why it cannot be split if it cannot.
* :class:`LowRankModel` wraps the model: while it runs, an interceptor replaces each conv named in
  its rank map by a vertical/horizontal pair (:func:`lrjax.layers.pair_forward`) created *inside
  the conv's own scope*, so the factors live under the conv's path (``conv1_1/vertical/kernel``,
  ``conv1_1/horizontal/{kernel,bias}``) and every other variable keeps its place.
* :func:`decompose_linen` turns the model's trained variables into the low-rank model's: the rank
  rule is resolved (:func:`select_ranks`), each chosen conv gets the closed-form factors
  (optionally calibration-aware: :func:`lrjax.decompose.vh_decompose`'s ``input_cov``), and the
  result is checked against the wrapped model's own variable structure.

Layers are named by their full module path joined with ``/`` everywhere: rank maps, reports, JSON
rank files, the command line. The zoo's layers are top-level, so their paths are their names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lrjax import costs, decompose, timing
from lrjax import ranks as rank_lib
from lrjax.layers import FactorConv, LowRankConv, pair_forward

__all__ = [
    "ConvSite", "find_convs", "conv_skip_reason", "LowRankModel", "check_variables", "RankProblem",
    "select_ranks",
    "decompose_linen", "Decomposition", "SurgeryReport", "calibration_moments", "rank_problem",
    "linen_scorer", "build_report",
    "fold_batch_norms", "measured_gate", "RULE_HELP",
]

RULE_HELP = (
    "a rank rule: {layer path: rank} (null keeps a layer full), a JSON file of that map, a shipped "
    "config (vgg16, caffenet, nin, cnn), 'energy:F' (keep fraction F of each layer's spectral "
    "energy) or 'speedup:S' (allocate ranks for S times fewer conv multiply-adds over the whole "
    "net); append '+measured' to keep a layer full rank where its pair is not faster on this "
    "backend, or '+measured:onnxruntime' / '+measured:litert' to time the layers in that runtime "
    "(each layer exported alone); or a rule object such as lrjax.ranks.EvalGuided"
)


# ---------------------------------------------------------------------------------------------
# Finding the convs of a model


@dataclasses.dataclass(frozen=True)
class ConvSite:
    """One conv of a model.

    Attributes:
      path: full module path joined with ``/`` (the layer's name everywhere in lrjax).
      shape: geometry for costs (``shape.name == path``); ``None`` for convs that are not 2-D.
      rank: the pair's rank when the conv already is one (a ``LowRankConv``, or a conv a
        ``LowRankModel`` decomposes); ``None`` otherwise.
      skip: why the conv cannot be decomposed (``None``: it can).
    """

    path: str
    shape: costs.ConvShape | None
    rank: int | None = None
    skip: str | None = None

    @property
    def candidate(self) -> bool:
        """Whether the conv can be replaced by a pair (2-D, window larger than 1x1, supported)."""
        return self.skip is None and self.rank is None


def _pair(v):
    if v is None:
        return (1, 1)
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_skip_reason(conv, base_type=nn.Conv) -> str | None:
    """Why a conv (``nn.Conv`` or ``nnx.Conv``: same attribute names) cannot be split into a
    pair, or None. ``base_type``: the only type decomposed (subclasses keep their own code)."""
    size = conv.kernel_size
    kernel = (size,) if isinstance(size, int) else tuple(size)
    if len(kernel) != 2:
        return f"not a 2-D conv (kernel_size {size})"
    if type(conv) is not base_type:
        return (f"{type(conv).__name__} (a subclass of {base_type.__name__}: its own computation "
                "is kept)")
    if kernel == (1, 1):
        return "1x1 kernel: nothing to split"
    if any(d != 1 for d in _pair(conv.input_dilation)):
        return f"input dilation {conv.input_dilation} (transposed conv)"
    if conv.mask is not None:
        return "masked kernel"
    if isinstance(conv.padding, str) and conv.padding.upper() == "CAUSAL":
        return "causal padding"
    return None


def _conv_shape(path: str, module, x) -> costs.ConvShape:
    return costs.ConvShape(
        name=path, input_hw=tuple(x.shape[-3:-1]), in_channels=int(x.shape[-1]),
        out_channels=int(module.features), kernel_size=_pair(module.kernel_size),
        strides=_pair(module.strides), padding=module.padding,
        dilation=_pair(module.kernel_dilation), groups=int(module.feature_group_count),
        use_bias=bool(module.use_bias))


def _module_path(module: nn.Module, root: tuple[str, ...] = ()) -> str:
    path = tuple(module.scope.path)
    return "/".join(path[len(root):])


def _split_static(args):
    """Array-like positional arguments (traced) and a function rebuilding the full list."""
    def is_array(a):
        return isinstance(a, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))

    flags = [is_array(a) for a in args]
    arrays = [a for a, f in zip(args, flags, strict=True) if f]

    def rebuild(traced):
        it = iter(traced)
        return [next(it) if f else a for a, f in zip(args, flags, strict=True)]

    return arrays, rebuild


def _init_rngs():
    key = jax.random.key(0)
    return {"params": key, "dropout": key}


def _abstract_init(model: nn.Module, args, kwargs, interceptor=None):
    """``jax.eval_shape`` of ``model.init`` on the example inputs, under an optional interceptor."""
    arrays, rebuild = _split_static(args)

    def trace(*traced):
        if interceptor is None:
            return model.init(_init_rngs(), *rebuild(traced), **kwargs)
        with nn.intercept_methods(interceptor):
            return model.init(_init_rngs(), *rebuild(traced), **kwargs)

    return jax.eval_shape(trace, *arrays)


def find_convs(model: nn.Module, *example_args, **example_kwargs) -> list[ConvSite]:
    """Every conv of a linen model, in call order, found by tracing it on example inputs.

    ``nn.Conv`` (and subclasses, listed as not decomposable) and ``LowRankConv`` calls are
    recorded; a pair's own ``FactorConv`` halves are not. A conv called more than once is listed
    once (its first call). For a :class:`LowRankModel` the sites are its base model's, with the
    wrapper's ranks attached.

    Args:
      model: any ``flax.linen`` module.
      *example_args, **example_kwargs: what ``model.init`` / ``model.apply`` take after the
        variables (arrays or ``jax.ShapeDtypeStruct``\\s; other values are passed as they are).
    """
    if isinstance(model, LowRankModel):
        sites = find_convs(model.base, *example_args, **example_kwargs)
        ranks = dict(model.ranks)
        return [dataclasses.replace(s, rank=ranks[s.path]) if s.path in ranks else s
                for s in sites]
    found: dict[str, ConvSite] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Conv, LowRankConv)) \
                and not isinstance(module, FactorConv):
            path = _module_path(module)
            x = args[0] if args else kwargs.get("inputs", kwargs.get("x"))
            if path not in found:
                if isinstance(module, LowRankConv):
                    found[path] = ConvSite(path, _conv_shape(path, module, x), rank=module.rank)
                else:
                    reason = conv_skip_reason(module)
                    shape = None if reason and reason.startswith("not a 2-D") \
                        else _conv_shape(path, module, x)
                    found[path] = ConvSite(path, shape, skip=reason)
        return next_fun(*args, **kwargs)

    _abstract_init(model, example_args, example_kwargs, record)
    return list(found.values())


# ---------------------------------------------------------------------------------------------
# The low-rank model


def _normalise_ranks(ranks: Mapping[str, int | None] | Iterable) -> tuple[tuple[str, int], ...]:
    items = ranks.items() if isinstance(ranks, Mapping) else ranks
    out = {}
    for path, rank in items:
        if rank is None:
            continue
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
            raise ValueError(f"rank of layer {path!r} must be an int or None; got {rank!r}")
        out[str(path)] = int(rank)
    return tuple(sorted(out.items()))


class LowRankModel(nn.Module):
    """Any linen model with some of its convs replaced by vertical/horizontal pairs.

    Called exactly like ``base`` (same arguments, same outputs' meaning). While it runs, each
    ``nn.Conv`` whose path is in ``ranks`` computes :func:`lrjax.layers.pair_forward` with that
    rank, inside the conv's own scope. ``base``'s scope is shared (``nn.share_scope``), so the
    variables are ``base``'s with ``{path}/kernel`` and ``{path}/bias`` replaced by
    ``{path}/vertical/kernel``, ``{path}/horizontal/kernel`` and ``{path}/horizontal/bias``.

    Build it with :meth:`wrap` (which normalises the rank map) or get it from
    :func:`decompose_linen`. Only ``__call__`` is wrapped (``apply(..., method=...)`` with another
    method of ``base`` runs that method undecomposed). A call that does not reach every conv of
    the rank map raises ``ValueError`` (a misspelt path must not pass silently), so a map should
    name only convs that every call runs.

    Attributes:
      base: the original module (unbound).
      ranks: ``((path, rank), ...)``, sorted.
      mid_norm: optional norm factory applied between the two halves of every pair.
    """

    base: nn.Module
    ranks: tuple[tuple[str, int], ...] = ()
    mid_norm: Callable[..., nn.Module] | None = None

    @classmethod
    def wrap(cls, base: nn.Module, ranks: Mapping[str, int | None], mid_norm=None):
        """``LowRankModel(base, ranks)`` with ``ranks`` as a dict (``None`` entries dropped)."""
        if isinstance(base, LowRankModel):
            raise ValueError("the model is already a LowRankModel: wrap its .base instead")
        return cls(base, _normalise_ranks(ranks), mid_norm)

    def setup(self):
        nn.share_scope(self, self.base)

    def __call__(self, *args, **kwargs):
        ranks = dict(self.ranks)
        root = tuple(self.scope.path)
        mid_norm = self.mid_norm
        seen = set()

        def decompose_conv(next_fun, call_args, call_kwargs, context):
            module = context.module
            if type(module) is not nn.Conv or context.method_name != "__call__":
                return next_fun(*call_args, **call_kwargs)
            path = _module_path(module, root)
            rank = ranks.get(path)
            if rank is None:
                return next_fun(*call_args, **call_kwargs)
            reason = conv_skip_reason(module)
            if reason is not None:
                raise ValueError(f"layer {path!r} cannot be decomposed: {reason}")
            seen.add(path)
            x = call_args[0] if call_args else call_kwargs["inputs"]
            return pair_forward(
                x, features=module.features, kernel_size=module.kernel_size, rank=rank,
                strides=module.strides, padding=module.padding,
                kernel_dilation=module.kernel_dilation,
                feature_group_count=module.feature_group_count, use_bias=module.use_bias,
                mid_norm=mid_norm, dtype=module.dtype, param_dtype=module.param_dtype,
                precision=module.precision, kernel_init=module.kernel_init,
                bias_init=module.bias_init, where=path)

        with nn.intercept_methods(decompose_conv):
            out = self.base(*args, **kwargs)
        missing = sorted(set(ranks) - seen)
        if missing:
            raise ValueError(f"rank map names layers the model never called as nn.Conv: "
                             f"{missing}")
        return out


# ---------------------------------------------------------------------------------------------
# Variables


def _flat(tree) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def _structure_problems(expected: Mapping, got: Mapping) -> list[str]:
    missing = sorted("/".join(k) for k in expected if k not in got)
    extra = sorted("/".join(k) for k in got if k not in expected)
    wrong = sorted(f"{'/'.join(k)} {tuple(np.shape(got[k]))} (expected {tuple(v.shape)})"
                   for k, v in expected.items() if k in got and tuple(np.shape(got[k])) != v.shape)
    return [f"{what}: {items[:4]}{' ...' if len(items) > 4 else ''}"
            for what, items in (("missing", missing), ("unexpected", extra),
                                ("wrong shape", wrong)) if items]


def check_variables(model: nn.Module, variables, *example_args, **example_kwargs) -> None:
    """Raise ``ValueError`` unless ``variables`` has exactly ``model``'s arrays and shapes."""
    expected = _flat(_abstract_init(model, example_args, example_kwargs))
    problems = _structure_problems(expected, _flat(variables))
    if problems:
        raise ValueError("variables do not match the model: " + "; ".join(problems))


def fold_batch_norms(variables, pairs: Mapping[str, str], *, eps: float = 1e-5) -> dict:
    """Fold each batch norm that directly follows a conv into the conv's kernel and bias.

    ``pairs`` maps a conv path to the path of the ``nn.BatchNorm`` applied to its output
    (``{"conv1": "bn1"}``). The folded norms' variables are dropped; the caller runs a model
    without those norms (e.g. the zoo's ``bn=False`` twin). Each conv must have a bias.

    Raises:
      ValueError: a path without its arrays, or a conv without a bias.
    """
    flat = _flat(variables)
    out = dict(flat)

    def get(key, what, required=True):
        if key not in flat:
            if required:
                raise ValueError(f"cannot fold batch norm {what}: {'/'.join(key)} is missing")
            return None
        return jnp.asarray(flat[key])

    for conv, bn in pairs.items():
        cpath, bpath = tuple(conv.split("/")), tuple(bn.split("/"))
        what = f"{bn!r} into {conv!r}"
        if ("params", *cpath, "bias") not in flat:
            raise ValueError(f"cannot fold batch norm {what}: the conv has no bias")
        kernel, bias = decompose.fold_batch_norm(
            get(("params", *cpath, "kernel"), what), get(("params", *cpath, "bias"), what),
            get(("params", *bpath, "scale"), what, False),
            get(("params", *bpath, "bias"), what, False),
            get(("batch_stats", *bpath, "mean"), what), get(("batch_stats", *bpath, "var"), what),
            eps)
        out[("params", *cpath, "kernel")], out[("params", *cpath, "bias")] = kernel, bias
        for key in list(out):
            if key[1:len(bpath) + 1] == bpath:
                del out[key]
    return traverse_util.unflatten_dict(out)


# ---------------------------------------------------------------------------------------------
# Calibration


def calibration_moments(model: nn.Module, variables, calibration, paths: Sequence[str],
                        example_kwargs: Mapping | None = None) -> dict[str, np.ndarray]:
    """Second moments ``E[p p^T]`` of the vertical input patches of each conv in ``paths``.

    The (full-rank) model runs on every calibration batch (jitted, once per batch shape) with an
    interceptor that accumulates :func:`lrjax.decompose.patch_moments` of each listed conv's input;
    sums are kept in float64 on the host.

    Args:
      calibration: one batch of model inputs (an array, or a tuple of positional arguments), or
        an iterable of such batches.
      example_kwargs: keyword arguments of every call (e.g. ``train=False``).

    Returns:
      ``{path: (groups, C_g * kh, C_g * kh) float64}``.

    Raises:
      ValueError: no batch, a batch with NaN/Inf values, or a listed conv that never ran.
    """
    kwargs = dict(example_kwargs or {})
    wanted = set(paths)
    batches = [calibration] if isinstance(calibration, (jax.Array, np.ndarray, tuple)) \
        else list(calibration)
    if not batches:
        raise ValueError("calibration is empty: give a batch or an iterable of batches")

    def moments(variables, *args):
        out = {}

        def accumulate(next_fun, call_args, call_kwargs, context):
            module = context.module
            if context.method_name == "__call__" and type(module) is nn.Conv:
                path = _module_path(module)
                if path in wanted and path not in out:
                    x = call_args[0] if call_args else call_kwargs["inputs"]
                    x = x.reshape((-1, *x.shape[-3:]))
                    out[path] = decompose.patch_moments(
                        x, _pair(module.kernel_size), strides=_pair(module.strides),
                        padding=module.padding, dilation=_pair(module.kernel_dilation),
                        groups=module.feature_group_count)
            return next_fun(*call_args, **call_kwargs)

        with nn.intercept_methods(accumulate):
            model.apply(variables, *args, **kwargs)
        return out

    fn = jax.jit(moments)
    sums, counts = {}, {}
    for i, batch in enumerate(batches):
        args = batch if isinstance(batch, tuple) else (batch,)
        for a in args:
            if isinstance(a, (jax.Array, np.ndarray)) and not np.isfinite(np.asarray(a)).all():
                raise ValueError(f"calibration batch {i} (shape {np.shape(a)}) contains NaN/Inf "
                                 "values")
        for path, (s, n) in fn(variables, *args).items():
            sums[path] = sums.get(path, 0.0) + np.asarray(s, np.float64)
            counts[path] = counts.get(path, 0.0) + float(n)
    missing = sorted(wanted - set(sums))
    if missing:
        raise ValueError(f"calibration never ran convs {missing}")
    return {path: sums[path] / counts[path] for path in sums}


# ---------------------------------------------------------------------------------------------
# Rank rules


@dataclasses.dataclass
class RankProblem:
    """What a rank rule sees: the model's convs, their kernels, optional calibration statistics,
    and (for eval-guided rules) a way to score the model with a given rank map.

    Attributes:
      sites: every conv of the model (:class:`ConvSite`); rules choose among ``candidates``.
      kernels: ``{path: HWIO kernel}`` of the candidates (NumPy float32).
      covariances: ``{path: input_cov}`` when calibrated, else ``None``.
      multiple: round ranks to multiples of this (hardware tiles), or ``None``.
      score: ``score(ranks) -> float`` evaluates the model decomposed with ``ranks`` (only given
        where the caller has an evaluation function), else ``None``.
      factors: ``factors(path, rank) -> Factors`` (closed form, calibrated when ``covariances``),
        computed once per layer at its largest requested rank and truncated.
    """

    sites: list[ConvSite]
    kernels: dict[str, np.ndarray]
    covariances: dict[str, np.ndarray] | None = None
    multiple: int | None = None
    score: Callable[[Mapping[str, int]], float] | None = None
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def candidates(self) -> list[ConvSite]:
        return [s for s in self.sites if s.candidate]

    @property
    def fixed_macs(self) -> int:
        """Multiply-adds of the 2-D convs no rule can change (1x1, skipped, already pairs)."""
        total = 0
        for s in self.sites:
            if s.shape is None or s.candidate:
                continue
            total += (costs.conv_cost(s.shape) if s.rank is None
                      else costs.lowrank_cost(s.shape, s.rank)).macs
        return total

    @property
    def full_macs(self) -> int:
        """Multiply-adds of every 2-D conv at full rank."""
        return sum(costs.conv_cost(s.shape).macs for s in self.sites if s.shape is not None)

    def site(self, path: str) -> ConvSite:
        for s in self.sites:
            if s.path == path:
                return s
        raise KeyError(path)

    def spectrum(self, path: str) -> np.ndarray:
        """Singular values ``(groups, R)`` of the layer's (whitened, when calibrated) matrix."""
        key = ("spectrum", path)
        if key not in self._cache:
            groups = self.site(path).shape.groups
            mats = decompose.kernel_to_matrices(self.kernels[path], groups=groups)
            if self.covariances is not None:
                root, _ = decompose.whitening(self.covariances[path], groups=groups)
                mats = jnp.matmul(root, mats, precision=jax.lax.Precision.HIGHEST)
            self._cache[key] = np.asarray(jnp.linalg.svd(mats, compute_uv=False), np.float64)
        return self._cache[key]

    def factors(self, path: str, rank: int) -> decompose.Factors:
        """Closed-form factors of ``path`` at ``rank``, cached at the largest rank asked for so
        far (smaller ranks are slices of it: truncated SVD factors are nested)."""
        groups = self.site(path).shape.groups
        cached = self._cache.get(("factors", path))
        if cached is None or cached.vertical.shape[-1] < rank:
            cov = None if self.covariances is None else self.covariances[path]
            cached = decompose.vh_decompose(jnp.asarray(self.kernels[path]), rank, groups=groups,
                                            input_cov=cov)
            self._cache[("factors", path)] = cached
        if cached.vertical.shape[-1] == rank:
            return cached
        return decompose.truncate(cached, rank, groups=groups)


def _number(rule: str, prefix: str) -> float:
    try:
        value = float(rule[len(prefix):])
    except ValueError:
        raise ValueError(f"bad rank rule {rule!r}: {prefix!r} must be followed by a number") \
            from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"bad rank rule {rule!r}: the number must be positive")
    return value


def _budget_ranks(problem: RankProblem, target: float) -> dict[str, int]:
    """``speedup:S``: the greedy allocation meeting ``S`` times fewer MACs over all 2-D convs."""
    candidates = [s.shape for s in problem.candidates]
    budget = problem.full_macs / target - problem.fixed_macs
    if budget <= 0:
        raise ValueError(f"speedup {target} is out of reach: the convs that cannot be decomposed "
                         f"already cost {problem.fixed_macs:,} of the "
                         f"{problem.full_macs / target:,.0f} multiply-adds allowed")
    spectra = {s.name: problem.spectrum(s.name) for s in candidates}
    alloc = rank_lib.allocate_ranks(candidates, problem.kernels, macs_budget=budget,
                                    multiple=problem.multiple, spectra=spectra)
    return alloc.ranks


def select_ranks(rule, problem: RankProblem, *, measure_batch: int = 1) -> dict[str, int | None]:
    """Resolve a rank rule to ``{path: rank or None}`` (see :data:`RULE_HELP`).

    Args:
      rule: a mapping, a string rule, a callable ``rule(problem) -> mapping`` or an object with a
        ``select(problem)`` method (:class:`lrjax.ranks.EvalGuided`).
      problem: the model's convs and kernels (:class:`RankProblem`).
      measure_batch: batch of the ``+measured`` timings.

    Raises:
      ValueError: an unknown rule, a layer the model does not have (the message lists the
        decomposable ones), a layer that cannot be decomposed, or a rank out of range.
    """
    measured = None  # the runtime that times the layers, when gated
    if isinstance(rule, str) and "+measured" in rule:
        rule, _, where = rule.rpartition("+measured")
        if where and (not where.startswith(":") or where[1:] not in timing.RUNTIMES):
            raise ValueError(f"bad '+measured' suffix {'+measured' + where!r}: expected "
                             f"'+measured' or '+measured:R' with R in {timing.RUNTIMES}")
        measured = where[1:] or "jax"
    if isinstance(rule, str) and rule in ("", "measured"):
        raise ValueError("'+measured' gates another rule: use e.g. 'vgg16+measured'")
    by_path = {s.path: s for s in problem.sites}
    candidates = {s.path for s in problem.candidates}
    budgeted = isinstance(rule, str) and rule.startswith(("energy:", "speedup:"))
    if isinstance(rule, Mapping):
        ranks = dict(rule)
    elif hasattr(rule, "select"):
        ranks = dict(rule.select(problem))
    elif callable(rule):
        ranks = dict(rule(problem))
    elif isinstance(rule, str) and rule.startswith("energy:"):
        frac = _number(rule, "energy:")
        if frac > 1:
            raise ValueError(f"bad rank rule {rule!r}: the energy fraction must be in (0, 1]")
        ranks = {}
        for s in problem.candidates:
            ranks[s.path] = rank_lib.energy_rank(problem.kernels[s.path], frac,
                                                 groups=s.shape.groups, multiple=problem.multiple,
                                                 spectrum=problem.spectrum(s.path))
    elif isinstance(rule, str) and rule.startswith("speedup:"):
        ranks = _budget_ranks(problem, _number(rule, "speedup:"))
    elif isinstance(rule, str):
        ranks = rank_lib.load_ranks(rule)
    else:
        raise ValueError(f"unknown rank rule {rule!r}; expected {RULE_HELP}")
    unknown = sorted(set(ranks) - set(by_path))
    if unknown:
        raise ValueError(f"rank rule names unknown layers {unknown}; the model's decomposable "
                         f"convs are {sorted(candidates)}")
    out = {}
    for path, r in ranks.items():
        if r is None:
            out[path] = None
            continue
        site = by_path[path]
        if not site.candidate:
            raise ValueError(f"layer {path!r} cannot be decomposed: "
                             f"{site.skip or 'it already is a pair'}")
        layer = site.shape
        top = decompose.max_rank(layer.kernel_shape, groups=layer.groups)
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
            raise ValueError(f"rank of layer {path!r} must be an int or None; got {r!r}")
        r = int(r)
        if problem.multiple and not budgeted and 1 <= r <= top:
            r = rank_lib.round_rank(r, problem.multiple, top=top, groups=layer.groups)
        if not 1 <= r <= top or r % layer.groups:
            raise ValueError(f"rank {r} is invalid for layer {path!r} (kernel "
                             f"{layer.kernel_shape}, groups {layer.groups}, max rank {top})")
        out[path] = r
    if measured:
        gated, _ = measured_gate([by_path[p].shape for p, r in out.items() if r is not None],
                                 {p: r for p, r in out.items() if r is not None},
                                 batch=measure_batch, runtime=measured)
        out.update(gated)
    return out


def measured_gate(layers, ranks: Mapping[str, int], *, batch: int = 1, repeats: int = 3,
                  dtype=jnp.float32, runtime: str = "jax"):
    """Keep a layer full rank where its pair is not faster on the current backend, or in the
    runtime the model is deployed to.

    Each decomposed layer is timed alone (forward) as a full conv and as a pair: jitted
    (``runtime="jax"``), or exported and run in ONNX Runtime / LiteRT
    (:func:`lrjax.timing.layer_times`).

    Returns:
      ``(ranks, times)``: the gated ranks (None = keep full rank) and
      ``{layer: (full s, pair s)}``.
    """
    times = timing.layer_times(layers, ranks, batch=batch, dtype=dtype, repeats=repeats,
                               runtime=runtime)
    gated = {}
    for name, rank in ranks.items():
        if name in times:
            full, pair = times[name]
            gated[name] = rank if pair < full else None
        else:
            gated[name] = rank
    return gated, times


# ---------------------------------------------------------------------------------------------
# Decomposition


@dataclasses.dataclass(frozen=True)
class SurgeryReport:
    """What a surgery did, layer by layer.

    Attributes:
      net: costs of every 2-D conv, full vs after (:class:`lrjax.costs.NetCost`).
      errors: relative kernel error ``||W - W_K|| / ||W||`` of each decomposed layer.
      weighted_errors: the calibration-weighted error (the output-error proxy) of each decomposed
        layer, when calibrated.
      skipped: ``{path: reason}`` of the convs left as they were because they cannot be split.
      calibrated: whether the factors are calibration-aware.
    """

    net: costs.NetCost
    errors: dict[str, float]
    weighted_errors: dict[str, float] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    calibrated: bool = False

    @property
    def ranks(self) -> dict[str, int]:
        return {lc.name: lc.rank for lc in self.net.layers if lc.rank is not None}

    def table(self) -> str:
        w = max([5] + [len(lc.name) for lc in self.net.layers]) + 2
        extra = "w.err" if self.calibrated else ""
        head = (f"{'layer':<{w}}{'kernel':>20}{'rank':>6}{'rel.err':>9}{extra:>9}"
                f"{'MACs before':>15}{'MACs after':>15}{'params before':>15}{'params after':>14}"
                f"{'speedup':>9}")
        rows = [head, "-" * len(head)]
        for lc in self.net.layers:
            err, werr = self.errors.get(lc.name), self.weighted_errors.get(lc.name)
            werr = ("-" if werr is None else f"{werr:.4f}") if self.calibrated else ""
            rows.append(
                f"{lc.name:<{w}}{str(lc.kernel_shape):>20}{lc.rank or 'full':>6}"
                f"{'-' if err is None else f'{err:.4f}':>9}{werr:>9}{lc.full.macs:>15,}"
                f"{lc.lowrank.macs:>15,}{lc.full.params:>15,}{lc.lowrank.params:>14,}"
                f"{lc.speedup:>8.2f}x")
        rows.append(f"{'total':<{w + 35 + (9 if self.calibrated else 0)}}"
                    f"{self.net.full_macs:>15,}{self.net.lowrank_macs:>15,}"
                    f"{self.net.full_params:>15,}{self.net.lowrank_params:>14,}"
                    f"{self.net.speedup:>8.2f}x")
        for path, reason in self.skipped.items():
            rows.append(f"left as is: {path}: {reason}")
        return "\n".join(rows)

    def as_dict(self) -> dict:
        return {
            "layers": [{"name": lc.name, "kernel": list(lc.kernel_shape), "rank": lc.rank,
                        "relative_error": self.errors.get(lc.name),
                        "weighted_error": self.weighted_errors.get(lc.name),
                        "macs_before": lc.full.macs, "macs_after": lc.lowrank.macs,
                        "params_before": lc.full.params, "params_after": lc.lowrank.params,
                        "speedup": lc.speedup} for lc in self.net.layers],
            "skipped": dict(self.skipped),
            "calibrated": self.calibrated,
            "macs_before": self.net.full_macs, "macs_after": self.net.lowrank_macs,
            "theoretical_speedup": self.net.speedup,
        }


def build_report(sites: Sequence[ConvSite], ranks: Mapping[str, int | None],
                 factors: Mapping[str, decompose.Factors], kernels: Mapping[str, Any],
                 covariances: Mapping[str, Any] | None) -> SurgeryReport:
    """The report of a surgery (shared by the linen and NNX routes)."""
    chosen = {p: r for p, r in ranks.items() if r is not None}
    shapes = [s.shape for s in sites if s.shape is not None]
    existing = {s.path: s.rank for s in sites if s.rank is not None}
    net = costs.net_cost(shapes, {**existing, **chosen})
    groups = {s.path: s.shape.groups for s in sites if s.shape is not None}
    errors, weighted = {}, {}
    for path in chosen:
        approx = decompose.reconstruct(*factors[path], groups=groups[path])
        errors[path] = float(decompose.relative_error(jnp.asarray(kernels[path]), approx))
        if covariances is not None:
            weighted[path] = float(decompose.weighted_relative_error(
                kernels[path], approx, covariances[path], groups=groups[path]))
    skipped = {s.path: s.skip for s in sites
               if s.skip is not None and not s.skip.startswith("1x1")}
    return SurgeryReport(net, errors, weighted, skipped, covariances is not None)


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """The result of :func:`decompose_linen`.

    Attributes:
      module: a :class:`LowRankModel`; ``module.apply(variables, *args, **kwargs)`` takes what
        ``model.apply`` took.
      variables: its variables (the original ones, with the decomposed convs' factors).
      report: per-layer ranks, errors, multiply-adds and parameters (:class:`SurgeryReport`).
    """

    module: LowRankModel
    variables: dict
    report: SurgeryReport

    @property
    def ranks(self) -> dict[str, int]:
        return dict(self.module.ranks)


def _kernels(flat, sites) -> dict[str, np.ndarray]:
    out = {}
    for s in sites:
        key = ("params", *s.path.split("/"), "kernel")
        if key not in flat:
            raise ValueError(f"variables have no kernel for conv {s.path!r} ({'/'.join(key)})")
        kernel = np.asarray(flat[key], np.float32)
        if kernel.shape != s.shape.kernel_shape:
            raise ValueError(f"{'/'.join(key)} has shape {kernel.shape}; the model's conv "
                             f"expects {s.shape.kernel_shape}")
        out[s.path] = kernel
    return out


def rank_problem(model: nn.Module, variables, example_args, example_kwargs, *,
                 calibration=None, multiple: int | None = None, sites=None,
                 score=None) -> RankProblem:
    """The :class:`RankProblem` of a linen model and its variables (calibrated if asked)."""
    sites = find_convs(model, *example_args, **example_kwargs) if sites is None else sites
    flat = _flat(variables)
    candidates = [s for s in sites if s.candidate]
    kernels = _kernels(flat, candidates)
    covs = None
    if calibration is not None:
        covs = calibration_moments(model, variables, calibration, [s.path for s in candidates],
                                   example_kwargs)
    return RankProblem(sites, kernels, covs, multiple, score)


def _apply_factors(flat, problem: RankProblem, ranks, batch: bool = True) -> tuple[dict, dict]:
    """Replace each decomposed conv's kernel/bias in a flat variable dict by its factors."""
    out, factors = dict(flat), {}
    chosen = {p: r for p, r in ranks.items() if r is not None}
    plain = {p: r for p, r in chosen.items() if batch and problem.covariances is None
             and ("factors", p) not in problem._cache}
    if plain:  # many layers, data-free: decompose_net runs them on parallel host threads
        groups = {p: problem.site(p).shape.groups for p in plain}
        factors.update(decompose.decompose_net(
            {p: jnp.asarray(problem.kernels[p]) for p in plain}, plain, groups=groups))
    for path, rank in chosen.items():
        if path not in factors:
            factors[path] = problem.factors(path, rank)
        prefix = ("params", *path.split("/"))
        bias = out.pop((*prefix, "bias"), None)
        del out[(*prefix, "kernel")]
        out[(*prefix, "vertical", "kernel")] = factors[path].vertical
        out[(*prefix, "horizontal", "kernel")] = factors[path].horizontal
        if bias is not None:
            out[(*prefix, "horizontal", "bias")] = bias
    return out, factors


def linen_scorer(model: nn.Module, variables, problem: RankProblem, eval_fn):
    """``score(ranks) = eval_fn(module, variables)`` of the model decomposed with ``ranks``
    (factors from ``problem``'s cache), for eval-guided rank selection."""
    flat = _flat(variables)

    def score(ranks):
        new_flat, _ = _apply_factors(flat, problem, ranks, batch=False)
        return float(eval_fn(LowRankModel.wrap(model, ranks),
                             traverse_util.unflatten_dict(new_flat)))

    return score


def decompose_linen(model: nn.Module, variables, *example_args, rule, calibration=None,
                    multiple: int | None = None, measure_batch: int = 1,
                    **example_kwargs) -> Decomposition:
    """Compress any linen model: its decomposable convs become vertical/horizontal pairs.

    No change to the model's code is needed: every 2-D ``nn.Conv`` with a window larger than 1x1
    is a candidate wherever it sits (auto-named, in submodules, created in ``@nn.compact``);
    convs that cannot be split (input dilation, masks, subclasses of ``nn.Conv``) are left as
    they are and listed in the report with the reason.

    Args:
      model: the full-rank linen module.
      variables: its variables (``{"params": ..., "batch_stats": ..., ...}``).
      *example_args, **example_kwargs: an example call of ``model.apply`` after the variables
        (e.g. ``images, train=False``); arrays or ``jax.ShapeDtypeStruct``\\s, traced only.
      rule: the rank rule (:data:`RULE_HELP`), keyed by full module path.
      calibration: optional batch (or iterable of batches) of model inputs. The factors then
        minimise each layer's output error instead of its kernel error (see
        :func:`lrjax.decompose.vh_decompose`), and the ``energy:``/``speedup:`` rules use the
        calibrated spectra. ``None``: the exact data-free closed form.
      multiple: round ranks to multiples of this (hardware tiles).
      measure_batch: batch of ``+measured`` timings.

    Returns:
      A :class:`Decomposition` (``.module``, ``.variables``, ``.report``).

    Raises:
      ValueError: variables that do not match the model, a bad rule (unknown layer, rank out of
        range), or bad calibration data (empty, NaN/Inf).
    """
    if isinstance(model, LowRankModel):
        raise ValueError("decompose_linen takes the full-rank model, not a LowRankModel")
    check_variables(model, variables, *example_args, **example_kwargs)
    problem = rank_problem(model, variables, example_args, example_kwargs,
                           calibration=calibration, multiple=multiple)
    if getattr(rule, "eval_fn", None) is not None:
        problem.score = linen_scorer(model, variables, problem, rule.eval_fn)
    ranks = select_ranks(rule, problem, measure_batch=measure_batch)
    flat, factors = _apply_factors(_flat(variables), problem, ranks)
    module = LowRankModel.wrap(model, ranks)
    expected = _flat(_abstract_init(module, example_args, example_kwargs))
    problems = _structure_problems(expected, flat)
    if problems:  # a bug, not a user error: the two structures are built from the same sites
        raise AssertionError("decomposed variables do not match the low-rank model: "
                             + "; ".join(problems))
    new_variables = traverse_util.unflatten_dict(
        {k: jnp.asarray(v, expected[k].dtype) for k, v in flat.items()})
    report = build_report(problem.sites, ranks, factors, problem.kernels, problem.covariances)
    return Decomposition(module, new_variables, report)
