"""Helpers shared by the tests."""

import functools

import jax

# XLA:CPU's older loop emitters instead of its fusion emitters: the same results, compiled
# 15-25% faster (the suite's flags, tests/conftest.py)
LOOP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


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


def lowered_flops(fn, *args) -> float:
    """XLA's flop count of ``jax.jit(fn)`` lowered for ``args``, before compilation (the count
    lrjax's whole-net cost equals; compilation's fusions move it by a few element-wise ops)."""
    return jax.jit(fn).lower(*args).cost_analysis()["flops"]


def after_each_step(setup, hook):
    """``lrjax.train.setup`` whose runs call ``hook(step)`` (the global step, an int) right after
    each train step: how tests preempt or kill a run at a given step (the training loop itself
    has no test hook)."""

    @functools.wraps(setup)
    def hooked_setup(*args, **kwargs):
        run = setup(*args, **kwargs)
        train_step = run.train_step

        def step_then_hook(state, batch, metrics):
            state, metrics = train_step(state, batch, metrics)
            hook(int(state.step))
            return state, metrics

        run.train_step = step_then_hook
        return run

    return hooked_setup
