"""Model surgery: full-rank variables -> low-rank variables, and rank rules.

Generic over any Flax model whose convs come from lrjax's conv factory (``nn.Conv`` for full-rank
layers, :class:`~lrjax.layers.LowRankConv` for pairs): the low-rank model's own module tree, traced
with ``jax.eval_shape``, says which layers are pairs, their ranks and groups. Every other variable
is copied after a shape check.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lrjax import costs, decompose, timing
from lrjax import ranks as rank_lib
from lrjax.cost_report import conv_layers

__all__ = [
    "SurgeryReport", "to_lowrank", "select_ranks", "measured_gate", "check_variables", "RULE_HELP",
]

RULE_HELP = (
    "a rank rule: a shipped config (vgg16, caffenet, nin, cnn), a JSON file {layer: rank}, "
    "'energy:F' (keep fraction F of each layer's spectral energy) or 'speedup:S' (allocate ranks "
    "for a whole-net theoretical speedup S); append '+measured' to keep a layer full rank where "
    "the pair is not faster on this backend"
)


@dataclasses.dataclass(frozen=True)
class SurgeryReport:
    """What a surgery did, layer by layer."""

    net: costs.NetCost
    errors: dict[str, float]  # relative kernel error ||W - W_K|| / ||W|| of each decomposed layer

    def table(self) -> str:
        head = (f"{'layer':<12}{'kernel':>20}{'rank':>6}{'rel.err':>9}{'MACs before':>15}"
                f"{'MACs after':>15}{'params before':>15}{'params after':>14}{'speedup':>9}")
        rows = [head, "-" * len(head)]
        for lc in self.net.layers:
            err = self.errors.get(lc.name)
            rows.append(
                f"{lc.name:<12}{str(lc.kernel_shape):>20}{lc.rank or 'full':>6}"
                f"{'-' if err is None else f'{err:.4f}':>9}{lc.full.macs:>15,}"
                f"{lc.lowrank.macs:>15,}{lc.full.params:>15,}{lc.lowrank.params:>14,}"
                f"{lc.speedup:>8.2f}x")
        rows.append(f"{'total':<47}{self.net.full_macs:>15,}{self.net.lowrank_macs:>15,}"
                    f"{self.net.full_params:>15,}{self.net.lowrank_params:>14,}"
                    f"{self.net.speedup:>8.2f}x")
        return "\n".join(rows)

    def as_dict(self) -> dict:
        return {
            "layers": [{"name": lc.name, "kernel": list(lc.kernel_shape), "rank": lc.rank,
                        "relative_error": self.errors.get(lc.name),
                        "macs_before": lc.full.macs, "macs_after": lc.lowrank.macs,
                        "params_before": lc.full.params, "params_after": lc.lowrank.params,
                        "speedup": lc.speedup} for lc in self.net.layers],
            "macs_before": self.net.full_macs, "macs_after": self.net.lowrank_macs,
            "theoretical_speedup": self.net.speedup,
        }


def _flat(tree) -> dict[tuple[str, ...], object]:
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def _fold(flat_src, conv_path, bn_path, eps):
    """Fold the BN at ``bn_path`` into the conv at ``conv_path``; returns (kernel, bias)."""
    def get(collection, path, leaf):
        key = (collection, *path, leaf)
        if key not in flat_src:
            raise ValueError(f"cannot fold batch norm: {'/'.join(key)} is missing")
        return jnp.asarray(flat_src[key])

    kernel = get("params", conv_path, "kernel")
    bias_key = ("params", *conv_path, "bias")
    bias = jnp.asarray(flat_src[bias_key]) if bias_key in flat_src else None
    scale_key, offset_key = ("params", *bn_path, "scale"), ("params", *bn_path, "bias")
    return decompose.fold_batch_norm(
        kernel, bias,
        jnp.asarray(flat_src[scale_key]) if scale_key in flat_src else None,
        jnp.asarray(flat_src[offset_key]) if offset_key in flat_src else None,
        get("batch_stats", bn_path, "mean"), get("batch_stats", bn_path, "var"), eps)


def check_variables(model: nn.Module, variables, input_shape) -> None:
    """Raise ``ValueError`` unless ``variables`` has exactly the arrays (and shapes) of ``model``."""
    expected = _flat(jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32), train=False)))
    got = _flat(variables)
    missing = sorted("/".join(k) for k in expected if k not in got)
    extra = sorted("/".join(k) for k in got if k not in expected)
    wrong = sorted(f"{'/'.join(k)} {tuple(np.shape(got[k]))} (expected {tuple(v.shape)})"
                   for k, v in expected.items() if k in got and tuple(np.shape(got[k])) != v.shape)
    problems = [f"{what}: {items[:4]}{' ...' if len(items) > 4 else ''}"
                for what, items in (("missing", missing), ("unexpected", extra),
                                    ("wrong shape", wrong)) if items]
    if problems:
        raise ValueError("checkpoint does not match the model: " + "; ".join(problems))


def to_lowrank(
    full_variables,
    lowrank_model: nn.Module,
    input_shape,
    *,
    fold_bn: Mapping[str, str] | None = None,
    bn_epsilon: float = 1e-5,
    method: str = "auto",
) -> tuple[dict, SurgeryReport]:
    """Turn a full-rank model's variables into ``lowrank_model``'s.

    Each ``LowRankConv`` of ``lowrank_model`` gets the closed-form factors of the full conv at the
    same path (``vh_decompose`` with the pair's rank and groups): ``vertical/kernel``,
    ``horizontal/kernel`` and ``horizontal/bias`` = the original bias. A ``mid_norm`` between the
    two convs starts as the identity. Every other variable is copied.

    Args:
      full_variables: ``{"params": ..., "batch_stats": ...}`` of the full-rank model.
      lowrank_model: the same architecture built with a low-rank conv factory.
      input_shape: an NHWC input shape the model accepts (used for tracing only).
      fold_bn: ``{conv name: batch-norm name}`` to fold into the conv first; the folded norms must
        be absent from ``lowrank_model`` (their variables are dropped).
      bn_epsilon: epsilon of the folded norms.
      method: decomposition route (see ``vh_decompose``).

    Returns:
      ``(variables, SurgeryReport)``.

    Raises:
      ValueError: the variables do not match the model (missing, extra or mis-shaped arrays).
    """
    flat_src = _flat(full_variables)
    target = jax.eval_shape(
        lambda: lowrank_model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32),
                                   train=False))
    flat_tgt = _flat(target)
    layers = conv_layers(lowrank_model, input_shape)
    by_path = {layer.path: layer for layer in layers}
    pairs = {layer.path: layer for layer in layers if layer.rank is not None}

    used = set()
    kernels, biases = {}, {}
    for fold_conv, fold_bn_name in (fold_bn or {}).items():
        path = next((p for p in by_path if p[-1] == fold_conv), None)
        if path is None:
            raise ValueError(f"fold_bn names conv {fold_conv!r}, which the model does not have")
        bn_path = (*path[:-1], fold_bn_name)
        kernels[path], biases[path] = _fold(flat_src, path, bn_path, bn_epsilon)
        used.update(k for k in flat_src if k[1:len(bn_path) + 1] == bn_path
                    or k in (("params", *path, "kernel"), ("params", *path, "bias")))

    def source(key):
        if key not in flat_src:
            raise ValueError(f"checkpoint does not match the model: {'/'.join(key)} is missing")
        used.add(key)
        return flat_src[key]

    # decompose every pair at once
    to_decompose, groups = {}, {}
    for path, layer in pairs.items():
        name = "/".join(path)
        kernel = kernels.get(path)
        if kernel is None:
            kernel = source(("params", *path, "kernel"))
        if tuple(np.shape(kernel)) != layer.shape.kernel_shape:
            raise ValueError(f"checkpoint does not match the model: {name}/kernel has shape "
                             f"{tuple(np.shape(kernel))}, the model expects "
                             f"{layer.shape.kernel_shape}")
        to_decompose[name] = jnp.asarray(kernel, jnp.float32)
        groups[name] = layer.shape.groups
    factors = decompose.decompose_net(
        to_decompose, {"/".join(p): layer.rank for p, layer in pairs.items()}, groups=groups,
        method=method)

    out, errors = {}, {}
    for key, leaf in flat_tgt.items():
        collection, path = key[0], key[1:]
        pair_path = next((p for p in pairs if path[:len(p)] == p), None)
        if pair_path is not None:
            name, sub = "/".join(pair_path), path[len(pair_path):]
            f = factors[name]
            if collection == "params" and sub == ("vertical", "kernel"):
                value = f.vertical
            elif collection == "params" and sub == ("horizontal", "kernel"):
                value = f.horizontal
            elif collection == "params" and sub == ("horizontal", "bias"):
                value = biases.get(pair_path)
                if value is None:
                    value = source(("params", *pair_path, "bias"))
            elif sub and sub[0] == "mid_norm":  # identity norm to start
                value = jnp.ones(leaf.shape) if sub[-1] in ("scale", "var") else \
                    jnp.zeros(leaf.shape)
            else:
                raise ValueError(f"unexpected variable {'/'.join(key)} in low-rank layer {name}")
        elif collection == "params" and path[:-1] in biases and path[-1] in ("kernel", "bias"):
            value = (kernels if path[-1] == "kernel" else biases)[path[:-1]]
        else:
            value = source(key)
        if tuple(np.shape(value)) != tuple(leaf.shape):
            raise ValueError(f"checkpoint does not match the model: {'/'.join(key)} has shape "
                             f"{tuple(np.shape(value))}, the model expects {tuple(leaf.shape)}")
        out[key] = jnp.asarray(value, leaf.dtype)
    for path, layer in pairs.items():
        name = "/".join(path)
        w = to_decompose[name]
        errors[layer.shape.name] = float(decompose.relative_error(
            w, decompose.reconstruct(*factors[name], groups=layer.shape.groups)))
    consumed_pairs = {("params", *p, leaf) for p in pairs for leaf in ("kernel", "bias")}
    extra = sorted("/".join(k) for k in flat_src if k not in used and k not in consumed_pairs)
    if extra:
        raise ValueError(f"checkpoint does not match the model: unexpected variables {extra[:5]}"
                         + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    ranks = {layer.shape.name: layer.rank for layer in pairs.values()}
    net = costs.net_cost([layer.shape for layer in layers], ranks)
    return traverse_util.unflatten_dict(out), SurgeryReport(net, errors)


def _decomposable(layer: costs.ConvShape) -> bool:
    return layer.kernel_size != (1, 1)


def measured_gate(layers, ranks: Mapping[str, int], *, batch: int = 1, repeats: int = 3,
                  dtype=jnp.float32, implementations=("conv",)):
    """Keep a layer full rank where no pair implementation is faster on the current backend.

    Each decomposed layer is timed alone (forward, jitted) as a full conv and as a pair with each
    of ``implementations``; the fastest wins.

    Returns:
      ``(ranks, chosen, times)``: the gated ranks (None = keep full rank), the fastest
      implementation of each layer kept low-rank, and ``{layer: (full s, pair s, ...)}``.
    """
    times = timing.layer_times(layers, ranks, batch=batch, dtype=dtype, repeats=repeats,
                               implementations=implementations)
    gated, chosen = {}, {}
    for name, rank in ranks.items():
        if name not in times:
            gated[name] = rank
            continue
        full, *pairs = times[name]
        best = int(np.argmin(pairs))
        if pairs[best] < full:
            gated[name], chosen[name] = rank, implementations[best]
        else:
            gated[name] = None
    return gated, chosen, times


def select_ranks(rule, model: nn.Module, variables, input_shape, *, multiple: int | None = None,
                 measure_batch: int = 1) -> dict[str, int | None]:
    """Resolve a rank rule to ``{layer: rank}`` for a full-rank model and its variables.

    Args:
      rule: a ``{layer: rank}`` mapping or a string (see :data:`RULE_HELP`).
      model, variables, input_shape: the full-rank model, its variables and an NHWC input shape.
      multiple: round ranks to multiples of this (hardware tiles).
      measure_batch: batch size of the ``+measured`` timing.

    Raises:
      ValueError: an unknown rule, or ranks naming layers the model does not have (or 1x1 convs).
    """
    layers = [layer.shape for layer in conv_layers(model, input_shape)]
    by_name = {layer.name: layer for layer in layers}
    measured = False
    if isinstance(rule, str) and rule.endswith("+measured"):
        rule, measured = rule[: -len("+measured")], True
    if isinstance(rule, str) and rule == "measured":
        raise ValueError("'measured' gates another rule: use e.g. 'vgg16+measured'")

    flat = _flat(variables)

    def kernel(name):
        key = ("params", name, "kernel")
        if key not in flat:
            raise ValueError(f"variables have no kernel for layer {name!r}")
        return np.asarray(flat[key], np.float32)

    candidates = [layer for layer in layers if _decomposable(layer)]
    if isinstance(rule, Mapping):
        ranks = dict(rule)
    elif isinstance(rule, str) and rule.startswith("energy:"):
        frac = _number(rule, "energy:")
        ranks = {layer.name: rank_lib.energy_rank(kernel(layer.name), frac, groups=layer.groups,
                                                  multiple=multiple) for layer in candidates}
    elif isinstance(rule, str) and rule.startswith("speedup:"):
        target = _number(rule, "speedup:")
        alloc = rank_lib.allocate_ranks(
            candidates, {layer.name: kernel(layer.name) for layer in candidates},
            target_speedup=target, multiple=multiple)
        ranks = alloc.ranks
    elif isinstance(rule, str):
        ranks = rank_lib.load_ranks(rule)
    else:
        raise ValueError(f"unknown rank rule {rule!r}; expected {RULE_HELP}")
    unknown = sorted(set(ranks) - set(by_name))
    if unknown:
        raise ValueError(f"rank rule names unknown layers {unknown}; the model's convs are "
                         f"{sorted(by_name)}")
    for name, r in ranks.items():
        if r is None:
            continue
        layer = by_name[name]
        top = decompose.max_rank(layer.kernel_shape, groups=layer.groups)
        if multiple and isinstance(rule, (Mapping, str)) and not _is_budgeted(rule):
            r = rank_lib.round_rank(r, multiple, top=top, groups=layer.groups)
        if not 1 <= r <= top or r % layer.groups:
            raise ValueError(f"rank {r} is invalid for layer {name!r} (kernel "
                             f"{layer.kernel_shape}, groups {layer.groups}, max rank {top})")
        ranks[name] = r
    if measured:
        ranks, _, _ = measured_gate([by_name[n] for n in ranks if ranks[n] is not None],
                                    ranks, batch=measure_batch)
    return ranks


def _is_budgeted(rule) -> bool:
    return isinstance(rule, str) and rule.startswith(("energy:", "speedup:"))


def _number(rule: str, prefix: str) -> float:
    try:
        value = float(rule[len(prefix):])
    except ValueError:
        raise ValueError(f"bad rank rule {rule!r}: {prefix!r} must be followed by a number") \
            from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"bad rank rule {rule!r}: the number must be positive")
    return value
