"""fuse_sibling_linears: linears of one input become one snlp::linear call at decode shapes."""

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule

from snlp_compile.kernels.stacked_linear import bias_free_linear
from snlp_compile.passes.lowering.sibling_linears import fuse_sibling_linears


def _graph(widths: list[int], rows: int, k: int = 8) -> tuple[GraphModule, list[torch.Tensor]]:
    """x -> one bias_free_linear per width (weights are placeholders), plus one linear of another input;
    returns the sum of every output's first column so that all of them are used."""
    graph = Graph()
    x, other = graph.placeholder("x"), graph.placeholder("other")
    x.meta["example_value"], other.meta["example_value"] = torch.randn(rows, k), torch.randn(rows, k)
    weights = [graph.placeholder(f"w{i}") for i in range(len(widths))]
    outs = []
    for w, n in zip(weights, widths, strict=True):
        out = graph.call_function(bias_free_linear, (x, w))
        out.meta["example_value"] = torch.empty(rows, n)
        outs.append(graph.call_function(torch.narrow, (out, -1, 0, 1)))
    lonely = graph.call_function(bias_free_linear, (other, weights[0]))
    lonely.meta["example_value"] = torch.empty(rows, widths[0])
    graph.output(graph.call_function(torch.cat, ([*outs, lonely], -1)))
    inputs = [torch.randn(rows, k), torch.randn(rows, k), *[torch.randn(n, k) for n in widths]]
    return GraphModule(torch.nn.Module(), graph), inputs


def _count(gm: GraphModule, target) -> int:
    return sum(node.target is target for node in gm.graph.nodes)


def test_siblings_become_one_call_with_the_same_values():
    gm, inputs = _graph([6, 3, 3], rows=2)
    expected = gm(*inputs)
    assert fuse_sibling_linears(gm.graph) == 1
    gm.recompile()
    assert _count(gm, torch.ops.snlp.linear.default) == 1
    assert _count(gm, bias_free_linear) == 1  # the linear of the other input stays
    torch.testing.assert_close(gm(*inputs), expected)
    x, ws = inputs[0], inputs[2:]
    torch.testing.assert_close(gm(*inputs)[:, :3], torch.stack([F.linear(x, w)[:, 0] for w in ws], -1))


def test_more_siblings_than_one_launch_reads_are_grouped():
    gm, inputs = _graph([4] * 6, rows=1)
    expected = gm(*inputs)
    assert fuse_sibling_linears(gm.graph) == 2  # 4 + 2
    gm.recompile()
    assert _count(gm, torch.ops.snlp.linear.default) == 2
    torch.testing.assert_close(gm(*inputs), expected)


def test_prefill_shapes_keep_their_own_gemms():
    gm, _ = _graph([6, 3, 3], rows=17)  # more rows than the GEMV serves
    assert fuse_sibling_linears(gm.graph) == 0
    assert _count(gm, bias_free_linear) == 4


def _linear(graph: Graph, x, w, rows: int, n: int):
    out = graph.call_function(bias_free_linear, (x, w))
    out.meta["example_value"] = torch.empty(rows, n)
    return out


def test_siblings_of_a_fused_output_are_fused_too():
    """h and z read x; a and b read h: after the first fusion h is one output of the fused call, and
    the second group must read that output (the graph stays valid, the values equal)."""
    graph = Graph()
    x = graph.placeholder("x")
    w = [graph.placeholder(f"w{i}") for i in range(4)]
    h, z = _linear(graph, x, w[0], 1, 8), _linear(graph, x, w[1], 1, 8)
    a, b = _linear(graph, h, w[2], 1, 8), _linear(graph, h, w[3], 1, 8)
    graph.output(graph.call_function(torch.cat, ([z, a, b], -1)))
    gm = GraphModule(torch.nn.Module(), graph)
    inputs = [torch.randn(1, 8), *[torch.randn(8, 8) for _ in range(4)]]
    expected = gm(*inputs)
    assert fuse_sibling_linears(gm.graph) == 2
    gm.graph.lint()
    gm.recompile()
    assert _count(gm, torch.ops.snlp.linear.default) == 2 and _count(gm, bias_free_linear) == 0
    torch.testing.assert_close(gm(*inputs), expected)


def test_weights_computed_inside_the_graph_are_left_alone():
    graph = Graph()
    x, w0 = graph.placeholder("x"), graph.placeholder("w0")
    w1 = graph.call_function(torch.neg, (w0,))
    out = graph.call_function(torch.cat, ([_linear(graph, x, w0, 1, 8), _linear(graph, x, w1, 1, 8)], -1))
    graph.output(out)
    assert fuse_sibling_linears(graph) == 0
