"""fuse_sibling_linears: linears of one input become one snlp::linear call at decode shapes."""

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule

from snlp_compile.kernels.stacked_linear import bias_free_linear
from snlp_compile.passes.sibling_linears import fuse_sibling_linears


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
