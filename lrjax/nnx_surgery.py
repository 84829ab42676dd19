"""Compress Flax NNX models: :func:`decompose_nnx`.

The NNX counterpart of :func:`lrjax.decompose_linen`, with the same rank rules, calibration and
report: every ``nnx.Conv`` with a 2-D window larger than 1x1 is a candidate wherever it sits
(attributes, ``nnx.List``, ``nnx.Sequential``), named by its graph path joined with ``/``
(``blocks/1/conv1``, ``seq/layers/0``). The result (a :class:`lrjax.report.Decomposition`) holds a
copy of the model whose decomposed convs are :class:`LowRankConvNNX` pairs; the original is left
untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrjax import costs, decompose, formulations, macs, rules
from lrjax.costs import as_pair
from lrjax.layers import conv_skip_reason, split_padding
from lrjax.report import Decomposition, build_report
from lrjax.rules import ConvSite, RankProblem

__all__ = ["LowRankConvNNX", "decompose_nnx", "find_convs_nnx"]


class LowRankConvNNX(nnx.Module):
    """A vertical ``kh x 1`` ``nnx.Conv`` (no bias) followed by a horizontal ``1 x kw`` one."""

    def __init__(self, vertical: nnx.Conv, horizontal: nnx.Conv):
        self.vertical = vertical
        self.horizontal = horizontal

    def __call__(self, x):
        return self.horizontal(self.vertical(x))


def _path(path) -> str:
    return "/".join(str(p) for p in path)


class _Probe(nnx.Module):
    """Stands in for a conv while the model runs once: records its input (and moments)."""

    def __init__(self, conv: nnx.Conv, path: str, record: dict, moments: bool):
        self.conv = conv
        self.path = path
        self._record = record
        self._moments = moments

    def __call__(self, x, *args, **kwargs):
        if self.path not in self._record["shapes"]:
            self._record["shapes"][self.path] = tuple(x.shape)
        if self._moments and self.path in self._record["wanted"] \
                and self.path not in self._record["seen"]:
            self._record["seen"].add(self.path)
            conv = self.conv
            s, n = _moments(x.reshape((-1, *x.shape[-3:])), tuple(conv.kernel_size),
                            as_pair(conv.strides), _padding_key(conv.padding),
                            as_pair(conv.kernel_dilation), conv.feature_group_count)
            sums = self._record["sums"]
            sums[self.path] = sums.get(self.path, 0.0) + np.asarray(s, np.float64)
            self._record["counts"][self.path] = self._record["counts"].get(self.path, 0.0) \
                + float(n)
        return self.conv(x, *args, **kwargs)


def _padding_key(padding):
    """A hashable form of a padding (for the jitted moments)."""
    if isinstance(padding, (str, int)):
        return padding
    return tuple(p if isinstance(p, int) else tuple(p) for p in padding)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _moments(x, kernel_size, strides, padding, dilation, groups):
    return decompose.patch_moments(x, kernel_size, strides=strides, padding=padding,
                                   dilation=dilation, groups=groups)


EVAL_NOTE = ("layers found and calibrated on an eval view of the model (batch norm on its "
             "running statistics, dropout off)")


def eval_view(model):
    """An eval-mode view of an NNX model: batch norm on its running statistics, dropout off
    (the model itself is unchanged)."""
    return nnx.view(model, deterministic=True, use_running_average=True,
                    raise_if_not_found=False)


def _run_probed(model, batches, wanted: Sequence[str] = (), kwargs=None, eval_mode=True):
    """Run a copy of ``model`` (an eval view of it with ``eval_mode``) with every ``nnx.Conv``
    (and subclass) and ``nnx.ConvTranspose`` behind a probe."""
    record = {"shapes": {}, "sums": {}, "counts": {}, "wanted": set(wanted), "seen": set()}
    convs = {}

    def probe(path, node):
        if isinstance(node, (nnx.Conv, nnx.ConvTranspose)):
            name = _path(path)
            convs[name] = node
            return _Probe(node, name, record, bool(wanted))
        return node

    probed = nnx.recursive_map(probe, nnx.clone(model))
    if eval_mode:
        probed = eval_view(probed)
    for args in batches:
        record["seen"] = set()
        probed(*args, **(kwargs or {}))
    return convs, record


def find_convs_nnx(model, *example_args, eval_mode: bool = True,
                   **example_kwargs) -> list[ConvSite]:
    """Every ``nnx.Conv`` (and ``nnx.ConvTranspose``, listed as not decomposed) the model calls
    on the example inputs, in call order; run on an eval view of a copy with ``eval_mode``."""
    convs, record = _run_probed(model, [tuple(example_args)], kwargs=example_kwargs,
                                eval_mode=eval_mode)
    sites = []
    for path, shape in record["shapes"].items():
        conv = convs[path]
        if isinstance(conv, nnx.ConvTranspose):
            sites.append(ConvSite(path, None, skip="ConvTranspose: a transposed conv (not "
                                                   "decomposed)"))
            continue
        reason = conv_skip_reason(conv, nnx.Conv)
        if reason and reason.startswith("not a 2-D"):
            sites.append(ConvSite(path, None, skip=reason))
            continue
        sites.append(ConvSite(path, costs.ConvShape(
            name=path, input_hw=tuple(shape[-3:-1]), in_channels=int(shape[-1]),
            out_channels=int(conv.out_features), kernel_size=tuple(conv.kernel_size),
            strides=as_pair(conv.strides), padding=conv.padding,
            dilation=as_pair(conv.kernel_dilation), groups=int(conv.feature_group_count),
            use_bias=bool(conv.use_bias)), skip=reason))
    return sites


def _pair_module(conv: nnx.Conv, factors: decompose.Factors) -> LowRankConvNNX:
    """A :class:`LowRankConvNNX` computing ``conv`` with the given factors."""
    kh, kw = tuple(conv.kernel_size)
    sh, sw = as_pair(conv.strides)
    dh, dw = as_pair(conv.kernel_dilation)
    pad_v, pad_h = split_padding(conv.padding)
    rank = int(factors.vertical.shape[-1])
    common = dict(feature_group_count=conv.feature_group_count, dtype=conv.dtype,
                  param_dtype=conv.param_dtype, precision=conv.precision,
                  conv_general_dilated=formulations.conv_general_dilated, rngs=nnx.Rngs(0))
    vertical = nnx.Conv(conv.in_features, rank, (kh, 1), strides=(sh, 1), padding=pad_v,
                        kernel_dilation=(dh, 1), use_bias=False, **common)
    horizontal = nnx.Conv(rank, conv.out_features, (1, kw), strides=(1, sw), padding=pad_h,
                          kernel_dilation=(1, dw), use_bias=conv.use_bias, **common)
    vertical.kernel[...] = jnp.asarray(factors.vertical, conv.param_dtype)
    horizontal.kernel[...] = jnp.asarray(factors.horizontal, conv.param_dtype)
    if conv.use_bias:
        horizontal.bias[...] = conv.bias[...]
    return LowRankConvNNX(vertical, horizontal)


def _build(model, problem: RankProblem, ranks) -> tuple[nnx.Module, dict]:
    chosen = {p: r for p, r in ranks.items() if r is not None}
    factors = {p: problem.factors(p, r) for p, r in chosen.items()}

    def replace(path, node):
        name = _path(path)
        if type(node) is nnx.Conv and name in factors:
            return _pair_module(node, factors[name])
        return node

    return nnx.recursive_map(replace, nnx.clone(model)), factors


def _net_macs(model, example_args, example_kwargs, eval_mode) -> int | None:
    """Multiply-adds per example of the whole forward pass (traced on a copy), or ``None`` where
    the call cannot be traced abstractly (a training-mode call updating its own state)."""
    view = eval_view(nnx.clone(model)) if eval_mode else nnx.clone(model)
    arrays = [a for a in example_args if isinstance(a, (jax.Array, np.ndarray))]
    try:
        counts = macs.traced_macs(lambda *a: view(*a, **example_kwargs), *example_args)
    except Exception:  # noqa: BLE001 - then only the 2-D convs are counted, as before
        return None
    return counts["total"] // (int(arrays[0].shape[0]) if arrays and arrays[0].shape else 1)


def decompose_nnx(model: nnx.Module, *example_args, rule, calibration=None,
                  multiple: int | None = None, measure_batch: int = 1, eval_mode: bool = True,
                  **example_kwargs) -> Decomposition:
    """Compress a Flax NNX model: its decomposable ``nnx.Conv``\\s become vertical/horizontal pairs.

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

    Returns:
      A :class:`lrjax.report.Decomposition`: ``.module`` is a copy of ``model`` with the chosen
      convs replaced by :class:`LowRankConvNNX` pairs, ``.variables`` is ``None`` (the model
      carries its state), ``.report`` the per-layer report.

    Raises:
      ValueError: a bad rule (unknown layer, rank out of range), or bad calibration data.
    """
    rule = rules.parse_rule(rule, multiple=multiple)
    sites = find_convs_nnx(model, *example_args, eval_mode=eval_mode, **example_kwargs)
    graph = dict((_path(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Conv))
    candidates = [s.path for s in sites if s.candidate]
    kernels = {p: np.asarray(graph[p].kernel[...], np.float32) for p in candidates}
    covs = None
    if calibration is not None:
        batches = rules.calibration_batches(calibration)
        _, record = _run_probed(model, batches, candidates, example_kwargs, eval_mode)
        covs = {p: record["sums"][p] / record["counts"][p] for p in record["sums"]}
    problem = RankProblem(sites, kernels, covs, rule.multiple,
                          net_macs=_net_macs(model, example_args, example_kwargs, eval_mode))
    if rule.eval_fn is not None:
        problem.score = lambda ranks: float(rule.eval_fn(_build(model, problem, ranks)[0]))
    kept_full = {}
    ranks = rules.select_ranks(rule, problem, measure_batch=measure_batch, kept_full=kept_full)
    new_model, factors = _build(model, problem, ranks)
    report = build_report(problem, ranks, factors, kept_full, [EVAL_NOTE] if eval_mode else [])
    return Decomposition(new_model, None, report, problem)
