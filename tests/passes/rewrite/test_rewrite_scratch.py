"""Layers that draw random numbers, allocate scratch tensors or write their own tensors in place:
rewritten exactly (outputs, gradients, the random generator's state) or refused with the reason."""

import logging
import operator

import pytest
import torch
import torch._inductor.config as inductor_config
from torch import nn

from snlp_compile import SNLPFallbackError

D, L = 8, 4


class Noise(nn.Module):
    """A state-independent draw in every layer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, h):
        return h + torch.tanh(self.lin(h)) + torch.randn(h.shape)


class Dropout(nn.Module):
    """A hand-made dropout mask, drawn in every layer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, h):
        keep = torch.rand(h.shape) < 0.7
        return h + torch.tanh(self.lin(h)) * keep / 0.7


class AdditiveNoise(nn.Module):
    """An update that does not depend on the state: one identity-Newton iteration is exact."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(D))

    def forward(self, h):
        return h + self.scale * torch.randn(h.shape)


class Scratch(nn.Module):
    """A state-independent tensor the layer changes in place before reading it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, h):
        s = torch.ones(D)
        s.mul_(0.5)
        return h + s * torch.tanh(self.lin(h))


class IndexAdd(nn.Module):
    """A zeros buffer the layer adds its state-dependent rows into."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, h):
        out = torch.zeros(h.shape)
        out.index_add_(0, torch.tensor([1, 0]), torch.tanh(self.lin(h)))
        return h + out


class Padding(nn.Module):
    """Manual padding: a narrower result written into a slice of a zeros buffer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D // 2)

    def forward(self, h):
        out = torch.zeros(*h.shape[:-1], D)
        out[..., : D // 2] = torch.tanh(self.lin(h))
        return h + out


class MoE(nn.Module):
    """Top-1 routing: each expert's weighted output added into a zeros buffer by token index."""

    def __init__(self, experts=2):
        super().__init__()
        self.router = nn.Linear(D, experts)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(experts))

    def forward(self, h):
        x = h.reshape(-1, D)
        weight, chosen = torch.softmax(self.router(x), -1).topk(1, dim=-1)
        out = torch.zeros(x.shape)
        tokens = torch.arange(x.shape[0])
        for e, expert in enumerate(self.experts):
            out.index_add_(0, tokens, torch.tanh(expert(x)) * weight * (chosen == e))
        return h + out.reshape(h.shape)


class FalconAdd(nn.Module):
    """Hugging Face Falcon's parallel block: `mlp_output += attention_output`."""

    def __init__(self):
        super().__init__()
        self.attn, self.mlp = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, h):
        attention_output = self.attn(h)
        mlp_output = self.mlp(torch.tanh(h))
        mlp_output += attention_output
        return h + 0.5 * torch.tanh(mlp_output)


