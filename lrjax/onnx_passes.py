"""Graph passes on the ONNX models :mod:`lrjax.onnx_convert` produces."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

__all__ = ["fold_conv_affine"]


def _per_channel(value: np.ndarray, n: int):
    """A constant as ``(n,)`` per-output-channel values of an NCHW tensor, or None."""
    if value.size == 1:
        return np.full((n,), value.reshape(()))
    if value.shape in ((1, n, 1, 1), (n, 1, 1)):
        return value.reshape(n)
    return None


def _inside(node) -> set[str]:
    """The names a node's subgraphs read (a ``Loop`` body's outer-scope values and constants)."""
    names = set()
    for attribute in node.attribute:
        for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
            for inner in sub.node:
                names.update(inner.input)
                names.update(_inside(inner))
    return names


def fold_conv_affine(model) -> int:
    """Fold per-channel ``Mul``/``Add``/``Sub`` by constants that directly follow a ``Conv`` (batch
    norm in inference, biases) into the conv's weight and bias, in place; returns how many were
    folded. A conv whose output has any other use is left alone."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    folded = 0
    while True:
        consumers: dict[str, list] = {}
        for node in graph.node:
            for name in (*node.input, *_inside(node)):  # (a loop body reading it: not folded)
                consumers.setdefault(name, []).append(node)
        match = None
        for node in graph.node:
            users = consumers.get(node.output[0], [])
            if node.op_type != "Conv" or node.output[0] in outputs or len(users) != 1:
                continue
            user = users[0]
            if user.op_type not in ("Mul", "Add", "Sub") or len(user.input) != 2:
                continue
            const = user.input[1] if user.input[0] == node.output[0] else user.input[0]
            if const not in inits or (user.op_type == "Sub" and user.input[1] != const) or \
                    any(w not in inits for w in node.input[1:]):  # a weight computed in the graph
                continue
            weight = numpy_helper.to_array(inits[node.input[1]])
            values = _per_channel(numpy_helper.to_array(inits[const]), weight.shape[0])
            if values is not None:
                match = (node, user, weight, values.astype(weight.dtype))
                break
        if match is None:
            break
        node, user, weight, values = match
        bias = (numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2
                else np.zeros((weight.shape[0],), weight.dtype))
        if user.op_type == "Mul":
            weight, bias = weight * values.reshape(-1, 1, 1, 1), bias * values
        else:
            bias = bias + (values if user.op_type == "Add" else -values)
        names = []
        for kind, array in (("w", weight), ("b", bias)):
            name = f"{user.output[0]}_{kind}"
            tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
            graph.initializer.append(tensor)
            inits[name] = tensor
            names.append(name)
        conv = helper.make_node("Conv", [node.input[0], *names], [user.output[0]],
                                **{a.name: helper.get_attribute_value(a) for a in node.attribute})
        index = list(graph.node).index(node)
        graph.node.remove(user)
        graph.node.remove(node)
        graph.node.insert(index, conv)
        folded += 1
    used = {name for n in graph.node for name in (*n.input, *_inside(n))}
    for tensor in list(graph.initializer):
        if tensor.name not in used:
            graph.initializer.remove(tensor)
    return folded
