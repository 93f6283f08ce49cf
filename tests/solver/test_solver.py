import pytest
import torch
from torch import nn

from snlp_compile import SNLPConfig
from snlp_compile.solver import (
    CallableStack,
    StackedModules,
    Surrogate,
    diagnose,
    exact_newton,
    schedule,
    sequential,
    solve,
    solve_trace,
    solve_traces,
)

torch.manual_seed(0)
D, M = 16, 3


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(D, D)

    def forward(self, h):
        return h + 0.5 * torch.tanh(self.w(h))


def residual_stack(n=7):
    return StackedModules([Residual() for _ in range(n)])


def random_mix(n):
    from snlp_compile.models.mhc import sinkhorn

    return torch.stack([sinkhorn(torch.randn(M, M), 30) for _ in range(n)])


def hc_stack(n=6, mix=None):
    """mHC-like layers on h [B, M, D]: f(h) = H @ h + post * g(pre @ h)."""
    mix = random_mix(n) if mix is None else mix
    weights = [torch.randn(D, D) / D**0.5 for _ in range(n)]
    pre, post = torch.softmax(torch.randn(n, M), -1), torch.softmax(torch.randn(n, M), -1)

    def layer(i):
        return lambda h: mix[i] @ h + post[i][:, None] * torch.tanh((pre[i] @ h) @ weights[i]).unsqueeze(-2)

    return CallableStack([layer(i) for i in range(n)], Surrogate("mix", mix))


CONFIGS = [
    dict(blocks=1),
    dict(blocks=2),
    dict(blocks=3),  # 7 layers: blocks of 3, 2, 2
    dict(n_seq=2, blocks=2),
    dict(n_seq=3),
]


