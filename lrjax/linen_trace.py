"""Tracing a linen model abstractly on its example call: the inputs split into traced arrays and
static values (:func:`split_static`), ``model.init`` under ``jax.eval_shape`` (:func:`abstract_init`,
optionally under a method interceptor), the one-line message for a model that cannot be traced
(:func:`untraceable`) and the retry that evaluates a model's computations on constants while tracing
(:func:`constants_evaluated`), a model ``nn.jit``-ed as a whole seen as the plain module it wraps
(:func:`unjitted`), ``nn.jit``-ed methods traced afresh at every call
(:func:`retraced_lifted_jit`), and the modules an error came out of (:func:`raising_modules`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import re
import threading
import traceback

import flax
import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax._src import config as jax_config

__all__ = ["layer_input", "split_static", "split_static_call", "init_rngs", "abstract_init",
           "known_variables", "knowing_variables", "Untraceable", "untraceable",
           "constants_evaluated", "compile_time_constants", "with_constants_evaluated",
           "evaluating_constants", "unjitted", "retraced_lifted_jit", "raising_modules",
           "TRAINING_FLAGS"]

# a model's (or module's) own mode flags and the value of each that means training mode
# (``Generator(training=True)``; ``training``: PyTorch's, kept by ports of its models)
TRAINING_FLAGS = {"train": True, "training": True, "is_training": True, "deterministic": False,
                  "use_running_average": False}


def layer_input(args, kwargs):
    """A layer call's input: its first argument (or ``inputs=`` / ``x=``)."""
    return args[0] if args else kwargs.get("inputs", kwargs.get("x"))


def split_static(args):
    """Array-like positional arguments (traced: arrays, or pytrees of arrays such as NaFlex's
    ``(patches, types, rows, columns)``) and a function rebuilding the full list."""
    def is_array(a):
        leaves = jax.tree.leaves(a)
        return bool(leaves) and all(isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))
                                    for x in leaves)

    flags = [is_array(a) for a in args]
    arrays = [a for a, f in zip(args, flags, strict=True) if f]

    def rebuild(traced):
        it = iter(traced)
        return [next(it) if f else a for a, f in zip(args, flags, strict=True)]

    return arrays, rebuild


def split_static_call(args, kwargs):
    """:func:`split_static` of a call's positional and keyword arguments together (keyword
    arrays traced as the positional ones): the arrays, and a function rebuilding ``(args,
    kwargs)`` from them."""
    n, names = len(args), list(kwargs)
    arrays, rebuild = split_static((*args, *kwargs.values()))

    def rebuilt(traced):
        values = rebuild(traced)
        return tuple(values[:n]), dict(zip(names, values[n:], strict=True))

    return arrays, rebuilt


def init_rngs():
    """The keys ``abstract_init`` initializes with (parameters and dropout)."""
    key = jax.random.key(0)
    return {"params": key, "dropout": key}


def abstract_init(model: nn.Module, args, kwargs, interceptor=None, with_output=False):
    """``jax.eval_shape`` of ``model.init`` on the example inputs, under an optional interceptor
    (``with_output``: of ``model.init_with_output``, ``(outputs, variables)``). The call's own
    ``rngs=`` (keys a model draws from at inference: MAE's random masking) join
    :func:`init_rngs`. A model whose init cannot run the call because its code reads variables
    an init has not made yet (a submodule's ``unbind()`` before that submodule ever ran: Octo's
    diffusion sampling) is traced as ``model.apply(variables, ..., mutable=True)`` on the
    variables given it by :func:`known_variables`, which returns the same."""
    kwargs = dict(kwargs)
    given = kwargs.pop("rngs", None)
    rngs = {**init_rngs(), **(given if isinstance(given, dict) else
                              {} if given is None else {"params": given})}
    arrays, rebuild = split_static_call(args, kwargs)  # (given as shapes too)

    init = model.init_with_output if with_output else model.init

    def call(fn, first, traced, **more):
        values, keywords = rebuild(traced)
        with nn.intercept_methods(interceptor) if interceptor else contextlib.nullcontext():
            return fn(first, *values, **keywords, **more)

    def trace(rngs, *traced):  # the keys traced too: no initializer runs on concrete values
        return as_jax_types(call(init, rngs, traced))

    def applied(variables, rngs, *traced):
        out, made = call(model.apply, variables, traced, rngs=rngs,
                         mutable=flax.core.DenyList("intermediates"))  # (as init)
        return as_jax_types((out, made) if with_output else made)

    try:
        try:
            return jax.eval_shape(trace, rngs, *arrays)
        except (flax.errors.ScopeCollectionNotFound, flax.errors.ScopeParamNotFoundError) as e:
            variables = next((v for m, v in reversed(_KNOWN) if m is model), None)
            if variables is None:
                raise ValueError(
                    f"{type(model).__name__}'s init cannot run the example call: "
                    f"{str(e).split(' (https')[0]} (its code reads variables an init has not "
                    "made yet, e.g. a submodule's unbind() before that submodule ever ran); "
                    "give its variables: decompose_linen(model, variables, ...) traces it on "
                    "them") from None
            return jax.eval_shape(applied, variables, rngs, *arrays)
    except jax.errors.ConcretizationTypeError as e:
        raise Untraceable(untraceable(e)) from None


