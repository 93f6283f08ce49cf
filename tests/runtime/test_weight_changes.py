"""Changes to a model's weights after compiling reach the compiled model: at iters = layers its
answer equals eager after each change, by whatever route the weights change."""

import copy

import pytest
import torch
from torch import nn

import snlp_compile
from snlp_compile.backends import dynamo
from snlp_compile.models import GPT, GPTConfig, StaticKVCache
from snlp_compile.runtime.stacked_weights import StackedWeights

IDX = torch.randint(0, 64, (2, 16))


def build(prepared: bool = False) -> GPT:
    model = GPT(GPTConfig.preset("tiny", n_layer=4)).eval()
    return snlp_compile.prepare(model) if prepared else model


def compiled(model: nn.Module, inner: str = "eager"):
    fn = torch.compile(model, backend="snlp", options=dict(iters=4, inner=inner, fallback="error"))
    assert_eager(fn, model)
    return fn


@torch.no_grad()
def assert_eager(fn, model, idx=IDX):
    torch.testing.assert_close(fn(idx), model(idx), atol=2e-5, rtol=2e-5)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(IDX).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("dtype, prepared", [(torch.float16, False), (torch.bfloat16, True)])
def test_a_dtype_round_trip_is_seen(dtype, prepared):
    model = build(prepared)
    fn = compiled(model)
    model.to(dtype).float()  # each parameter: same object and version, a new (rounded) storage
    assert_eager(fn, model)


@pytest.mark.parametrize("prepared", [False, True])
@pytest.mark.parametrize("write", ["in place", "assigned"])
def test_writes_through_data_are_seen(prepared, write):
    model = build(prepared)
    fn = compiled(model)
    for block in model.blocks:  # weight loading, EMA and surgery code write this way
        weight = block.mlp.c_fc.weight
        if write == "in place":
            weight.data.mul_(1.5)
        else:
            weight.data = weight.data * 1.5
    assert_eager(fn, model)


def test_prepare_again_then_optimizer_steps():
    model = build(prepared=True)
    fn = compiled(model)
    snlp_compile.prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer_step(model, optimizer)
    assert_eager(fn, model)


def _replace_a_parameter(model):
    model.blocks[2].attn.c_q.weight = nn.Parameter(torch.randn_like(model.blocks[2].attn.c_q.weight))


def _replace_a_layer(model):
    model.blocks[1] = copy.deepcopy(model.blocks[1])
    with torch.no_grad():
        model.blocks[1].mlp.c_proj.weight.mul_(-1)


def _swap_two_layers(model):
    model.blocks[1], model.blocks[2] = model.blocks[2], model.blocks[1]


def _tie_two_layers(model):
    model.blocks[3].attn.c_k.weight = model.blocks[0].attn.c_k.weight


def _assign_a_state_dict(model):
    model.load_state_dict({k: v * 0.9 for k, v in model.state_dict().items()}, assign=True)


@pytest.mark.parametrize(
    "change", [_replace_a_parameter, _replace_a_layer, _swap_two_layers, _tie_two_layers, _assign_a_state_dict]
)
def test_replaced_layers_and_parameters_after_prepare(change):
    model = build(prepared=True)
    fn = compiled(model)
    change(model)
    assert_eager(fn, model)
    with torch.no_grad():  # and what follows the change is seen too
        for p in model.parameters():
            p.mul_(1.1)
    assert_eager(fn, model)


class Layer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


class Residual(nn.Module):
    """x -> x + tanh(W x + b), layer after layer, between an embedding and a head."""

    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(8, width), nn.Linear(width, 4)
        self.layers = nn.ModuleList(Layer(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_changes_reach_an_inductor_graph():
    """inductor captures the buffers when it compiles: they are updated in place or re-pointed."""
    model, x = Residual().eval(), torch.randn(2, 5, 8)
    fn = torch.compile(model, backend="snlp", options=dict(iters=3, inner="inductor", fallback="error"))
    assert_eager(fn, model, x)
    model.half().float()
    assert_eager(fn, model, x)
    model.layers[1].linear.weight.data.mul_(1.5)
    assert_eager(fn, model, x)
    model.layers[2].linear.weight = nn.Parameter(torch.randn(16, 16))
    assert_eager(fn, model, x)
    model.layers[0].linear.bias = model.layers[1].linear.bias
    assert_eager(fn, model, x)


def test_optimizer_steps_are_seen():
    model = build()
    fn = compiled(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer_step(model, optimizer)
        assert_eager(fn, model)


def test_compiling_leaves_the_state_dict_as_it_was():
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objects = dict(model.named_parameters())
    compiled(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(model.get_parameter(k) is p and p.is_contiguous() for k, p in objects.items())


def test_a_decode_step_does_no_restacking_when_nothing_changed(monkeypatch):
    graphs, rewrite = [], dynamo.rewrite_stack
    monkeypatch.setattr(dynamo, "rewrite_stack", lambda *a, **k: graphs.append(rewrite(*a, **k)) or graphs[-1])
    model = build()
    fn = torch.compile(model, backend="snlp", options=dict(iters=4, inner="eager", fallback="error"))
    cache = StaticKVCache(model.config, 1, 32)
    with torch.no_grad():
        fn(IDX[:1], kv_cache=cache)
        fn(IDX[:1, :1], kv_cache=cache)  # the first call of the decode graph settles its buffers
        restacks, restack = [], StackedWeights._restack
        monkeypatch.setattr(StackedWeights, "_restack", lambda *a: restacks.append(a) or restack(*a))
        weights = [w for _, w in graphs]
        addresses = [b.data_ptr() for w in weights for b in w.buffers]
        for _ in range(3):
            fn(IDX[:1, :1], kv_cache=cache)
    assert len(weights) == 2 and all(w.buffers and w.copied_bytes == 0 for w in weights)
    assert restacks == [] and [b.data_ptr() for w in weights for b in w.buffers] == addresses