@pytest.mark.parametrize("init", ["h0", "batch_fwd"])
@pytest.mark.parametrize("options", CONFIGS)
def test_idn_exact_when_iters_reach_block_size(options, init):
    stack, h0 = residual_stack(7), torch.randn(2, 5, D)
    config = SNLPConfig(init=init, **options)
    largest = max(len(sizes) for _, sizes in schedule(len(stack), config))
    exact = solve(stack, h0, config.replace(iters=largest))
    torch.testing.assert_close(exact, sequential(stack, h0), atol=1e-5, rtol=1e-5)
    if init == "batch_fwd" and largest > 1:
        torch.testing.assert_close(solve(stack, h0, config.replace(iters=largest - 1)), exact, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(solve(stack, h0, config.replace(iters=1)), exact, atol=1e-4)


@pytest.mark.parametrize("options", CONFIGS[:4] + [dict(blocks=2, damping=0.3)])
def test_hcn_exact_when_iters_reach_block_size(options):
    stack, h0 = hc_stack(7), torch.randn(2, M, D)
    config = SNLPConfig(**options)
    largest = max(len(sizes) for _, sizes in schedule(len(stack), config))
    torch.testing.assert_close(
        solve(stack, h0, config.replace(iters=largest)), sequential(stack, h0), atol=1e-5, rtol=1e-5
    )


def test_hcn_beats_idn_on_mixing_layers():
    stack, h0 = hc_stack(6), torch.randn(4, M, D)
    ref = sequential(stack, h0)
    hcn = solve(stack, h0, SNLPConfig(iters=2))
    idn = solve(CallableStack(stack.fns), h0, SNLPConfig(iters=2))
    assert (hcn - ref).norm() < (idn - ref).norm()


def test_hcn_with_identity_mixing_equals_idn():
    eye = torch.eye(M).expand(5, M, M).clone()
    stack, h0 = hc_stack(5, mix=eye), torch.randn(2, M, D)
    for config in (SNLPConfig(iters=2), SNLPConfig(fuse=2, iters=1), SNLPConfig(iters=2, damping=0.2)):
        torch.testing.assert_close(solve(stack, h0, config), solve(CallableStack(stack.fns), h0, config))


def test_one_idn_iteration_is_the_prefix_sum():
    fns = [lambda h, k=k: h + torch.sin(h * (k + 1)) for k in range(3)]
    h0 = torch.randn(4, D)
    # By hand: every layer sees h0; out = h0 + sum_i (f_i(h0) - h0).
    by_hand = h0 + sum(f(h0) - h0 for f in fns)
    torch.testing.assert_close(solve(CallableStack(fns), h0, SNLPConfig(iters=1)), by_hand)
    trace = solve_trace(CallableStack(fns), h0, SNLPConfig(iters=1))
    torch.testing.assert_close(trace[0], fns[0](h0))
    torch.testing.assert_close(trace[1], h0 + (fns[0](h0) - h0) + (fns[1](h0) - h0))


def test_fused_identity_super_layer_sums_updates():
    fns = [lambda h, k=k: h + torch.cos(h + k) for k in range(4)]
    h0 = torch.randn(3, D)
    # fuse 2: F_0(x) = x + g0(x) + g1(x); F_1(u) = u + g2(u) + g3(u); K = 1, h0 init: u = x.
    g = [lambda h, f=f: f(h) - h for f in fns]
    expected = h0 + sum(gi(h0) for gi in g)
    torch.testing.assert_close(solve(CallableStack(fns), h0, SNLPConfig(fuse=2, iters=1)), expected)
    # fuse 1 and 2 super-layers with K = 2 is exact for the fused super-layers (not the model).
    out = solve(CallableStack(fns), h0, SNLPConfig(fuse=2, iters=2))
    mid = h0 + g[0](h0) + g[1](h0)
    torch.testing.assert_close(out, mid + g[2](mid) + g[3](mid))


def test_scaled_identity_surrogate_exact():
    scales = torch.tensor([0.9, 1.1, 0.8, 1.2])
    fns = [lambda h, a=a: a * h + torch.tanh(h) for a in scales]
    stack, h0 = CallableStack(fns, Surrogate("scale", scales)), torch.randn(3, D)
    torch.testing.assert_close(solve(stack, h0, SNLPConfig(iters=4)), sequential(stack, h0))
    ref = sequential(stack, h0)
    scaled = solve(stack, h0, SNLPConfig(iters=2))
    plain = solve(CallableStack(fns), h0, SNLPConfig(iters=2))
    assert (scaled - ref).norm() < (plain - ref).norm()


def test_exact_newton_converges_in_one_iteration_on_affine_layers():
    mats = [torch.randn(D, D) / D**0.5 for _ in range(5)]
    fns = [lambda h, A=A, k=k: h @ A + k for k, A in enumerate(mats)]
    stack, h0 = CallableStack(fns), torch.randn(2, D)
    torch.testing.assert_close(exact_newton(stack, h0, iters=1), sequential(stack, h0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(solve(stack, h0, SNLPConfig(iters=1)), sequential(stack, h0), atol=1e-3)


def test_exact_newton_is_exact_after_depth_iterations():
    stack, h0 = residual_stack(4), torch.randn(2, D)
    torch.testing.assert_close(exact_newton(stack, h0, iters=4), sequential(stack, h0), atol=1e-5, rtol=1e-5)


def test_stacked_vmap_evaluation_equals_the_loop():
    stack, hs = residual_stack(5), torch.randn(3, 2, D)
    looped = torch.stack([stack.layer(1 + i, h) for i, h in enumerate(hs)])
    torch.testing.assert_close(stack.layers(1, hs), looped)


def test_diagnostics_residual_falls_to_zero():
    stack, h0 = residual_stack(4), torch.randn(2, D)
    diag = diagnose(stack, h0, SNLPConfig(iters=4))
    assert len(diag.residual) == 4
    assert diag.residual[0] > 1e-3 and diag.residual[-1] < 1e-5
    assert diag.residual == sorted(diag.residual, reverse=True)
    assert max(diag.layer_error.values()) < 1e-5 and set(diag.layer_error) == {0, 1, 2, 3}


def test_solver_does_not_mutate_inputs():
    stack, h0 = residual_stack(3), torch.randn(2, D)
    before = h0.clone()
    solve(stack, h0, SNLPConfig(iters=2, init="batch_fwd"))
    assert torch.equal(h0, before)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(iters=0), "iters must be an integer >= 1"),
        (dict(fuse=0), "fuse must be an integer >= 1"),
        (dict(n_seq=-1), "n_seq must be an integer >= 0"),
        (dict(damping=1.0), r"damping must be a number in \[0, 1\)"),
        (dict(init="zeros"), "init must be one of"),
        (dict(surrogate="jvp"), "surrogate must be one of"),
        (dict(blocks=2.5), "blocks must be an integer"),
    ],
)
def test_bad_config_raises(options, message):
    with pytest.raises(ValueError, match=message):
        SNLPConfig(**options)


