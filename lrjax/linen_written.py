"""Dense layers written by hand in linen: a module of the user's own whose call computes
``x @ kernel + bias`` with its own ``self.param("kernel", ...)`` (and ``"bias"``), run as an
``nn.Dense`` over the same variables so that lrjax finds, costs, calibrates and splits it as
any dense layer (the linen counterpart of :mod:`lrjax.nnx_written`).

Inside :func:`lrjax.linen_cells.as_sublayers` (every stage of the linen surgery and every call of
a :class:`lrjax.layers.LowRankModel`), a module's ``__call__`` runs as ``nn.Dense(N,
use_bias=..., param_dtype=...)`` bound to the module's own scope when (1) it is not Flax's or
lrjax's, it is called with one floating array and nothing else, its ``__call__`` reads
``self.param`` and it has no ``setup`` (a layer declaring its parameters there runs its own
code); (2) initialized alone on that call's shape, its only variables are a 2-D ``params``
``kernel`` ``(C, N)`` (``C`` the input's last axis) and a ``bias`` ``(N,)`` or none; (3) on
random parameters and a random input of that shape it computes ``x @ kernel + bias`` (to a few
units of rounding, in ``nn.Dense``'s output dtype); or, its kernel in PyTorch's ``(N, C)``
layout, ``x @ kernel.T + bias`` (Hugging Face's GPT-2 ``FlaxConv1D``): then it runs as an
``nn.Einsum("...c,nc->...n")`` over the same variables. The verdict is formed in a thread of its
own (no interceptor, no trace) and kept per module configuration and input shape. Anything
else it computes (an activation, a scale) fails (3) and the module runs
its own code, its product found by :mod:`lrjax.linen_products` (or, if it is not one a Flax
layer computes, by :mod:`lrjax.own_code`, a fixed cost). A layer split on its one-array call
and then called with other arguments (``layer(x, train=True)``) runs its own code, with its
product as the pair, or raises ``ValueError`` naming it when that code needs the kernel it no
longer has (:mod:`lrjax.linen_products`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["as_dense", "dense_verdict"]

_VERDICTS: dict = {}


def _reads_param(module: nn.Module) -> bool:
    return _class_reads_param(type(module))


@functools.cache
def _class_reads_param(cls: type) -> bool:
    """Condition (1)'s cheap part, once per class: its ``__call__`` names ``param`` and it has
    no ``setup`` (parameters declared there hold their names in the scope the ``nn.Dense`` would
    take over)."""
    if cls.setup is not nn.Module.setup:
        return False
    code = getattr(inspect.unwrap(cls.__call__), "__code__", None)  # past Flax's wraps
    return code is not None and "param" in code.co_names


def _checked_or_none(layer, shape, dtype):
    try:
        return _checked(layer, shape, dtype)
    except Exception:  # noqa: BLE001 - it does not run as a dense layer would be run
        return None


def dense_verdict(module: nn.Module, shape, dtype) -> tuple | None:
    """``(features, use_bias, param_dtype, transposed)`` of a module computing ``x @ kernel +
    bias`` (``transposed``: ``x @ kernel.T + bias``) on an input of ``shape`` and ``dtype``
    (conditions (2) and (3)), else ``None``."""
    layer = module.clone(parent=None)
    shape = tuple(d if isinstance(d, (int, np.integer)) else 2 for d in shape)  # (a symbolic
    try:  # batch, as the exporters trace it: checked at 2)
        key = (type(module), repr(layer), tuple(shape), str(dtype))
        hash(key)
    except Exception:  # noqa: BLE001 - an unhashable configuration: checked every time
        key = None
    if key is not None and key in _VERDICTS:
        return _VERDICTS[key]
    # run as written in a thread of its own: Flax's method interceptors (the surgery's, which
    # record the model's calls) and JAX's trace state are the calling thread's
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        verdict = pool.submit(_checked_or_none, layer, tuple(shape), np.dtype(dtype)).result()
    if key is not None:
        _VERDICTS[key] = verdict
    return verdict


def _checked(layer: nn.Module, shape: tuple, dtype) -> tuple | None:
    made = jax.eval_shape(lambda x: layer.init(jax.random.key(0), x),
                          jax.ShapeDtypeStruct(shape, dtype))
    params = made.get("params", {})
    if set(made) != {"params"} or set(params) not in ({"kernel"}, {"kernel", "bias"}):
        return None
    kernel, bias = params["kernel"], params.get("bias")
    if getattr(kernel, "ndim", 0) != 2:
        return None
    layouts = [transposed for transposed in (False, True)  # (C, N), or PyTorch's (N, C)
               if kernel.shape[transposed] == shape[-1] and (
                   bias is None or tuple(getattr(bias, "shape", ())) == (
                       kernel.shape[not transposed],))]
    if not layouts:
        return None
    rng = np.random.default_rng(0)
    values = {"kernel": rng.standard_normal(kernel.shape).astype(kernel.dtype)}
    if bias is not None:
        values["bias"] = rng.standard_normal(bias.shape).astype(bias.dtype)
    x = rng.standard_normal(shape).astype(dtype)
    got = layer.apply({"params": values}, jnp.asarray(x))
    if getattr(got, "dtype", None) != jnp.result_type(dtype, *(v.dtype for v in values.values())):
        return None  # not what nn.Dense would compute in
    eps = float(jnp.finfo(got.dtype).eps)
    got = np.asarray(got, np.float64)
    for transposed in layouts:
        matrix = values["kernel"].astype(np.float64)
        want = x.astype(np.float64) @ (matrix.T if transposed else matrix)
        want = want + values["bias"].astype(np.float64) if bias is not None else want
        bound = 16 * eps * max(float(np.abs(want).max(initial=0.0)), 1.0) * np.sqrt(shape[-1])
        if got.shape == want.shape and np.all(np.abs(got - want) <= bound):
            return int(kernel.shape[not transposed]), bias is not None, kernel.dtype, transposed
    return None


def as_dense(next_fun, args, kwargs, context):
    """A method interceptor: a written dense layer's ``__call__`` as ``nn.Dense`` in its own
    scope (conditions above); every other call as it is."""
    module = context.module
    x = args[0] if len(args) == 1 else None
    if context.method_name != "__call__" or kwargs or \
            x is None or not hasattr(x, "shape") or not getattr(x, "ndim", 0) or \
            not jnp.issubdtype(getattr(x, "dtype", np.int32), jnp.floating) or \
            type(module).__module__.partition(".")[0] in ("flax", "lrjax") or \
            not _reads_param(module):
        return next_fun(*args, **kwargs)
    verdict = dense_verdict(module, x.shape, x.dtype)
    if verdict is None:
        return next_fun(*args, **kwargs)
    features, use_bias, param_dtype, transposed = verdict
    if transposed:  # the kernel's axes as stored, (N, C)
        return nn.Einsum((features, x.shape[-1]), "...c,nc->...n", use_bias=use_bias,
                         param_dtype=param_dtype, parent=module.scope)(x)
    return nn.Dense(features, use_bias=use_bias, param_dtype=param_dtype,
                    parent=module.scope)(x)
