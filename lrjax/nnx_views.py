"""Views of an NNX model that lrjax runs: an eval view (:func:`eval_view`), a call's keyword
arguments holding NNX objects split off (:func:`graph_keywords`), an abstract run of the
example call (:func:`run_abstractly`), and the stand-ins marking each candidate layer's work
while the whole net is costed (:class:`ScopedLayer`, :class:`ScopedCall`)."""

from __future__ import annotations

import jax
from flax import nnx

from lrjax import macs
from lrjax.linen_trace import TRAINING_FLAGS, with_constants_evaluated

__all__ = ["EVAL_NOTE", "eval_view", "eval_note", "drawn_note", "drawing", "drawn_streams",
           "graph_keywords", "run_abstractly", "ScopedLayer", "ScopedCall"]


EVAL_NOTE = ("layers found and calibrated on an eval view of the model (batch norm on its "
             "running statistics, dropout off)")


def graph_keywords(kwargs) -> tuple[dict, dict]:
    """A call's keyword arguments split into the rest and those holding NNX objects (a KV cache
    of ``nnx.Cache`` variables the call updates: bonsai's Qwen 3 ``model(tokens, cache=[...],
    segment_ids=...)``). lrjax's traces split the latter with the model and merge them inside
    (a trace cannot update variables made outside it): each trace updates copies, and the
    caller's objects are left as they were."""
    def holds_nnx(value):
        return any(isinstance(leaf, (nnx.Module, nnx.Variable)) for leaf in jax.tree.leaves(
            value, is_leaf=lambda x: isinstance(x, (nnx.Module, nnx.Variable))))

    kwargs = dict(kwargs or {})
    nodes = {k: v for k, v in kwargs.items() if holds_nnx(v)}
    return {k: v for k, v in kwargs.items() if k not in nodes}, nodes


def _training_flags(module):
    """``(name, inference value)`` of each mode flag (:data:`lrjax.linen_trace.TRAINING_FLAGS`)
    ``module`` holds set to training (a plain ``bool``: a ``Variable`` or ``None`` is left be)."""
    return [(name, not training) for name, training in TRAINING_FLAGS.items()
            if vars(module).get(name) is training]


def eval_view(model):
    """An eval-mode view of an NNX model: batch norm on its running statistics, dropout off
    (the model itself is unchanged). Modules of the user's own holding a ``deterministic`` or
    ``use_running_average`` flag (a stochastic depth, a dropout of its own) get it set too, as
    Flax's own ``Module.eval`` sets them (``nnx.view`` reaches only the modules that define
    ``set_view``: Flax's layers), and so does a ``training``, ``train`` or ``is_training`` flag
    set ``True`` (PyTorch's ``training``, kept by ports of its models: a torchvision port's
    ``StochasticDepth(p, mode, rngs, training=True)``). Its ``nnx.Dropout`` layers get rate 0
    and its ``nnx.BatchNorm`` layers use their running statistics even where the model's call
    passes them ``deterministic=False`` / ``use_running_average=False`` (jax-ai-stack's translation
    model, whose ``__call__(..., deterministic=False)`` gives its dropout that flag by default;
    ``self.bn(x, use_running_average=not train)`` under a call's default ``train=True``)."""
    try:  # (Flax's view fails on ToNNX wrappers stacked by nnx.vmap, a fold_in of their split
        # keys; a copy set to eval mode, as Module.eval sets it, is the same view)
        view = nnx.view(model, deterministic=True, use_running_average=True,
                        raise_if_not_found=False)
    except ValueError:
        view = nnx.clone(model)
        view.eval()
    if view is model:  # (not a copy: nothing to set on it)
        return view
    for _, module in nnx.iter_modules(view):
        for name, inference in _training_flags(module):
            setattr(module, name, inference)
        if isinstance(module, nnx.Dropout):
            module.rate = 0.0
        if type(module) is nnx.BatchNorm:
            module.__class__ = _RunningBatchNorm
    return view


def eval_note(model) -> str:
    """:data:`EVAL_NOTE`, naming the mode flags the eval view sets on modules of the user's own
    (``{class}.{flag}={value}``)."""
    own = sorted({f"{type(m).__name__}.{name}={inference}" for _, m in nnx.iter_modules(model)
                  if type(m).__module__.partition(".")[0] not in ("flax", "lrjax")
                  for name, inference in _training_flags(m)})
    return EVAL_NOTE[:-1] + (f"; set on modules of its own: {', '.join(own)})" if own else ")")