def test_bad_options_and_depth():
    with pytest.raises(ValueError, match="unknown SNLP option.*'itres'"):
        SNLPConfig.from_options({"itres": 2})
    with pytest.raises(ValueError, match=r"n_seq must be < the number of layers \(3\)"):
        solve(residual_stack(3), torch.randn(1, D), SNLPConfig(n_seq=3))
    with pytest.raises(ValueError, match=r"blocks must be <= the number of parallel layers \(2\)"):
        solve(residual_stack(3), torch.randn(1, D), SNLPConfig(n_seq=1, blocks=3))
    with pytest.raises(ValueError, match=r"fuse must be <= the number of parallel layers \(2\)"):
        solve(residual_stack(3), torch.randn(1, D), SNLPConfig(n_seq=1, fuse=3))
    with pytest.raises(ValueError, match="mix surrogate values must be"):
        Surrogate("mix", torch.ones(3, 2))


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(blocks=2), dict(n_seq=1, fuse=2), dict(init="batch_fwd", damping=0.2), dict(surrogate="hc")],
    ids=["one-block", "two-blocks", "seq-fused", "batch_fwd-damped", "hcn"],
)
def test_solve_traces_equal_separate_solves(overrides):
    hc = overrides.pop("surrogate", None) == "hc"
    stack, h0 = (hc_stack(6), torch.randn(2, M, D)) if hc else (residual_stack(6), torch.randn(3, D))
    config = SNLPConfig(**overrides)
    traces = solve_traces(stack, h0, config, [3, 1, 2, 1])
    assert list(traces) == [1, 2, 3]
    for k, trace in traces.items():
        expected = solve_trace(stack, h0, config, iters=k)
        assert list(trace) == list(expected)
        for index in trace:
            torch.testing.assert_close(trace[index], expected[index])


def test_solve_traces_share_the_iterations_of_a_block():
    calls = [0]

    def layer(h):
        calls[0] += 1
        return h + torch.sin(h)

    stack = CallableStack([layer] * 4)
    solve_traces(stack, torch.randn(2, D), SNLPConfig(), [1, 2])
    assert calls[0] == 2 * 4  # two iterations of the 4 layers serve K = 1 and K = 2 (separately: 3)
    with pytest.raises(ValueError, match=">= 1"):
        solve_traces(stack, torch.randn(2, D), SNLPConfig(), [0, 1])


