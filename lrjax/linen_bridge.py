"""NNX modules a linen model runs through Flax's bridge (``nnx.bridge.to_linen(Block)``,
``nnx.bridge.ToLinen``), their Flax layers run as linen layers.

Within :func:`lrjax.linen_cells.as_sublayers` (every linen trace lrjax makes, and every call of
a :class:`lrjax.layers.LowRankModel`) a ``ToLinen`` wrapper runs as Flax's does (the NNX module
built with the wrapper's arguments and random streams, its state read from the wrapper's
variables, the method called, the state written back to the mutable collections) but for its
``nnx.Conv``, ``nnx.ConvTranspose``, ``nnx.Linear``, ``nnx.LinearGeneral`` (no batch axis) and
``nnx.Einsum`` (no bias) layers of Flax's own computation: each runs as the linen layer computing
the same (``nn.Conv``, ``nn.ConvTranspose``, ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``),
bound to the wrapper's scope at the layer's NNX path, so that its variables are where the
wrapper keeps them (``block/a/kernel``), initialized to the values the NNX layer was built with.
The linen surgery then sees them as any other linen layer: found, costed, calibrated and split
(``block/a/vertical/kernel``, ...), named ``{wrapper path}/{NNX path}`` (``block/a``).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
from flax import nnx
from flax.core import FrozenDict, meta
from flax.nnx.bridge import ToLinen
from flax.nnx.bridge import wrappers as bridge_wrappers
from flax.nnx.nn import dtypes as nnx_dtypes

__all__ = ["as_linen_layers", "string_keys"]


def _value(array, init):
    """An initializer returning ``array`` (the NNX layer's own initial value) at its shape, else
    ``init``'s (a pair's factors, made in the layer's scope with its initializers: their values
    are the factors')."""
    def initializer(key, shape, dtype=None):
        return array if tuple(shape) == array.shape else init(key, shape, dtype)

    return initializer


def _common(layer) -> dict:
    return {"dtype": layer.dtype, "param_dtype": layer.param_dtype, "precision": layer.precision,
            "kernel_init": _value(layer.kernel[...], nn.initializers.lecun_normal())}


def _bias(layer) -> dict:
    return {"use_bias": layer.bias is not None} | (
        {} if layer.bias is None else {"bias_init": _value(layer.bias[...], nn.initializers.zeros_init())})


def _linen_layer(layer):
    """The linen layer computing as the NNX ``layer`` (an unbound constructor), or ``None``."""
    if getattr(layer, "promote_dtype", None) is not nnx_dtypes.promote_dtype or \
            getattr(layer, "preferred_element_type", None) is not None:
        return None
    if type(layer) is nnx.Conv and layer.conv_general_dilated is jax.lax.conv_general_dilated:
        return lambda **k: nn.Conv(
            layer.out_features, layer.kernel_size, layer.strides, layer.padding,
            layer.input_dilation, layer.kernel_dilation, layer.feature_group_count,
            mask=layer.mask, **_common(layer), **_bias(layer), **k)
    if type(layer) is nnx.ConvTranspose:
        return lambda **k: nn.ConvTranspose(
            layer.out_features, layer.kernel_size, layer.strides, layer.padding,
            layer.kernel_dilation, mask=layer.mask, transpose_kernel=layer.transpose_kernel,
            **_common(layer), **_bias(layer), **k)
    if type(layer) is nnx.Linear and layer.dot_general is jax.lax.dot_general:
        return lambda **k: nn.Dense(layer.out_features, **_common(layer), **_bias(layer), **k)
    if type(layer) is nnx.LinearGeneral and not layer.batch_axis and \
            layer.dot_general is None and layer.dot_general_cls is None:
        return lambda **k: nn.DenseGeneral(layer.out_features, layer.axis, **_common(layer),
                                           **_bias(layer), **k)
    if type(layer) is nnx.Einsum and layer.bias is None and layer.einsum_op is jax.numpy.einsum:
        return lambda **k: nn.Einsum(layer.kernel_shape, layer.einsum_str, use_bias=False,
                                     **_common(layer), **k)
    return None


class _AsLinen(nnx.Module):
    """Stands in for an NNX layer: runs the linen layer bound at its path (attributes read from
    the NNX layer)."""

    def __init__(self, layer, linen_layer):
        self.layer, self.linen_layer = layer, linen_layer

    def __getattr__(self, name):
        if name.startswith("_") or name in ("layer", "linen_layer"):
            raise AttributeError(name)
        return getattr(self.layer, name)

    def __call__(self, *args, **kwargs):
        return self.linen_layer(*args, **kwargs)


def _scope_at(scope, path):
    for name in path:
        scope = scope.push(str(name), reuse=True)
    return scope


def _run(wrapper: ToLinen, args, kwargs):
    """``wrapper``'s call (Flax's ``ToLinen.__call__``) with its NNX module's Flax layers run as
    linen layers in its scope."""
    method = kwargs.pop("nnx_method", None)
    initializing = wrapper.is_initializing()
    module_kwargs = dict(wrapper.kwargs)
    if not wrapper.skip_rng:
        module_kwargs["rngs"] = nnx.Rngs(**bridge_wrappers.linen_rngs_dict(
            wrapper, add_default=not initializing))
    module = wrapper.nnx_class(*wrapper.args, **module_kwargs)
    if not initializing:
        unboxed = jax.tree.map(lambda x: x.unbox() if isinstance(x, meta.AxisMetadata) else x,
                               dict(wrapper.variables),
                               is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
        known = {tuple(map(str, p)): p for p in nnx.traversals.flatten_mapping(nnx.state(module))}
        given = {known[k]: v for col in unboxed.values()
                 for p, v in nnx.traversals.flatten_mapping(col).items()
                 if (k := tuple(map(str, p))) in known}
        nnx.update(module, nnx.traversals.unflatten_mapping(given))

    def as_linen(path, node):
        make = _linen_layer(node)  # (the wrapper's module itself: bound to its own scope)
        if make is None:
            return node
        return _AsLinen(node, make(parent=_scope_at(wrapper.scope, path)))

    module = nnx.recursive_map(as_linen, module)
    call = bridge_wrappers._get_module_method(module, method)  # noqa: SLF001 - Flax's lookup
    out = call(module, *args, **kwargs)
    state = nnx.state(module, nnx.Not(nnx.RngState))
    for path, leaf in nnx.to_flat_state(state):
        collection = nnx.variablelib.variable_name_from_type(type(leaf), allow_register=True)
        if path and wrapper.is_mutable_collection(collection) and not _proxied(module, path):
            value = wrapper.metadata_fn(leaf) if wrapper.metadata_fn is not None else \
                leaf.get_value()
            _scope_at(wrapper.scope, path[:-1]).put_variable(collection, str(path[-1]), value)
    return out


def _proxied(module, path) -> bool:
    """Whether ``path`` is under a layer run as linen."""
    node = module
    for name in path:
        if isinstance(node, _AsLinen):
            return True
        node = node[name] if isinstance(node, (list, tuple, dict, nnx.List, nnx.Dict)) else \
            getattr(node, str(name), None)
    return isinstance(node, _AsLinen)


def as_linen_layers(next_fun, args, kwargs, context):
    """A linen interceptor: a ``ToLinen`` wrapper's call runs with its NNX Flax layers as linen
    layers (:func:`_run`)."""
    if isinstance(context.module, ToLinen) and context.method_name == "__call__":
        return _run(context.module, args, dict(kwargs))
    return next_fun(*args, **kwargs)


def string_keys(tree):
    """A variable tree with every key a string: Flax's ``ToLinen`` keeps an ``nnx.List``'s
    layers under integer keys (``params/block/subs/0/...``), which linen scopes cannot name;
    lrjax runs such wrappers with string keys (:func:`as_linen_layers`)."""
    if not isinstance(tree, Mapping):
        return tree
    out = {str(k): string_keys(v) for k, v in tree.items()}
    return FrozenDict(out) if isinstance(tree, FrozenDict) else out
