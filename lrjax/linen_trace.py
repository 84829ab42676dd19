"""Tracing a linen model abstractly on its example call: the inputs split into traced arrays and
static values (:func:`split_static`), ``model.init`` under ``jax.eval_shape`` (:func:`abstract_init`,
optionally under a method interceptor), the one-line message for a model that cannot be traced
(:func:`untraceable`), and a model ``nn.jit``-ed as a whole seen as the plain module it wraps
(:func:`unjitted`)."""

from __future__ import annotations

import dataclasses
import os
import re
import traceback

import flax.linen as nn
import jax
import numpy as np

__all__ = ["layer_input", "split_static", "init_rngs", "abstract_init", "untraceable",
           "unjitted"]


def layer_input(args, kwargs):
    """A layer call's input: its first argument (or ``inputs=`` / ``x=``)."""
    return args[0] if args else kwargs.get("inputs", kwargs.get("x"))


def split_static(args):
    """Array-like positional arguments (traced) and a function rebuilding the full list."""
    def is_array(a):
        return isinstance(a, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))

    flags = [is_array(a) for a in args]
    arrays = [a for a, f in zip(args, flags, strict=True) if f]

    def rebuild(traced):
        it = iter(traced)
        return [next(it) if f else a for a, f in zip(args, flags, strict=True)]

    return arrays, rebuild


def init_rngs():
    """The keys ``abstract_init`` initializes with (parameters and dropout)."""
    key = jax.random.key(0)
    return {"params": key, "dropout": key}


def abstract_init(model: nn.Module, args, kwargs, interceptor=None):
    """``jax.eval_shape`` of ``model.init`` on the example inputs, under an optional interceptor."""
    arrays, rebuild = split_static(args)

    def trace(*traced):
        if interceptor is None:
            return model.init(init_rngs(), *rebuild(traced), **kwargs)
        with nn.intercept_methods(interceptor):
            return model.init(init_rngs(), *rebuild(traced), **kwargs)

    try:
        return jax.eval_shape(trace, *arrays)
    except jax.errors.ConcretizationTypeError as e:
        raise ValueError(untraceable(e)) from None


def untraceable(error: Exception) -> str:
    """The one-line message for a model whose call cannot be traced (it needs a concrete value
    of a traced array: ``.item()``, ``float()``, Python control flow on values), naming the
    model's own source line."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not re.search(r"[/\\](jax|jaxlib|flax|lrjax)[/\\]", f.filename)]
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} " \
            f"({frames[-1].line})" if frames else ""
    return (f"the model cannot be traced (lrjax finds its layers and counts its cost with "
            f"jax.eval_shape and jax.jit, as jax.jit(model.apply) would): it needs a concrete "
            f"value of a traced array{where} ({type(error).__name__}); compute such values from "
            "static fields or with NumPy")


def unjitted(model: nn.Module) -> nn.Module:
    """``nn.jit(Net)(...)`` as ``Net(...)`` with the same fields (the same variables and
    computation); any other model as it is.

    ``nn.jit`` on the whole model caches its trace per model: a second call with the same
    shapes runs the cached trace, so lrjax's method interceptors (which find the layers, mark
    their work and gather their statistics) would see none of its layers. ``nn.jit`` on a
    submodule re-traces with its parent and needs nothing."""
    cls = type(model)
    if cls.__module__ != nn.transforms.__name__ or not cls.__name__.startswith("Jit") or \
            len(cls.__mro__) < 2 or not issubclass(cls.__mro__[1], nn.Module):
        return model
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.init and f.name != "parent"}
    return cls.__mro__[1](**fields)
