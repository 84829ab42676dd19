"""Helpers shared by the tests."""

import functools
import itertools
import os

import jax
import numpy as np
import pytest

# XLA:CPU's older loop emitters instead of its fusion emitters: the same results, compiled
# 15-25% faster (the suite's flags, tests/conftest.py)
LOOP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def grid(*axes) -> list:
    """The product of ``axes`` as pytest params, each axis a list of values (a tuple of the test's
    arguments each): the default run takes as many combinations as the longest axis has values,
    the ``r``-th combination the ``r``-th value of each axis (cycling), so that every value of
    every axis runs; the other combinations are marked ``slow`` (CI's slow run covers the whole
    grid)."""
    default = {tuple(r % len(a) for a in axes) for r in range(max(map(len, axes)))}
    return [pytest.param(*itertools.chain.from_iterable(a[i] for a, i in zip(axes, idx, strict=True)),
                         marks=() if idx in default else pytest.mark.slow)
            for idx in itertools.product(*(range(len(a)) for a in axes))]


def normal(seed: int, shape) -> jax.Array:
    """Standard normal float32 data of ``shape``, drawn by NumPy: test modules draw their inputs
    at import, in every pytest-xdist worker, where ``jax.random.normal`` compiles one program per
    shape (~0.1 s each at the suite's flags)."""
    return jax.numpy.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


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


def whole_net_rule(model, variables, x, rule, calibration, tmp_path, onnx_input=None):
    """``rule`` applied to ``model`` data-free and calibrated on ``calibration`` (example input
    ``x``), each report's whole-net speedup checked against XLA's lowered ratio; the calibrated
    result exported to ONNX (checked against JAX, ``onnx_input``: ``(x,)`` by default) and saved
    and loaded (the same outputs). ``(free, fitted, the export's result)``, for the caller's
    own checks."""
    import lrjax
    from lrjax import export

    free = lrjax.decompose_linen(model, variables, x, rule=rule)
    fitted = lrjax.decompose_linen(model, variables, x, rule=rule, calibration=calibration)
    for result in (free, fitted):  # the whole net, as XLA counts it (nothing counted twice)
        assert result.report.speedup == pytest.approx(
            lowered_flops(model.apply, variables, x)
            / lowered_flops(result.module.apply, result.variables, x), rel=1e-6)
    done = export.to_onnx(fitted.module, fitted.variables,
                          (x,) if onnx_input is None else onnx_input,
                          os.path.join(tmp_path, "model.onnx"))
    assert done.max_abs_error <= 1e-5 * max(1.0, done.scale)
    lrjax.save_decomposed(os.path.join(tmp_path, "saved"), fitted)
    module, loaded = lrjax.load_decomposed(os.path.join(tmp_path, "saved"), model, x)
    np.testing.assert_array_equal(module.apply(loaded, x), fitted.module.apply(fitted.variables, x))
    return free, fitted, done


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