class WritesItsState(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, h):
        y = torch.tanh(self.lin(h))
        h[..., : D // 2].mul_(0.5)  # a view of the state
        return h + y


class Stack(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layers = nn.ModuleList(layer() for _ in range(L))

    def forward(self, h):
        for layer in self.layers:
            h = layer(h)
        return h


class SharedBuffer(nn.Module):
    """Every layer adds into one buffer allocated before the loop."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(IndexAddInto() for _ in range(L))

    def forward(self, h):
        out = torch.zeros(h.shape)
        for layer in self.layers:
            h = layer(h, out)
        return h + out


class IndexAddInto(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, h, out):
        out.index_add_(0, torch.tensor([1, 0]), torch.tanh(self.lin(h)))
        return h + torch.tanh(self.lin(h))


def _run(model, x, seed=1):
    """model(x) at `seed`, and the generator's state after it."""
    torch.manual_seed(seed)
    out = model(x)
    return out, torch.get_rng_state()


def _compiled(model, caplog, **options):
    caplog.set_level(logging.INFO, logger="snlp_compile")
    return torch.compile(model, backend="snlp", options=dict(iters=L, **options))


@pytest.mark.parametrize("layer, inner", [(Noise, "eager"), (Dropout, "eager"), (Noise, "inductor")])
def test_random_draws_are_drawn_once_per_layer_in_eager_order(caplog, layer, inner):
    """Each layer's state-independent draw is its own (never merged into layer 0's), drawn once per
    call (not per Newton iteration) in the eager order: the generator ends where eager's does
    (inductor: with its random ops falling back to torch's)."""
    model, x = Stack(layer).eval(), torch.randn(2, 5, D)
    compiled = _compiled(model, caplog, inner=inner, fallback="error")
    with torch.no_grad(), inductor_config.patch(fallback_random=True):
        expected, expected_state = _run(model, x)
        for _ in range(2):  # the compiling call and a compiled one
            out, state = _run(compiled, x)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(state, expected_state)
    assert "rewrote" in caplog.text


def test_random_draws_stay_per_layer_with_one_iteration():
    """A state-independent update makes one identity-Newton iteration exact: shared or redrawn noise
    would not be."""
    model, x = Stack(AdditiveNoise).eval(), torch.randn(2, 5, D)
    compiled = torch.compile(model, backend="snlp", options=dict(iters=1, inner="eager", fallback="error"))
    with torch.no_grad():
        expected, expected_state = _run(model, x)
        out, state = _run(compiled, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(state, expected_state)


@pytest.mark.parametrize("layer", [Dropout, Scratch, IndexAdd, Padding, MoE, FalconAdd])
def test_training_matches_eager_gradients(caplog, layer):
    model, x = Stack(layer).train(), torch.randn(2, 5, D, requires_grad=True)
    compiled = _compiled(model, caplog, inner="eager", fallback="error")
    expected, _ = _run(model, x)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *model.parameters()])
    out, _ = _run(compiled, x)
    grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)
    assert "rewrote" in caplog.text


@pytest.mark.parametrize(
    "layer, inner",
    [(layer, "eager") for layer in (Scratch, IndexAdd, Padding, MoE, FalconAdd)]
    + [(IndexAdd, "inductor"), (Padding, "inductor")],
)
def test_layer_local_writes_are_rewritten_exactly(caplog, layer, inner):
    """A tensor the layer allocates and writes in place is the layer's own in every evaluation: a scratch
    changed in place does not compound over layers and iterations, and per-layer (state-dependent)
    writes into a zeros buffer batch under vmap."""
    model, x = Stack(layer).eval(), torch.randn(2, 5, D)
    compiled = _compiled(model, caplog, inner=inner, fallback="error")
    with torch.no_grad():
        expected = model(x)
        for _ in range(2):
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    assert "rewrote" in caplog.text


@pytest.mark.parametrize(
    "make, reason",
    [(lambda: Stack(WritesItsState), "writes its state in place"), (SharedBuffer, "which other layers read")],
)
def test_writes_to_the_state_or_a_shared_input_are_refused(caplog, make, reason):
    model, x = make(), torch.randn(2, 5, D)
    with torch.no_grad():
        expected = model.eval()(x.clone())
        with pytest.raises(SNLPFallbackError, match=reason):
            _compiled(model, caplog, inner="eager", fallback="error")(x.clone())
        torch._dynamo.reset()
        out = _compiled(model, caplog, inner="eager")(x.clone())
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert reason in caplog.text and "unmodified" in caplog.text


def test_draws_are_never_the_same_value_nor_erased():
    """Two draws with equal arguments are two values (so are ops on them); a draw nothing reads still
    advances the generator: it is kept."""
    from snlp_compile.fx.equality import same_value
    from snlp_compile.passes.rewrite.graph import erase_unused

    graph = torch.fx.Graph()
    draws = [graph.call_function(torch.rand, ((2, 3),)) for _ in range(2)]
    masks = [graph.call_function(operator.lt, (d, 0.5)) for d in draws]
    ones = [graph.call_function(torch.ones, ((2, 3),)) for _ in range(2)]
    assert not same_value(*draws) and not same_value(*masks) and same_value(*ones)
    erase_unused([*masks, *ones])
    assert [n.target for n in graph.nodes] == [torch.rand, torch.rand]
