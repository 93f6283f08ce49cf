"""Grad mode, autocast, detach, hidden writes, symbolic shapes and dropout 0 in a layer stack: the
compiled model equals eager (outputs, gradients, None gradients, buffers) at iters = layers, or the
backend runs the graph unmodified and says why."""

import contextlib
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snlp_compile.fx.randomness import random_op
from snlp_compile.fx.writes import written_arg
from tests.helpers.dynamo_graphs import traced

WIDTH, DEPTH = 8, 4
FALLBACK = "snlp: running this graph unmodified: "


class Block(nn.Module):
    """A residual layer; `body` picks what its branch does besides a linear and tanh."""

    def __init__(self, body: str = ""):
        super().__init__()
        self.body = body
        self.norm, self.linear, self.gate = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.drop = nn.Dropout(0.0)
        self.register_buffer("running_mean", torch.zeros(WIDTH))
        self.register_buffer("running_var", torch.ones(WIDTH))

    def forward(self, x):
        y = self.linear(self.norm(x))
        if self.body == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = self.gate(y).float()
        elif self.body == "no_grad gate":
            with torch.no_grad():
                gate = torch.sigmoid(self.gate(x))
            y = y * gate
        elif self.body == "batch_norm":
            y = F.batch_norm(y.flatten(0, -2), self.running_mean, self.running_var, training=True).view_as(y)
        elif self.body == "dropout 0":
            y = self.drop(y)
        elif self.body == "detached branch":
            y = self.gate(x.detach()) + y
        return x + torch.tanh(y)


class Model(nn.Module):
    """An embedding, a stack of `Block`s, a head. `region` ("no_grad", "autocast") wraps the layers in
    `wrapped` one by one, or with wrapped="all" the whole layer loop; `between` ("detach", "graph
    break") follows each layer in `after`."""

    def __init__(self, body="", region="", wrapped=(0, 1), between="", after=(1,)):
        super().__init__()
        self.embed, self.head = nn.Linear(4, WIDTH), nn.Linear(WIDTH, 3)
        self.layers = nn.ModuleList([Block(body) for _ in range(DEPTH)])
        self.region, self.wrapped, self.between, self.after = region, wrapped, between, after

    def context(self, wrapped):
        if not wrapped or not self.region:
            return contextlib.nullcontext()
        return torch.no_grad() if self.region == "no_grad" else torch.autocast("cpu", dtype=torch.bfloat16)

    def forward(self, x):
        x = self.embed(x)
        with self.context(self.wrapped == "all"):
            for i, layer in enumerate(self.layers):
                with self.context(self.wrapped != "all" and i in self.wrapped):
                    x = layer(x)
                if i in self.after and self.between == "detach":
                    x = x.detach()
                if i in self.after and self.between == "graph break":
                    torch._dynamo.graph_break()
        return self.head(x.float())


X = torch.randn(2, 5, 4)


def run(model, compiled, x=X, steps=1):
    """Outputs of `steps` forward/backward passes with an AdamW step between two, then the gradients,
    buffers and parameters."""
    fn = model if compiled is None else compiled
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    outs = []
    for step in range(steps):
        if step:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out = fn(x)
        if out.requires_grad:
            out.square().mean().backward()
        outs.append(out.detach())
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return outs, grads, {n: b.clone() for n, b in model.named_buffers()}, dict(model.named_parameters())


def assert_equal_to_eager(model, caplog, reason=None, x=X, steps=1, atol=1e-5, **compile_kwargs):
    """The compiled copy equals eager; with `reason`, the backend fell back saying so, else it rewrote."""
    reference = copy.deepcopy(model)
    options = {"iters": DEPTH, "inner": "eager"}
    compiled = torch.compile(model, backend="snlp", options=options, **compile_kwargs)
    with caplog.at_level(logging.INFO, logger="snlp_compile"):
        got = run(model, compiled, x, steps)
    want = run(reference, None, x, steps)
    if reason is None:
        assert "rewrote" in caplog.text and FALLBACK not in caplog.text, caplog.text
    else:
        assert FALLBACK + reason in caplog.text and "rewrote" not in caplog.text, caplog.text
    for a, b in zip(got[0], want[0], strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    assert [n for n, g in got[1].items() if g is None] == [n for n, g in want[1].items() if g is None]
    for part in (1, 2, 3):  # gradients, buffers, parameters
        for name, value in got[part].items():
            if value is not None:
                torch.testing.assert_close(value, want[part][name], atol=atol, rtol=atol, msg=name)


def test_no_grad_around_some_layers_falls_back(caplog):
    """Frozen layers: eager gives them and the embedding no gradient."""
    assert_equal_to_eager(Model(region="no_grad"), caplog, "the grad mode changes inside the stack")


def test_no_grad_gate_inside_a_layer_falls_back(caplog):
    assert_equal_to_eager(Model("no_grad gate"), caplog, "the grad mode changes inside the stack")


def test_autocast_around_some_layers_falls_back(caplog):
    assert_equal_to_eager(Model(region="autocast"), caplog, "the autocast state changes inside the stack")


def test_autocast_inside_a_layer_falls_back(caplog):
    assert_equal_to_eager(Model("autocast"), caplog, "the autocast state changes inside the stack")


def test_detach_between_layers_falls_back_when_training(caplog):
    """Truncated backprop: eager gives the layers below the detach no gradient."""
    reason = "x_3 (detach) in layer L['self'].layers.2 stops the gradient of the state"
    assert_equal_to_eager(Model(between="detach"), caplog, reason, steps=2)


def test_functional_batch_norm_with_running_stats_falls_back(caplog):
    """F.batch_norm writes its running statistics although its schema declares no write; vmap would
    drop that write into each layer's copy, so the graph falls back, naming the write."""
    assert_equal_to_eager(Model("batch_norm"), caplog, "", steps=3)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith(FALLBACK)]
    assert "writes l_self_modules_layers_modules_0_buffers_running_mean_" in line and "without declaring" in line


