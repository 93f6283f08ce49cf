"""fuse_twin_chains: the same chain of ops on two sibling tensors runs once on their concatenation."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from snlp_compile.passes.lowering.twin_chains import fuse_twin_chains
from tests.helpers.dynamo_graphs import traced


def _ops(gm: GraphModule) -> int:
    """Dispatches when run eagerly: calls other than indexing into the split's tuple."""
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    return sum(not (n.target is operator.getitem and n.args[0].target is torch.split) for n in calls)


def _strides(t: torch.Tensor) -> list[int]:
    """t's strides where its size is not 1 (a size-1 dim's stride is never used)."""
    return [stride for size, stride in zip(t.shape, t.stride(), strict=True) if size != 1]


def _fused(fn, *inputs: torch.Tensor) -> tuple[int, int, int]:
    """(chains fused, dispatches before, after), checking that the outputs keep their values (up to a
    CPU kernel's vectorised and scalar rounding), signs of zero and strides, that the inputs end as
    they did, that every new node carries its traced value and that the graph is unchanged when no
    chain was fused."""
    gm, inputs = traced(fn, *inputs)
    originals, graph = {node for node in gm.graph.nodes}, str(gm.graph)
    copies = [t.clone() for t in inputs]
    expected, before = gm(*copies), _ops(gm)
    fused = fuse_twin_chains(gm.graph)
    assert fused or str(gm.graph) == graph, "no chain fused, yet the graph changed"
    gm.recompile()
    again = [t.clone() for t in inputs]
    for got, want in zip(gm(*again), expected, strict=True):
        torch.testing.assert_close(got, want)
        assert torch.equal(got.signbit(), want.signbit()) and _strides(got) == _strides(want)
    for got, want in zip(again, copies, strict=True):  # in-place writes to the inputs happen as before
        assert torch.equal(got, want)
    assert all("example_value" in n.meta for n in gm.graph.nodes if n not in originals)
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


@pytest.mark.parametrize(
    ("batch", "tokens", "kv_heads", "fuses"),
    [
        (2, 5, 4, True),
        (1, 1, 2, True),  # GQA decode: along the heads, each half keeps its original's strides
        (2, 5, 2, False),  # GQA prefill: halves along the heads would be laid out differently
    ],
)
def test_rotary_and_norm_of_q_and_k_run_once(batch, tokens, kv_heads, fuses):
    cos, sin = torch.randn(tokens, 1, 4), torch.randn(tokens, 1, 4)
    q, k = torch.randn(batch, tokens, 4, 8), torch.randn(batch, tokens, kv_heads, 8)
    fused, before, after = _fused(_rotary_and_norm, q, k, cos, sin)
    assert fused == int(fuses)
    assert after <= before // 2 + 3 if fuses else after == before  # one chain, one concatenation, one split


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


def test_an_in_place_write_between_the_chains_is_seen_as_before():
    def operand_written(a, b, s):
        s = s.clone()
        x = (a * s).exp().neg().sigmoid()
        s.mul_(2)
        return x, (b * s).exp().neg().sigmoid()

    def seed_written(a, b, s):
        a, b = a.clone(), b.clone()
        b.add_(1)
        return (a * s).exp().neg().sigmoid(), (b * s).exp().neg().sigmoid()

    def chain_value_written(a, b, s):
        x, y = a * s, b * s
        ex = x.exp()
        x.mul_(2)
        return ex.neg().sigmoid().tanh(), y.exp().neg().sigmoid().tanh(), x

    for fn in (operand_written, seed_written, chain_value_written):  # chains after the write may still fuse
        _fused(fn, torch.randn(3, 6), torch.randn(3, 6), torch.randn(6))


def test_an_in_place_flag_is_a_write():
    def fn(a, b, s):
        return F.relu(a, inplace=True).mul(s).exp().neg(), F.relu(b, inplace=True).mul(s).exp().neg()

    fused, before, after = _fused(fn, torch.randn(3, 6), torch.randn(3, 6), torch.randn(6))
    assert (fused, after) == (0, before)


def test_keyword_operands_are_mirrored():
    def cat_by_keyword(a, b, s):
        x, y = a * s, b * s
        u = torch.cat(tensors=[x.exp(), x.neg()], dim=-1).sigmoid().tanh()
        return u, torch.cat(tensors=[y.exp(), y.neg()], dim=-1).sigmoid().tanh()

    def one_side_by_keyword(a, b, s):  # v reads side a by keyword: not a twin of u
        x, y = (a * s).exp(), (b * s).exp()
        return torch.add(x, other=x).neg().sigmoid(), torch.add(y, other=x).neg().sigmoid()

    fused, before, after = _fused(cat_by_keyword, torch.randn(3, 6), torch.randn(3, 6), torch.randn(6))
    assert fused == 1 and after < before
    _fused(one_side_by_keyword, torch.randn(3, 6), torch.randn(3, 6), torch.randn(6))


def test_ops_that_do_not_take_their_size_from_the_chain_are_not_fused():
    def fn(a, b, s, t):  # t.to(x) reads x only for its dtype: its size comes from t
        return t.to(a * s).exp().tanh().sigmoid(), t.to(b * s).exp().tanh().sigmoid()

    fused, before, after = _fused(fn, torch.randn(1, 6), torch.randn(3, 6), torch.randn(6), torch.randn(1, 6))
    assert fused == 1 and after == before - 1  # the muls and to()s stay apart: 3 pairs -> cat + 3 ops + split


def test_zero_and_negative_zero_are_different_operands():
    def fn(a, b, s):
        return (a * s).exp().neg().mul(0.0), (b * s).exp().neg().mul(-0.0)

    _fused(fn, torch.randn(3, 6), torch.randn(3, 6), torch.randn(6))


def test_a_half_read_by_a_view_keeps_its_layout():
    def fn(q, k, cos, sin):
        q, k = F.rms_norm(_rotate(q, cos, sin), (8,)), F.rms_norm(_rotate(k, cos, sin), (8,))
        return q.view(2, -1, 8), k.view(2, -1, 8)

    q, k, cos, sin = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8), torch.randn(5, 1, 4), torch.randn(5, 1, 4)
    fused, _, _ = _fused(fn, q, k, cos, sin)
    assert fused == 0  # along the heads the halves would not be views of contiguous memory
