"""Detection on the reference models: what is found, and every refusal with its reason."""

import pytest
import torch
from torch import nn

from snlp_compile import find_layer_stack
from snlp_compile.fx.writes import written_arg
from snlp_compile.models import GPT, MHCGPT, GPTConfig, StaticKVCache


def tiny(cls=GPT, **kw):
    return cls(GPTConfig.preset("tiny", **kw)).eval()


def report(model, *inputs, **kwargs):
    (only,) = find_layer_stack(model, inputs, **kwargs)
    return only


IDX = torch.randint(0, 64, (2, 16))


@pytest.mark.parametrize(
    "cls, kw, groups, surrogate",
    [
        (GPT, {}, [[0, 1, 2, 3]], "identity"),
        (GPT, dict(x0_mixing=True), [[0, 1, 2, 3]], "scale"),
        (GPT, dict(window_pattern=(8, None), n_kv_head=2), [[0, 2], [1, 3]], "identity"),
        (MHCGPT, {}, [[0, 1, 2, 3]], "mix"),
    ],
)
def test_reference_models(cls, kw, groups, surrogate):
    found = report(tiny(cls, **kw), IDX)
    assert found.found and found.layers == [0, 1, 2, 3] and found.excluded == []
    assert found.groups == groups and found.surrogate == surrogate
    assert "blocks" in found.container
    assert "layer stack" in str(found)


def test_decode_graph_with_kv_cache():
    model = tiny()
    cache = StaticKVCache(model.config, 2, 32)
    found = report(model, IDX[:, :1], kv_cache=cache)
    assert found.found and found.layers == [0, 1, 2, 3] and found.groups == [[0, 1, 2, 3]]


def residual(width=8):
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.Tanh())


class Stack(nn.Module):
    def __init__(self, depth=4):
        super().__init__()
        self.layers = nn.ModuleList([residual() for _ in range(depth)])


class SkipTwoBack(Stack):
    def forward(self, x):
        prev = x
        for layer in self.layers:
            x, prev = x + layer(x) + prev, x
        return x


class CollectsStates(Stack):
    def forward(self, x):
        states = []
        for layer in self.layers:
            x = x + layer(x)
            states.append(x)
        return torch.stack(states).sum(0)


class GraphBreak(Stack):
    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = x + layer(x)
            if i == 1:
                torch._dynamo.graph_break()
        return x


class DataDependent(Stack):
    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x) if x.sum() > 0 else x - layer(x)
        return x


class OneLayer(Stack):
    def __init__(self):
        super().__init__(depth=1)

    def forward(self, x):
        return x + self.layers[0](x)


class Grow(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, 1)

    def forward(self, x):
        return torch.cat([x, self.lin(x)], -1)


class Widening(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Grow(8 + i) for i in range(4)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize(
    "model, reason",
    [
        (SkipTwoBack, "not a chain"),
        (CollectsStates, "not a chain"),
        (Widening, "changes the state"),
        (GraphBreak, "graph break"),
        (DataDependent, "graph break"),
        (OneLayer, "only one layer"),
    ],
)
def test_refusals_say_why(model, reason):
    reports = find_layer_stack(model(), (torch.randn(2, 8),))
    assert reports and not any(r.found for r in reports)
    assert any(reason in r.reason for r in reports), [r.reason for r in reports]


def test_no_module_list():
    (found,) = find_layer_stack(nn.Linear(4, 4), (torch.randn(1, 4),))
    assert not found.found and "indexed module container" in found.reason


class KwargsLayer(nn.Module):
    """Hugging Face style: keyword arguments in, a tuple out."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(8, 8)

    def forward(self, hidden_states, attention_mask=None, position_bias=None):
        out = hidden_states + torch.tanh(self.mlp(hidden_states) * attention_mask + position_bias)
        return (out, None)


class KwargsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList([KwargsLayer() for _ in range(3)])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.embed(x)
        mask = torch.sigmoid(h.mean(-1, keepdim=True))
        bias = torch.ones_like(h) * 0.1
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_bias=bias)[0]
        return self.head(h)


def test_tuple_outputs_and_keyword_arguments():
    found = report(KwargsModel(), torch.randn(2, 5, 4))
    assert found.found and found.layers == [0, 1, 2] and found.groups == [[0, 1, 2]]
    assert found.surrogate == "identity"


def test_random_op_names_seeded_ops_unless_switched_off():
    """Torch-level, aten-level and method calls; dropout-like ops with training=False and SDPA with
    dropout_p=0 draw nothing."""
    import torch.nn.functional as F
    from torch.fx import Graph

    from snlp_compile.fx.randomness import random_op

    graph = Graph()
    x = graph.placeholder("x")
    aten = torch.ops.aten
    cases = [
        (aten.scaled_dot_product_attention.default, (x, x, x), {}, None),
        (aten.scaled_dot_product_attention.default, (x, x, x, None, 0.1), {}, "scaled_dot_product_attention"),
        (aten._scaled_dot_product_flash_attention_for_cpu.default, (x, x, x, 0.0, True), {}, None),
        (aten.dropout.default, (x, 0.5, False), {}, None),
        (aten.native_dropout.default, (x, 0.5, True), {}, "native_dropout"),
        (F.scaled_dot_product_attention, (x, x, x), {"is_causal": True}, None),
        (F.scaled_dot_product_attention, (x, x, x, None, 0.2), {}, "scaled_dot_product_attention"),
        (F.dropout, (x, 0.1, False), {}, None),
        (F.dropout, (x,), {}, "dropout"),  # training defaults to True
        (torch.randn_like, (x,), {}, "randn_like"),
        (torch.rms_norm, (x, (4,)), {}, None),
    ]
    for target, args, kwargs, expected in cases:
        assert random_op(graph.call_function(target, args, kwargs)) == expected, (target, args, kwargs)
    assert random_op(graph.call_method("bernoulli_", (x, 0.5))) == "bernoulli"
    assert random_op(graph.call_method("view", (x, 4))) is None


def test_find_layer_stack_keeps_the_process_compiled_models():
    """It traces a fresh copy of its own entry function: models compiled before it stay compiled."""
    model, idx = GPT(GPTConfig.preset("tiny")).eval(), torch.randint(0, 64, (1, 8))
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=counting)
    with torch.no_grad():
        compiled(idx)
        (report,) = find_layer_stack(model, (idx,))
        compiled(idx)
    assert report.found and report.container == "L['self'].blocks" and len(compiles) == 1


def test_writes_through_a_list_or_an_out_tuple_are_writes():
    """`torch._foreach_mul_` writes the tensors of its list, `out=(a, b)` writes a and b."""
    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    foreach = graph.call_function(torch._foreach_mul_, ([a, b], 2.0))
    assert written_arg(foreach) == (("args", 0, 0), a)
    sort = graph.call_function(torch.sort, (a,), {"dim": -1, "out": (b, a)})
    assert written_arg(sort) == (("kwargs", "out", 0), b)
    assert written_arg(graph.call_function(torch._foreach_mul, ([a, b], 2.0))) is None
    assert written_arg(graph.call_function(torch.sort, (a,), {"dim": -1})) is None