_KNOWN: list[tuple[nn.Module, object]] = []  # (model, its variables), innermost last


def knowing_variables(fn):
    """``fn(model, variables, ...)`` run within :func:`known_variables` of them (the model
    unjitted too)."""
    @functools.wraps(fn)
    def wrapper(model, variables, *args, **kwargs):
        with known_variables(model, variables), known_variables(unjitted(model), variables):
            return fn(model, variables, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def known_variables(model: nn.Module, variables):
    """Within it, :func:`abstract_init` of ``model`` may trace it on ``variables``."""
    entry = (model, variables)
    _KNOWN.append(entry)
    try:
        yield
    finally:  # (by identity: equal modules are not the same entry)
        del _KNOWN[next(i for i, k in enumerate(_KNOWN) if k is entry)]


def as_jax_types(tree):
    """``tree`` with each leaf that is no array or number (an object a method returns: diffusers'
    ``latent_dist``, a ``FlaxDiagonalGaussianDistribution``) as the dict of its array
    attributes, so that a trace may return it."""
    def leaf(value):
        if isinstance(value, (jax.Array, np.ndarray, np.generic, int, float, complex)) or \
                value is None:
            return value
        return {k: v for k, v in vars(value).items() if isinstance(v, jax.Array)} if hasattr(
            value, "__dict__") else None

    return jax.tree.map(leaf, tree)


class Untraceable(ValueError):
    """A model whose call cannot be traced (:func:`untraceable` gives the message)."""


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
            f"value of a traced array{where} ({type(error).__name__}); a value of the inputs or "
            "the weights needs jnp.where or lax.cond instead of Python control flow")


_RETRY = threading.local()


def _flax_layers_staged(next_fun, args, kwargs, context):
    """Flax's own layers traced as usual inside :func:`constants_evaluated`'s retry: each
    ``self.param`` checks its stored shape against ``jax.eval_shape`` of its initializer on a
    concrete key, which compile-time evaluation would run op by op (~15 ms an op)."""
    if type(context.module).__module__.startswith("flax."):
        with jax_config.eager_constant_folding(False):
            return next_fun(*args, **kwargs)
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def compile_time_constants():
    """``jax.ensure_compile_time_eval()`` for tracing a linen model whose call reads concrete
    values off constant arrays (``.item()`` of a ``jnp.linspace``), with Flax's own layers
    traced as usual: ``with compile_time_constants(): jax.jit(model.apply)(variables, x)``
    where plain ``jax.jit`` fails. Pass the weights (and ``init``'s keys) as arguments: what is
    closed over is concrete, and computed op by op."""
    with jax.ensure_compile_time_eval(), nn.intercept_methods(_flax_layers_staged):
        yield


def with_constants_evaluated(fn, *args):
    """``fn(*args)``, once more under :func:`compile_time_constants` if it needed a concrete
    value (a trace whose model reads ``.item()`` of constants; NNX's state passed as an argument
    stays traced)."""
    try:
        return fn(*args)
    except jax.errors.ConcretizationTypeError:
        with compile_time_constants():
            return fn(*args)


def evaluating_constants() -> bool:
    """Whether this is :func:`constants_evaluated`'s retry (then weights closed over by a
    traced function are concrete, and ops on them alone run as they are traced)."""
    return getattr(_RETRY, "active", False)


