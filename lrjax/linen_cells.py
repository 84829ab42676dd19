"""Flax linen layers run as the layers they compute with, so that their products can be split:
``nn.OptimizedLSTMCell`` concatenates the kernels of its eight ``DenseParams`` (``ii``, ``if``,
``ig``, ``io`` without bias, ``hi`` ... ``ho`` with) into one matrix per side; run under
:func:`as_sublayers` it computes what ``nn.LSTMCell`` computes, with ``nn.Dense`` layers of the
same names over the same variables, which lrjax finds, costs, calibrates and splits as any dense
layer. Its variables are the cell's own, unchanged; the outputs agree to float32 rounding (the
gates' products summed in another order). An ``nn.DenseGeneral`` with one batch dim (one kernel
per index of the input's first axis: a DDPM U-Net's residual projections) runs as the
``nn.Einsum`` it is, ``'bc,bcf->bf'`` with its other axes written out, over the same variables
(initialized as Flax initializes them): a batch of kernels, each split alike.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax.numpy as jnp
from flax.linen import meta

from lrjax import einsums, linen_bridge, linen_products, linen_trace, linen_unbound, linen_written

__all__ = ["as_sublayers"]

_GATES = "ifgo"


def _tuple(value) -> tuple:
    """A layer's ``features`` / ``axis`` / ``batch_dims`` field (an int or a sequence) as a
    tuple."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _flat_init(init, n_out: int | None):
    """``DenseGeneral``'s initializer of a kernel of ``n_out`` output axes (``None``: a bias):
    ``init`` on the ``(rows, outputs)`` matrix (a bias: flat), reshaped."""
    def made(key, shape, dtype=jnp.float32):
        flat = (math.prod(shape),) if n_out is None else (math.prod(shape[:-n_out]),
                                                           math.prod(shape[-n_out:]))
        value = init(key, flat, dtype)
        if isinstance(value, meta.AxisMetadata):
            return meta.replace_boxed(value, jnp.reshape(value.unbox(), shape))
        return jnp.reshape(value, shape)

    return made


def _batched_dense_as_einsum(next_fun, args, kwargs, context):
    """An interceptor: ``nn.DenseGeneral(batch_dims=(0,))`` as the ``nn.Einsum`` it computes."""
    layer = context.module
    if type(layer) is not nn.DenseGeneral or context.method_name != "__call__" or kwargs or \
            len(args) != 1 or len(_tuple(layer.batch_dims)) != 1 or \
            layer.dot_general is not None or layer.dot_general_cls is not None:
        return next_fun(*args, **kwargs)
    x, features = args[0], _tuple(layer.features)
    equation = einsums.batched_dense_equation(x.ndim, layer.axis, len(features))
    if equation is None:  # (Flax refuses it)
        return next_fun(*args, **kwargs)
    axis = einsums.contracted_axes(x.ndim, layer.axis)
    kernel = (x.shape[0], *(x.shape[i] for i in axis), *features)
    return nn.Einsum(kernel, equation,
                     use_bias=layer.use_bias, dtype=layer.dtype, param_dtype=layer.param_dtype,
                     precision=layer.precision,
                     kernel_init=_flat_init(layer.kernel_init, len(features)),
                     bias_init=_flat_init(layer.bias_init, None),
                     parent=layer.scope)(x)


def _lstm_as_dense(next_fun, args, kwargs, context):
    """An interceptor: ``nn.OptimizedLSTMCell.__call__`` as ``nn.LSTMCell``'s computation."""
    cell = context.module
    if type(cell) is not nn.OptimizedLSTMCell or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    if kwargs or len(args) != 2:
        return next_fun(*args, **kwargs)
    (c, h), inputs = args
    features = h.shape[-1]

    def dense(name: str, x, recurrent: bool):
        return nn.Dense(features, use_bias=recurrent, dtype=cell.dtype,
                        param_dtype=cell.param_dtype,
                        kernel_init=cell.recurrent_kernel_init if recurrent else cell.kernel_init,
                        bias_init=cell.bias_init, name=name, parent=cell)(x)

    # each gate's input product then its recurrent one, created in the cell's own order
    pre = {}
    for gate in _GATES:
        pre[gate] = dense(f"i{gate}", inputs, False)
        pre[gate] = pre[gate] + dense(f"h{gate}", h, True)
    i, f, o = (cell.gate_fn(pre[g]) for g in "ifo")
    g = cell.activation_fn(pre["g"])
    new_c = f * c + i * g
    new_h = o * cell.activation_fn(new_c)
    return (new_c, new_h), new_h


@contextlib.contextmanager
def as_sublayers():
    """Within it, the layers of this module run as their sublayers (``nn.OptimizedLSTMCell`` as
    its gates' ``nn.Dense`` layers), dense layers written by hand as ``nn.Dense``
    (:mod:`lrjax.linen_written`), an NNX module's Flax layers inside ``nnx.bridge.ToLinen`` as
    linen layers (:mod:`lrjax.linen_bridge`), and products a module's own code computes with its
    parameters as Flax layers (:mod:`lrjax.linen_products`), and ``nn.jit``-ed methods traced
    at every call (:func:`lrjax.linen_trace.retraced_lifted_jit`), and unbound copies applied
    apart named by their place in the model (:mod:`lrjax.linen_unbound`); usable as a
    decorator."""
    # (the first one entered is the outermost: a dense layer written by hand runs as nn.Dense
    # before its call could be traced as a written product)
    with linen_trace.retraced_lifted_jit(), linen_unbound.marking_unbind(), \
            nn.intercept_methods(linen_bridge.as_linen_layers), \
            nn.intercept_methods(linen_written.as_dense), \
            nn.intercept_methods(linen_products.as_layer), nn.intercept_methods(_lstm_as_dense), \
            nn.intercept_methods(_batched_dense_as_einsum):
        yield
