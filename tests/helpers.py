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
