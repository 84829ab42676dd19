"""Layers whose own code multiplies the data by their parameters
(``lax.conv_general_dilated(x, self.param(...))``, ``x @ self.w``, ``Embed.attend``): found in
the traced forward pass (:func:`lrjax.macs.weighted_products`) and listed as left as they are,
with the reason, so that a report's skipped layers and a "nothing to decompose" message name
them. Their multiply-adds are part of the whole net's fixed cost, as before: lrjax splits
Flax's conv, dense and einsum layers, whose computation it knows, not products written by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from lrjax.sites import ConvSite, path_of

__all__ = ["OWN_CODE", "READ_ELSEWHERE", "variable_names", "with_own_code", "grouped"]

OWN_CODE = ("its own code multiplies the data by its parameters (a product written by hand: "
            "lrjax splits Flax's conv, dense and einsum layers, linen or NNX), so it is left as "
            "it is, a fixed cost")
READ_ELSEWHERE = ("its kernel is also multiplied into the data outside the layer's own call "
                  "(a tied output layer reading it: layer.variables in linen, layer.kernel in "
                  "NNX): kept, as a pair would remove the kernel that product reads")
_DETAIL = "; here "  # what follows it in a reason is the layer's own (names, ops, share)


def variable_names(tree, *, collections: bool) -> list[tuple[str, ...]]:
    """The path of each leaf of a variable tree, in :func:`jax.tree_util.tree_leaves` order, as
    names (a module path then the variable's name): linen's ``{"params": {...}}`` without its
    collection (``collections=True``), NNX's ``State`` without the variables' ``.value``."""
    names = []
    for keys, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = tuple(str(getattr(k, "key", getattr(k, "idx", None))) for k in keys
                      if not isinstance(k, jax.tree_util.GetAttrKey))
        names.append(parts[1:] if collections else parts)
    return names


def _common(paths) -> tuple[str, ...]:
    """The longest common leading part of module paths (tuples of names)."""
    paths = list(paths)
    common = paths[0]
    for p in paths[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return tuple(common)


def with_own_code(found: Sequence[ConvSite], weighted, names: Sequence[tuple[str, ...]],
                  net_macs: int) -> list[ConvSite]:
    """``found`` and, after them, one site left as it is for each module whose own code
    multiplies the data by its parameters (``weighted``: :func:`lrjax.macs.weighted_products` of
    the traced forward pass whose first inputs are the variables named ``names``), in trace
    order; products fed by a layer's kernel or a variable of its parts (its own work) are not
    listed, but those fed by another parameter of a written layer's module are. A candidate
    layer whose kernel feeds such a product (outside its own call: whisper-jax's tied head
    multiplies by the one-hot embedding's table, read through ``.variables``) is left as it is,
    :data:`READ_ELSEWHERE`.
    ``net_macs``: the whole pass's multiply-adds (each layer's share is stated)."""
    paths = [s.path for s in found]
    kernels = {s.kernel_key for s in found}
    holders = {s.path.rpartition("/")[0] for s in found if s.written and s.named_by_kernel}

    def layers_own(variable) -> bool:
        """A layer's kernel, or a variable of its parts (a pair's halves); a written layer's
        module's other parameters are its own code's (big_vision's Gemma feed-forward: its
        gating products beside the product split as a layer)."""
        owner = path_of(variable[:-1])
        return tuple(variable) in kernels or any(
            owner.startswith(p + "/") if p else bool(owner) for p in paths)

    candidates = {s.kernel_key: s.path for s in found if s.candidate}
    read: set = set()  # the candidates whose kernel another product reads
    layers: dict[str, dict] = {}
    for sources, primitive, macs, _, direct in weighted:
        variables = [names[i] for i in sorted(sources)]
        if direct:  # (a product with a layer's output is not a read of its kernel)
            read.update(candidates[tuple(v)] for v in variables if tuple(v) in candidates)
        if any(layers_own(v) for v in variables):
            continue
        owner = _common(v[:-1] for v in variables)  # one module's weights, or its parts'
        where = path_of(owner) or variables[0][-1]  # (OptimizedLSTMCell)
        named = "+".join(sorted({v[len(owner)] for v in variables}))
        if where in paths:  # a written layer's module: named by its parameters, as shared ones
            where += "/" + named
        elif path_of(owner) in holders:  # a module holding written layers named so
            where = path_of((*owner, named))
        layer = layers.setdefault(where, {"names": {}, "ops": {}, "macs": 0})
        for v in variables:
            layer["names"][path_of(v[len(owner):])] = None
        layer["ops"][primitive] = layer["ops"].get(primitive, 0) + 1
        layer["macs"] += macs
    own = []
    for path, layer in layers.items():
        names_ = list(layer["names"])
        ops = ", ".join(f"{p} x{n}" if n > 1 else p for p, n in layer["ops"].items())
        share = layer["macs"] / net_macs if net_macs else 0.0
        own.append(ConvSite(path, None, skip=(
            f"{OWN_CODE}{_DETAIL}{', '.join(repr(n) for n in names_)} in {ops}, "
            f"{f'{share:.1%}' if share >= 0.001 else '<0.1%'} of the net's multiply-adds"),
            share=share))
    found = [ConvSite(s.path, None, skip=READ_ELSEWHERE) if s.path in read and s.candidate else s
             for s in found]
    return [*found, *own]


def grouped(found: Sequence[ConvSite], most: int = 4) -> str:
    """``found`` as ``"path, path and N more: reason; ..."``, one entry per reason (at most
    ``most`` paths each; a layer's own details left off), for one-line messages."""
    by_reason: dict[str, list[str]] = {}
    for site in found:
        by_reason.setdefault((site.skip or "already a pair").split(_DETAIL)[0], []).append(
            site.path)
    return "; ".join(
        ", ".join(paths[:most]) + (f" and {len(paths) - most} more" if len(paths) > most else "")
        + f": {reason}" for reason, paths in by_reason.items())
