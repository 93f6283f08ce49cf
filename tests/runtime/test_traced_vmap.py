"""TracedVmap: replays equal vmap bitwise, one trace per signature (bounded), in-place writes reach
the real arguments, and vmap itself runs wherever a replay would be wrong (autograd, tracing)."""

import pickle

import pytest
import torch

from snlp_compile.runtime.traced_vmap import TracedVmap, runs_eagerly


def layer(h, w, table, cache, index):
    """Per layer: a linear, a shared table, a non-contiguous view, and an in-place cache write."""
    y = torch.tanh(h @ w.t() + table)
    cache.index_copy_(0, index, y[:1])
    return y.t().reshape(-1)


def arguments(n=3, t=4, d=5):
    torch.manual_seed(0)
    return torch.randn(n, t, d), torch.randn(n, d, d), torch.randn(t, d), torch.zeros(n, 6, d), torch.tensor([2])


IN_DIMS = (0, 0, None, 0, None)


def test_replay_equals_vmap_bitwise_and_writes_the_real_cache():
    traced, vmapped = TracedVmap(layer, IN_DIMS), torch.vmap(layer, in_dims=IN_DIMS)
    h, w, table, cache, index = arguments()
    expected_cache = cache.clone()
    expected = vmapped(h, w, table, expected_cache, index)
    for _ in range(2):  # the first call records the trace, both replay it
        cache.zero_()
        out = traced(h, w, table, cache, index)
        assert torch.equal(out, expected) and torch.equal(cache, expected_cache)
    assert len(traces := traced.traces) == 1
    assert next(iter(traces.values())).graph.find_nodes(op="call_function", target=torch.ops.aten.index_copy_.default)


def test_one_trace_per_signature_and_at_most_max_traces():
    traced = TracedVmap(layer, IN_DIMS, max_traces=2)
    h, w, table, cache, index = arguments()
    traced(h, w, table, cache, index)
    traced(h, w, table, cache, index)
    assert len(traced.traces) == 1
    traced(h.transpose(-2, -1).contiguous().transpose(-2, -1), w, table, cache, index)  # other strides
    h5, w5, table5, cache5, _ = arguments(t=5)
    out = traced(h5, w5, table5, cache5, index)  # other shapes: a third trace, the oldest dropped
    assert len(traced.traces) == 2 and out.shape == (3, 25)
    with pytest.raises(ValueError, match="max_traces must be >= 1"):
        TracedVmap(layer, IN_DIMS, max_traces=0)


def test_vmap_itself_under_autograd_and_tracing():
    traced = TracedVmap(layer, IN_DIMS)
    h, w, table, cache, index = arguments()
    w.requires_grad_(True)
    assert not runs_eagerly([h, w]) and runs_eagerly([h, w.detach()])
    traced(h, w, table, cache, index).sum().backward()
    assert w.grad is not None and not traced.traces
    with torch.no_grad():  # no gradient to record: replayed
        traced(h, w, table, cache, index)
    assert len(traced.traces) == 1
    compiled = torch.compile(lambda *a: traced(*a), backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(h, w, table, cache, index), traced(h, w, table, cache, index))
    with torch._subclasses.FakeTensorMode():
        assert not runs_eagerly([torch.empty(2)])
    assert not torch.func.vmap(lambda x: torch.tensor(runs_eagerly([x])))(torch.ones(2)).any()


def test_no_replay_with_a_non_tensor_argument():
    """An int (say, a decode position) would need one trace per value: vmap runs instead."""
    traced = TracedVmap(lambda h, scale: h * scale, (0, None))
    h = torch.randn(3, 4)
    for step in range(3):
        assert torch.equal(traced(h, step), h * step)
    assert not traced.traces


