"""Helpers shared by the tests."""

import functools

import jax


def init(model, seed: int, *args, **kwargs):
    """``model.init(jax.random.key(seed), *args, **kwargs)``, jitted: one compile instead of one
    per operation (the suite is compile-bound; arrays in ``args``, static values in ``kwargs``)."""
    return jax.jit(functools.partial(model.init, **kwargs))(jax.random.key(seed), *args)


def apply(module, variables, *args, **kwargs):
    """``module.apply(variables, *args, **kwargs)``, jitted (see :func:`init`)."""
    return jax.jit(functools.partial(module.apply, **kwargs))(variables, *args)


def xla_flops(fn, *args) -> float:
    """XLA's own flop count of ``jax.jit(fn)`` compiled for ``args``
    (``cost_analysis()["flops"]``): what lrjax's whole-net cost is checked against."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