def drawn_note(drawn) -> str | None:
    """The report's note on the streams an eval view still samples from (``drawn``: their
    paths, :func:`drawing`), if any."""
    if not drawn:
        return None
    return (f"its eval view still draws random numbers (from {', '.join(drawn)}): a module of its "
            "own keeps a training mode lrjax does not know; its outputs change from call to "
            "call, and the calibration statistics and the errors measured include that noise")


def drawing(graphdef, kwargs, drawn: list, call=None):
    """``run(state, *args)``: the split model and the call's NNX keyword arguments
    (``graphdef``, :func:`graph_keywords`) merged and called (by ``call(module, args, kwargs)``,
    by default ``module(*args, **kwargs)``), the paths of the random streams the model holds
    (``nnx.Rngs``, each at its first place) that the call draws from put in ``drawn``."""
    def counts(node):
        return {p: v.get_value() for p, v in nnx.state(node, nnx.RngCount).flat_state()}

    def run(state, *args):
        module, copies = nnx.merge(graphdef, state)
        before = counts((module, copies))
        out = (call or _called)(module, args, {**kwargs, **copies})
        drawn[:] = sorted({"/".join(map(str, p[1:-1])) for p, v in counts((module, copies)).items()
                           if v is not before.get(p) and p[0] == 0})  # (not the call's own)
        return out

    return run


def drawn_streams(graphdef, state, example_args, kwargs, call=None) -> list[str]:
    """The paths of the random streams that a model holds and its split eval view (``graphdef``,
    ``state``: of the view and the call's NNX keyword arguments, :func:`graph_keywords`) samples
    from when called on the example (:func:`drawing`; arrays or their shapes): draws whose
    random bits the outputs use; ``[]`` when none, or when it cannot be traced abstractly."""
    drawn: list = []
    try:
        traced = with_constants_evaluated(jax.make_jaxpr(drawing(graphdef, kwargs, drawn, call)),
                                          state, *example_args)
    except TypeError:  # (JAX's ConcretizationTypeError: not traceable abstractly, not checked)
        return []
    return drawn if macs.samples(macs.live(traced)) else []


def _called(module, args, kwargs):
    return module(*args, **kwargs)


class _RunningBatchNorm(nnx.BatchNorm):
    """An ``nnx.BatchNorm`` of an eval view: on its running statistics, whatever its call
    passes."""

    def __call__(self, x, use_running_average=None, **kwargs):
        return super().__call__(x, True, **kwargs)


def run_abstractly(model, example_args, example_kwargs, eval_mode) -> None:
    """``model`` called on the example (an eval view of it with ``eval_mode``), traced
    abstractly where it can be, else run."""
    kwargs, nodes = graph_keywords(example_kwargs)
    graphdef, state = nnx.split((eval_view(model) if eval_mode else model, nodes))

    def call(state, *args):
        module, copies = nnx.merge(graphdef, state)
        return module(*args, **kwargs, **copies)

    try:
        with_constants_evaluated(jax.eval_shape, call, state, *example_args)
    except (TypeError, jax.errors.ConcretizationTypeError):
        call(state, *example_args)


class ScopedLayer(nnx.Module):
    """Stands in for a candidate layer while the net is costed: its work marked as its own
    (:func:`lrjax.macs.layer_scope`), counted over all its runs."""

    def __init__(self, layer, index: int):
        self.layer, self.index = layer, index

    def __getattr__(self, name):  # model code reading its layer's attributes: o_proj.kernel
        if name.startswith("_") or name == "layer":
            raise AttributeError(name)
        return getattr(self.layer, name)

    def __call__(self, *args, **kwargs):
        with macs.layer_scope(self.index):
            return self.layer(*args, **kwargs)


class ScopedCall(nnx.Module):
    """:class:`ScopedLayer` in a subclass's base's call (:func:`lrjax.nnx_layers.hooked`)."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, layer, base_call, *args, **kwargs):
        with macs.layer_scope(self.index):
            return base_call(*args, **kwargs)