def test_signature_covers_aliasing_and_global_state_and_failed_traces_fall_back(caplog):
    """The same tensor passed twice is another signature than two tensors; autocast is never
    replayed; a function make_fx cannot trace (a module holding real parameters) runs through vmap,
    with one log line; a replayed signature becomes the most recently used."""
    traced = TracedVmap(lambda a, b: a.add_(1) + b, (0, 0))
    x = torch.zeros(3, 2)
    expected = torch.vmap(lambda a, b: a.add_(1) + b)(x.clone(), x.clone())
    torch.testing.assert_close(traced(x.clone(), x.clone()), expected)
    same = torch.zeros(3, 2)
    reference = same.clone()
    assert torch.equal(traced(same, same), torch.vmap(lambda a, b: a.add_(1) + b)(reference, reference))
    assert len(traced.traces) == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        traced(torch.zeros(3, 5), torch.zeros(3, 5))
    assert len(traced.traces) == 2
    first = next(iter(traced.traces))
    traced(x.clone(), x.clone())  # the first signature again: now the most recently used
    assert list(traced.traces)[-1] == first
    linear = torch.nn.Linear(4, 4)
    module = TracedVmap(lambda h: linear(h), (0,))
    h = torch.randn(3, 2, 4)
    with torch.no_grad(), caplog.at_level("INFO", logger="snlp_compile"):
        for _ in range(2):
            torch.testing.assert_close(module(h), torch.vmap(linear)(h))
    assert len(module.traces) == 1 and sum("make_fx failed" in r.message for r in caplog.records) == 1


def test_pickles_as_its_arguments():
    """Inductor pickles the graph that holds a TracedVmap for its cache key: it must pickle, and the
    copy must compute the same (its traces are rebuilt, not copied)."""
    traced = TracedVmap(layer, IN_DIMS, max_traces=3)
    h, w, table, cache, index = arguments()
    expected = traced(h, w, table, cache.clone(), index)
    copy = pickle.loads(pickle.dumps(traced))
    assert (copy.in_dims, copy.max_traces, copy.traces) == (IN_DIMS, 3, {})
    assert torch.equal(copy(h, w, table, cache.clone(), index), expected)


def test_simplify_views_drops_identity_folds_reshape_chains_and_dedupes():
    """The traced graph keeps fewer view ops and computes the same; a reshape chain on a non-contiguous
    tensor is kept (reshaping it at once could need other strides)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from snlp_compile.runtime.traced_vmap import simplify_views

    def f(x, y):
        a = x.permute(0, 1, 2).expand(2, 3, 4)  # identities: both dropped
        b = x.view(6, 4).view(24)  # a chain on a contiguous tensor: one view of x
        c = x.view(24)  # the same view as b's: dropped
        z = y.t()  # non-contiguous
        e = z.view(4, 3, 1).view(4, 3)  # kept: z is not contiguous
        return a * 2, b + c, e * 3

    x, y = torch.randn(2, 3, 4), torch.randn(3, 4)
    gm = make_fx(f, tracing_mode="fake")(x, y)
    expected = gm(x, y)

    def views():
        targets = (torch.ops.aten.view.default, torch.ops.aten.expand.default, torch.ops.aten.permute.default)
        return [str(n.args[1]) for n in gm.graph.nodes if n.target in targets]

    assert views() == ["[0, 1, 2]", "[2, 3, 4]", "[6, 4]", "[24]", "[24]", "[4, 3, 1]", "[4, 3]"]
    assert simplify_views(gm) == 4
    gm.graph.lint()
    assert views() == ["[24]", "[4, 3, 1]", "[4, 3]"]
    for out, ref in zip(gm(x, y), expected, strict=True):
        assert torch.equal(out, ref)


def test_simplify_views_leaves_a_graph_with_in_place_layout_changes():
    from torch.fx.experimental.proxy_tensor import make_fx

    from snlp_compile.runtime.traced_vmap import simplify_views

    def f(x):
        v = x.view(2, 3)  # an identity view taken before x changes layout
        x.t_()
        return v + 1, x.view(3, 2)

    gm = make_fx(f, tracing_mode="fake")(torch.randn(2, 3))
    assert simplify_views(gm) == 0