@pytest.mark.parametrize(
    "kw",
    [
        dict(region="no_grad", between="graph break", after=(0,)),
        dict(region="autocast", wrapped="all", between="graph break", after=(1,)),
    ],
    ids=["no_grad", "autocast"],
)
def test_graph_breaks_in_a_region_run_as_eager(caplog, kw):
    """Dynamo compiles the layers one frame at a time there: nothing to rewrite, and eager's answer."""
    reason = "no node was traced inside an indexed module container"
    assert_equal_to_eager(Model(**kw), caplog, reason, atol=1e-2 if kw["region"] == "autocast" else 1e-5)


@pytest.mark.parametrize("region", ["no_grad", "autocast"])
def test_a_region_around_the_whole_stack_is_rewritten(caplog, region):
    """One state for the whole stack: the rewrite runs under it (bf16 autocast: to bf16 rounding)."""
    atol = 1e-2 if region == "autocast" else 1e-5
    assert_equal_to_eager(Model(region=region, wrapped="all"), caplog, atol=atol)


def test_detach_at_inference_is_rewritten(caplog):
    with torch.no_grad():
        assert_equal_to_eager(Model(between="detach"), caplog)


def test_a_detached_branch_is_rewritten(caplog):
    """The state's gradient still flows through the residual: nothing is bypassed."""
    assert_equal_to_eager(Model("detached branch"), caplog, steps=2)


def test_dropout_zero_in_training_mode_is_rewritten(caplog):
    assert_equal_to_eager(Model("dropout 0").train(), caplog, steps=2)


def test_transformer_encoder_with_dropout_zero_trains_rewritten(caplog):
    layer = nn.TransformerEncoderLayer(WIDTH, 2, 16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, DEPTH, enable_nested_tensor=False).train()
    assert_equal_to_eager(model, caplog, x=torch.randn(2, 5, WIDTH))


def test_symbolic_sizes_equal_to_concrete_ones_are_rewritten(caplog):
    """dynamic=True: the state enters with a symbolic width that LayerNorm pins to 8 and leaves with
    a concrete 8; each layer's LayerNorm eps and dropout probability are symbolic floats pinned to a number."""
    model = nn.Sequential(*[Block("dropout 0") for _ in range(DEPTH)]).train()
    assert_equal_to_eager(model, caplog, x=torch.randn(2, 5, WIDTH), dynamic=True)


def test_random_op_draws_nothing_at_probability_zero():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    assert random_op(graph.call_function(F.dropout, (x, 0.0, True))) is None
    assert random_op(graph.call_function(F.dropout, (x,), {"p": 0, "training": True})) is None
    assert random_op(graph.call_function(torch.ops.aten.native_dropout.default, (x, 0.0, True))) is None
    assert random_op(graph.call_function(F.dropout, (x, 0.1, True))) == "dropout"


@pytest.mark.parametrize("training", [True, False])
def test_hidden_writes_of_a_functional_batch_norm(training):
    """Its aten schema declares no write; the ops it dispatches to do, and only when training."""

    def fn(x, mean, var):
        return F.batch_norm(x, mean, var, training=training)

    gm, _ = traced(fn, torch.randn(4, 3), torch.zeros(3), torch.ones(3))
    (node,) = [n for n in gm.graph.nodes if n.target is F.batch_norm]
    mean = node.args[1]
    assert written_arg(node) == ((("args", 1), mean) if training else None)