def test_the_last_correction_is_an_add_chain_when_traced_and_one_sum_in_eager():
    """Inductor fuses an add chain into one coalesced kernel but compiles a leading-dim sum as a slow
    outer reduction; eager runs one sum kernel. Both equal the last output plus the residuals' sum."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from snlp_compile.solver.core import IDENTITY, _scan_last

    last, r = torch.randn(3, 4), torch.randn(4, 3, 4)
    torch.testing.assert_close(_scan_last(IDENTITY, 1.0, last, r), last + r.cumsum(0)[-1])
    traced = make_fx(lambda last, r: _scan_last(IDENTITY, 1.0, last, r), tracing_mode="fake")(last, r)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.sum.dim_IntList not in targets
    assert targets.count(torch.ops.aten.add.Tensor) == 4
    eager = make_fx(lambda last, r: _scan_last(IDENTITY, 1.0, last, r))(last, r)  # real tensors: one sum
    assert [n.target for n in eager.graph.nodes if n.op == "call_function"].count(torch.ops.aten.sum.dim_IntList) == 1


def saturating_stack(n=5, residual=True):
    """Elementwise layers (no norm, no mixing), so an inf stays in its element: h + 0.5 tanh(h)
    keeps it, tanh(h) + 0.1 h maps it to inf too, and -h flips its sign."""

    def layer(i):
        if not residual:
            return lambda h: torch.tanh(h) + 0.1 * h if i % 2 else -h
        return lambda h: h + 0.5 * torch.tanh(h * (i + 1))

    return CallableStack([layer(i) for i in range(n)])


@pytest.mark.parametrize("init", ["h0", "batch_fwd"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "sign-flipping"])
@pytest.mark.parametrize(
    "overrides, surrogate",
    [(dict(), None), (dict(blocks=2, damping=0.3), None), (dict(n_seq=1), "scale"), (dict(), "mix")],
    ids=["idn", "damped-blocks", "scale", "hcn"],
)
def test_non_finite_values_are_exact_at_the_block_size(init, residual, overrides, surrogate):
    """An inf (or NaN) in the input stays in its own elements, as in sequential, when iters reaches
    the block size: the other elements are finite and equal to sequential, for every surrogate."""
    n = 5
    stack = saturating_stack(n, residual)
    h0 = torch.randn(2, M, D)
    h0[0, 1, 3], h0[1, 0, 0], h0[1, 2, 5] = float("inf"), -float("inf"), float("nan")
    if surrogate == "scale":
        stack.surrogate = Surrogate("scale", torch.rand(n) + 0.5)
    if surrogate == "mix":
        stack.surrogate = Surrogate("mix", torch.eye(M).expand(n, M, M).clone())  # the layers mix no stream
    config = SNLPConfig(iters=n, init=init, **overrides)
    expected, out = sequential(stack, h0), solve(stack, h0, config)
    assert not expected.isfinite().all() and expected[0, 0].isfinite().all()
    torch.testing.assert_close(out, expected, equal_nan=True)
    trace = solve_trace(stack, h0, config)
    torch.testing.assert_close(trace[n - 1], expected, equal_nan=True)


def test_iterations_past_the_block_size_are_capped():
    """A block runs at most as many iterations as it has super-layers (one fewer with batch_fwd):
    more change nothing, so a huge count costs what the block size costs."""
    from snlp_compile.solver import exact_iters, useful_iters

    calls = [0]

    def layer(h):
        calls[0] += 1
        return h + torch.sin(h)

    stack, h0 = CallableStack([layer] * 4), torch.randn(2, D)
    exact = solve(stack, h0, SNLPConfig(iters=4))
    calls[0] = 0
    torch.testing.assert_close(solve(stack, h0, SNLPConfig(iters=10**9)), exact, rtol=0, atol=0)
    assert calls[0] == 4 * 4
    calls[0] = 0
    solve(stack, h0, SNLPConfig(iters=10**9, init="batch_fwd"))
    assert calls[0] == 3 + 3 * 4  # the batched first evaluation of 3 layers, then 3 iterations
    traces = solve_traces(stack, h0, SNLPConfig(blocks=2), [1, 2, 7])
    torch.testing.assert_close(traces[7][3], traces[2][3], rtol=0, atol=0)  # blocks of 2: K = 2 is exact
    assert [exact_iters(c, "h0") for c in (1, 2, 5)] == [1, 2, 5]
    assert [exact_iters(c, "batch_fwd") for c in (1, 2, 5)] == [1, 1, 4]
    assert useful_iters(8, SNLPConfig(blocks=3)) == 3  # blocks of 3, 3, 2
    assert useful_iters(8, SNLPConfig(n_seq=2, fuse=2)) == 3  # 6 parallel layers in 3 super-layers
    assert useful_iters(8, SNLPConfig(init="batch_fwd")) == 7
