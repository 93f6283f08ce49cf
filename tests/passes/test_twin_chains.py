"""fuse_twin_chains: the same chain of ops on two sibling tensors runs once on their concatenation."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from snlp_compile.passes.twin_chains import fuse_twin_chains


def _traced(fn, *inputs: torch.Tensor) -> tuple[GraphModule, list[torch.Tensor]]:
    """fn's graph as dynamo hands it to a backend (nodes carry their traced values, as the pass needs)
    and the inputs in the graph's order."""
    graphs = []

    def capture(gm: GraphModule, example_inputs: list) -> GraphModule:
        graphs.append((gm, example_inputs))
        return gm

    torch.compile(fn, backend=capture, fullgraph=True, dynamic=False)(*inputs)
    return graphs[0]


def _ops(gm: GraphModule) -> int:
    """Dispatches when run eagerly: calls other than indexing into the split's tuple."""
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    return sum(not (n.target is operator.getitem and n.args[0].target is torch.split) for n in calls)


def _fused(fn, *inputs: torch.Tensor) -> tuple[int, int, int]:
    """(chains fused, dispatches before, after), checking that the outputs stay bitwise the same."""
    gm, inputs = _traced(fn, *inputs)
    expected, before = gm(*inputs), _ops(gm)
    fused = fuse_twin_chains(gm.graph)
    gm.recompile()
    for got, want in zip(gm(*inputs), expected, strict=True):
        assert torch.equal(got, want)
    return fused, before, _ops(gm)


def _rotate(x, cos, sin):
    """The rotary embedding of the built-in models, with its tables already cast and broadcastable
    (the rewrite computes those once for every layer)."""
    x1, x2 = x[..., : x.size(-1) // 2], x[..., x.size(-1) // 2 :]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def _rotary_and_norm(q, k, cos, sin):
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
    return q.transpose(1, 2), k.transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [4, 2])  # GQA: k has fewer heads, so the chains are fused along the heads
def test_rotary_and_norm_of_q_and_k_run_once(kv_heads):
    cos, sin = torch.randn(5, 1, 4), torch.randn(5, 1, 4)
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, kv_heads, 8)
    fused, before, after = _fused(_rotary_and_norm, q, k, cos, sin)
    assert fused == 1
    assert after <= before // 2 + 3  # one chain, one concatenation, one split


def test_an_operand_that_varies_along_every_dim_is_not_fused():
    weight = torch.randn(3, 6)
    fused, before, after = _fused(
        lambda a, b, w: ((a * w).exp(), (b * w).exp()), torch.randn(3, 6), torch.randn(3, 6), weight
    )
    assert (fused, after) == (0, before)


def test_different_operands_are_not_twins():
    def fn(a, b, u, v):
        return (a * u).exp(), (b * v).exp()

    fused, before, after = _fused(fn, *(torch.randn(3, 6) for _ in range(2)), torch.randn(6), torch.randn(6))
    assert (fused, after) == (0, before)


def test_a_slice_along_the_only_free_dim_stops_the_chain():
    def fn(a, b, s):  # s varies along dim 1, and the slices cut dim 0: nothing separates
        return (a[:2] * s).exp(), (b[:2] * s).exp()

    fused, before, after = _fused(fn, torch.randn(3, 6), torch.randn(3, 6), torch.randn(1, 6))
    assert (fused, after) == (0, before)


def test_a_value_read_before_its_twin_exists_is_left_alone():
    def fn(a, b, s):
        x = (a * s).exp().sin()  # sin reads a's chain before b's chain starts: its half would come too late
        y = (b * s).exp()
        return x, y

    fused, before, after = _fused(fn, torch.randn(3, 6), torch.randn(3, 6), torch.randn(6))
    assert (fused, after) == (0, before)


def test_an_op_reading_both_sides_ends_the_chains():
    def fn(a, b, s):
        x, y = (a * s).exp().neg(), (b * s).exp().neg()
        return (x + y,)

    fused, before, after = _fused(fn, torch.randn(3, 6), torch.randn(3, 6), torch.randn(6))
    assert fused == 1 and after == before - 1  # 3 pairs -> 3 ops + cat + split; the add stays