def constants_evaluated(fn):
    """``fn`` (an lrjax entry point that traces a linen model) run once more, with the model's
    computations on constants evaluated as it is traced, when its first run met a model whose
    call needs a concrete value.

    ``dpr = [x.item() for x in jnp.linspace(0, self.drop_path, sum(self.depths))]`` in a
    model's ``__call__`` (the stochastic-depth rates of timm's models and their Flax ports:
    VAN, PVT, Swin, SegFormer) runs eagerly but not under ``jax.jit`` or ``jax.eval_shape``,
    where every array is traced. Under ``jax.ensure_compile_time_eval()`` the arrays computed
    from constants only are concrete again, and the model is traced as ``model.apply`` runs it.
    A value that depends on the inputs or the weights cannot be: then :class:`Untraceable`,
    one line naming the model's source line."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if getattr(_RETRY, "depth", 0):  # inside another entry point: the outermost retries
            return fn(*args, **kwargs)
        _RETRY.depth = 1
        try:
            return fn(*args, **kwargs)
        except (jax.errors.ConcretizationTypeError, Untraceable):
            pass
        finally:
            _RETRY.depth = 0
        _RETRY.active, _RETRY.depth = True, 1
        try:
            with compile_time_constants():
                return fn(*args, **kwargs)
        except jax.errors.ConcretizationTypeError as e:
            raise Untraceable(untraceable(e)) from None
        finally:
            _RETRY.active, _RETRY.depth = False, 0

    return wrapper


def check_model_kind(model, kind: str) -> None:
    """Raise ``TypeError`` naming the entry point that takes ``model`` when it is not a
    ``kind`` (``"linen"``, ``"nnx"`` or ``"flax"``: either) module: an NNX model given to the
    linen API, a linen one to the NNX API, a Hugging Face ``FlaxPreTrainedModel`` (its
    ``.module`` is the linen module, ``{"params": model.params}`` its variables)."""
    wanted = {"linen": (nn.Module,), "nnx": (nnx.Module,), "flax": (nn.Module, nnx.Module)}
    if isinstance(model, wanted[kind]):
        return
    if isinstance(model, nnx.Module):
        hint = ("an NNX model: use lrjax's NNX API (lrjax.decompose_nnx(model, *example_args, "
                "rule=...), lrjax.nnx_surgery.find_convs_nnx)")
    elif isinstance(model, nn.Module):
        hint = ("a linen module: use lrjax's linen API (lrjax.decompose_linen(model, variables, "
                "*example_args, rule=...), lrjax.surgery.find_convs)")
    elif isinstance(getattr(model, "module", None), nn.Module) and hasattr(model, "params"):
        hint = ("a wrapper of a linen module (Hugging Face's FlaxPreTrainedModel): give lrjax "
                "its .module, with {'params': model.params} as its variables")
    else:
        hint = "not a Flax module (flax.linen or flax.nnx)"
    raise TypeError(f"{type(model).__name__} is {hint}")


def unjitted(model: nn.Module) -> nn.Module:
    """``nn.jit(Net)(...)`` as ``Net(...)`` with the same fields (the same variables and
    computation); any other model as it is (a ``TypeError`` if it is no linen module:
    :func:`check_model_kind`).

    ``nn.jit`` on the whole model caches its trace per model: a second call with the same
    shapes runs the cached trace, so lrjax's method interceptors (which find the layers, mark
    their work and gather their statistics) would see none of its layers. ``nn.jit`` on a
    submodule re-traces with its parent and needs nothing."""
    check_model_kind(model, "linen")
    cls = type(model)
    if cls.__module__ != nn.transforms.__name__ or not cls.__name__.startswith("Jit") or \
            len(cls.__mro__) < 2 or not issubclass(cls.__mro__[1], nn.Module):
        return model
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.init and f.name != "parent"}
    return cls.__mro__[1](**fields)


_PROXY = getattr(nn.transforms, "_HashableProxy", None)  # what nn.jit keys its traces on
_FROM_MODULE = getattr(_PROXY, "from_module", None)
_LIFTED = {"depth": 0, "lock": threading.Lock(), "calls": itertools.count()}


def _fresh_proxy(cls, module):
    proxy = _FROM_MODULE(module)
    return dataclasses.replace(proxy, hash_key=hash((proxy.hash_key, next(_LIFTED["calls"]))))


@contextlib.contextmanager
def retraced_lifted_jit():
    """Within it, every call of an ``nn.jit``-ed method or module traces its function again
    (as if it were not jitted; re-entrant).

    ``nn.jit`` caches a trace per module configuration (its fields and scope state), not per
    method interceptor: run again under lrjax's interceptors, a method jitted so (Gemma's
    ``Transformer.__call__``) would replay the trace of an earlier call, whose layers were not
    found, marked or split. Inside lrjax's own traces its calls are traced with the caller.
    (A Flax without that key, ``_HashableProxy.from_module``, is left as it is.)"""
    if _FROM_MODULE is None:
        yield
        return
    with _LIFTED["lock"]:
        if _LIFTED["depth"] == 0:
            _PROXY.from_module = classmethod(_fresh_proxy)
        _LIFTED["depth"] += 1
    try:
        yield
    finally:
        with _LIFTED["lock"]:
            _LIFTED["depth"] -= 1
            if _LIFTED["depth"] == 0:
                _PROXY.from_module = _FROM_MODULE


@contextlib.contextmanager
def raising_modules():
    """Within it, a list filled with the modules whose calls an exception propagates out of,
    innermost first: the one whose call raised it, then those calling it (a draw's
    ``InvalidRngError`` from a stochastic depth built with ``training=True``, then its block)."""
    modules: list = []

    def note(next_fun, args, kwargs, context):
        try:
            return next_fun(*args, **kwargs)
        except Exception:
            modules.append(context.module)
            raise

    with nn.intercept_methods(note):
        yield modules
