"""A graph net written as jraph and Flax's ``ogbg_molpcba`` example write them: a ``GraphsTuple``
of nodes, edges, senders, receivers and per-graph counts in (leading dimensions that differ), the
same tuple out, messages gathered at the senders and summed at the receivers
(``jax.ops.segment_sum``), the node degrees counted from the data (an integer scatter), per-graph
pooling by ``jnp.repeat`` of the counts. Its ``nn.Dense`` layers are split and costed as XLA
counts the net; it exports at the example's shapes (``fixed_batch=True``) to ONNX Runtime,
LiteRT and StableHLO."""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrjax
from lrjax import export
from tests.helpers import init

N_GRAPH, NODES, EDGES = 3, 5, 8


class Graphs(NamedTuple):  # jraph.GraphsTuple's fields that this net reads
    nodes: jax.Array  # (total nodes, F)
    edges: jax.Array  # (total edges, E)
    senders: jax.Array  # (total edges,) int32
    receivers: jax.Array  # (total edges,) int32
    n_node: jax.Array  # (graphs,) int32


def graphs(seed: int) -> Graphs:
    rng = np.random.default_rng(seed)
    ends = [np.concatenate([rng.integers(0, NODES, EDGES) + g * NODES for g in range(N_GRAPH)])
            for _ in range(2)]
    return Graphs(jnp.asarray(rng.standard_normal((N_GRAPH * NODES, 6)), jnp.float32),
                  jnp.asarray(rng.standard_normal((N_GRAPH * EDGES, 3)), jnp.float32),
                  *(jnp.asarray(e, jnp.int32) for e in ends),
                  jnp.full((N_GRAPH,), NODES, jnp.int32))


class GraphConv(nn.Module):
    """jraph's ``GraphConvolution`` with symmetric normalization, an edge term added."""
    features: int

    @nn.compact
    def __call__(self, g: Graphs, x):
        n = x.shape[0]
        ones = jnp.ones_like(g.senders)
        scale_out = jax.lax.rsqrt(jnp.maximum(jax.ops.segment_sum(ones, g.senders, n), 1)
                                  .astype(x.dtype))
        scale_in = jax.lax.rsqrt(jnp.maximum(jax.ops.segment_sum(ones, g.receivers, n), 1)
                                 .astype(x.dtype))
        x = nn.Dense(self.features, name="node")(x)
        messages = x[g.senders] * scale_out[g.senders, None] + \
            nn.Dense(self.features, name="edge")(g.edges)
        return nn.relu(jax.ops.segment_sum(messages, g.receivers, n) * scale_in[:, None])


class GraphNet(nn.Module):
    @nn.compact
    def __call__(self, g: Graphs) -> Graphs:
        x = nn.Dense(32, name="embed")(g.nodes)
        for i in range(2):
            x = x + GraphConv(32, name=f"conv{i}")(g, x)
        graph_of_node = jnp.repeat(jnp.arange(g.n_node.shape[0]), g.n_node,
                                   total_repeat_length=x.shape[0])
        pooled = jax.ops.segment_sum(x, graph_of_node, g.n_node.shape[0]) / \
            g.n_node[:, None].astype(x.dtype)
        return g._replace(nodes=x, edges=nn.Dense(4, name="head")(pooled))


@pytest.fixture(scope="module")
def net():
    model = GraphNet()
    return model, init(model, 0, graphs(0))


def _flops(model, variables, g):
    return jax.jit(model.apply).lower(variables, g).cost_analysis()["flops"]


def test_a_graph_nets_dense_layers_are_split_and_costed_as_xla_counts_them(net):
    model, variables = net
    found = [s.path for s in lrjax.surgery.find_convs(model, graphs(0))]
    assert found == ["embed", "conv0/node", "conv0/edge", "conv1/node", "conv1/edge", "head"]
    for calibration in (None, [(graphs(i),) for i in range(1, 4)]):
        result = lrjax.decompose_linen(model, variables, graphs(0), rule="speedup:1.5",
                                       calibration=calibration)
        assert result.report.speedup >= 1.5
        assert result.report.speedup == pytest.approx(
            _flops(model, variables, graphs(0)) / _flops(result.module, result.variables,
                                                         graphs(0)), rel=1e-5)
    out = result.module.apply(result.variables, graphs(5))
    assert isinstance(out, Graphs) and out.edges.shape == (N_GRAPH, 4)


@pytest.mark.slow
def test_a_graph_net_exports_at_its_example_shapes(net, tmp_path):
    """Inputs whose leading dimensions differ export at ``fixed_batch=True`` (before: "example
    inputs must share their leading (batch) dimension", whatever the flag); LiteRT counts the
    degrees (an integer scatter-add its interpreter refused to prepare) as it sums messages;
    StableHLO serializes the net returning its arrays (``jax.export`` cannot serialize a
    namedtuple it does not know: a ``ValueError``)."""
    model, variables = net
    result = lrjax.decompose_linen(model, variables, graphs(0), rule="speedup:1.5")
    g = (graphs(7),)
    with pytest.raises(export.ExportError, match=r"leading \(batch\) dimension.*"
                                                 r"fixed_batch=True"):
        export.to_onnx(result.module, result.variables, g, str(tmp_path / "m.onnx"))
    done = [export.to_onnx(result.module, result.variables, g, str(tmp_path / "m.onnx"),
                           fixed_batch=True),
            export.to_tflite(result.module, result.variables, g, str(tmp_path / "m.tflite")),
            export.to_stablehlo(result.module, result.variables, g, str(tmp_path / "m.shlo"),
                                fixed_batch=True)]
    for e in done:
        assert e.max_abs_error <= export.ATOL + export.RTOL * e.scale
    restored = jax.export.deserialize(bytearray((tmp_path / "m.shlo").read_bytes()))
    want = jax.tree.leaves(result.module.apply(result.variables, *g))
    got = restored.call(*jax.tree.leaves(g))
    assert isinstance(got, tuple) and len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
