"""rewrite_stack: a decode step's in-place KV-cache writes and linears are batched over the layers."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from snlp_compile.kernels.stacked_linear import bias_free_linear
from snlp_compile.models import GPT, GPTConfig, StaticKVCache
from snlp_compile.passes.lowering.batching import index_copy_, needs_batched_attention


@pytest.mark.parametrize("dim", [2, -2])
def test_index_copy_equals_tensor_index_copy(dim):
    target = torch.randn(3, 2, 7, 4)
    source = torch.randn(3, 2, 2, 4)
    index = torch.tensor([5, 1])
    expected = target.clone().index_copy_(dim, index, source)
    out = index_copy_(target, dim, index, source)
    assert out is target and torch.equal(target, expected)


def test_index_copy_under_vmap_with_a_per_layer_index():
    """Each layer writes its own positions (a batched index): vmap still gives every layer's own write."""
    caches, sources = torch.zeros(3, 2, 2, 6, 4), torch.randn(3, 2, 2, 1, 4)
    index = torch.tensor([[1], [4], [0]])
    expected = torch.stack([caches[i].clone().index_copy_(2, index[i], sources[i]) for i in range(3)])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="There is a performance drop")
        torch.vmap(index_copy_, in_dims=(0, None, 0, 0))(caches, 2, index, sources)
    assert torch.equal(caches, expected)


@pytest.mark.parametrize(
    "gemv, inner, n_seq",
    [(False, "eager", 0), (True, "eager", 0), (True, "inductor", 0), (True, "eager", 2), (True, "inductor", 2)],
)
def test_decode_step_writes_the_cache_like_eager_without_a_per_layer_loop(monkeypatch, gemv, inner, n_seq):
    """iters = n_layer: the cache and logits equal the eager step's, vmap never falls back to a
    per-layer loop for the cache write (its warning is an error here), also with sequential
    layers before the block (n_seq), and with gemv the layer
    graphs call snlp::linear for their six linears (q, k and v in one call; attention out, MLP in
    and out) and the graph around the stack for its LM head."""
    from snlp_compile.backends import dynamo

    graphs, real = [], dynamo.inner_compile
    monkeypatch.setattr(
        dynamo, "inner_compile", lambda gm, inputs, config: graphs.append(gm) or real(gm, inputs, config)
    )
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny")).eval()
    prompt, token = torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (2, 1))
    caches = [StaticKVCache(model.config, 2, 12) for _ in range(2)]
    options = dict(iters=4, inner=inner, fallback="error", gemv=gemv, n_seq=n_seq)
    compiled = torch.compile(model, backend="snlp", options=options)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="There is a performance drop")
        for cache in caches:
            model(prompt, kv_cache=cache)
        expected = model(token, kv_cache=caches[0])
        out = compiled(token, kv_cache=caches[1])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].v, caches[0].v, rtol=1e-5, atol=1e-5)
    assert int(caches[1].pos) == int(caches[0].pos) == 6
    targets = [n.target for n in graphs[0].snlp_stack.functions[0].graph.nodes]
    assert targets.count(bias_free_linear) == (3 if gemv else 0)  # attention out, MLP in and out
    assert targets.count(torch.ops.snlp.linear.default) == (1 if gemv else 0)  # q, k and v in one call
    program = graphs[0].snlp_stack
    assert (program.one_layer_functions is not None) == (gemv or inner == "eager")  # one-layer calls: own graphs
    outer = [n.target for n in graphs[0].graph.nodes]
    assert outer.count(bias_free_linear) == (1 if gemv else 0)  # the LM head


@pytest.mark.parametrize(
    "device, dtype, batch, masked, expected",
    [
        ("cpu", torch.float32, 1, False, True),  # CPU: no batching rule for the flash kernel
        ("cuda", torch.bfloat16, 1, True, False),  # vmap's rule: inductor sees SDPA
        ("cuda", torch.bfloat16, 2, True, True),  # the efficient kernel rejects the vmapped mask
        ("cuda", torch.float32, 1, True, True),  # float32 picks the efficient kernel at batch 1 too
        ("cuda", torch.float32, 1, False, False),
    ],
)
def test_which_attention_calls_take_the_batched_op(device, dtype, batch, masked, expected):
    graph = torch.fx.Graph()
    q, k, v, mask = (graph.placeholder(name) for name in "qkvm")
    with torch._subclasses.FakeTensorMode():
        q.meta["val"] = torch.empty(batch, 2, 3, 8, dtype=dtype, device=device)
    node = graph.call_function(F.scaled_dot_product_attention, (q, k, v), {"attn_mask": mask} if masked else {})
    assert needs_batched_attention(node) is expected


def test_only_the_sequential_layers_take_per_layer_inputs(monkeypatch):
    """The stack program receives per-layer inputs for the n_seq sequential layers alone, and the
    rewritten graph computes each layer input's value once (the rotary tables that every layer,
    and in it q and k, cast to its dtype): eagerly run, each copy costs host time per call."""
    from snlp_compile.backends import dynamo

    graphs, real = [], dynamo.inner_compile
    monkeypatch.setattr(
        dynamo, "inner_compile", lambda gm, inputs, config: graphs.append(gm) or real(gm, inputs, config)
    )
    originals = []
    real_analyse = dynamo.analyse
    monkeypatch.setattr(dynamo, "analyse", lambda gm, config: originals.append(gm) or real_analyse(gm, config))
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny")).eval()
    idx = torch.randint(0, 64, (2, 7))
    compiled = torch.compile(model, backend="snlp", options=dict(n_seq=1, iters=3, inner="eager", fallback="error"))
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx), rtol=1e-4, atol=1e-4)
    (gm,), (original,) = graphs, originals
    stack = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "snlp_stack")
    assert len(stack.args[1]) == 1  # per_layer: the one sequential layer
    assert not [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and not n.users]

    def casts(graph_module):
        return len([n for n in graph_module.graph.nodes if n.op == "call_method" and n.target == "to"])

    assert casts(original) == 4 * model.config.n_layer  # cos and sin, for q and for k, in every layer
    assert casts(gm) == 2  # cos and sin, once: what the sequential layer and the group read
    (seq_inputs,) = stack.args[1]
    tables = [a for a in seq_inputs if a.op == "call_method" and a.target == "to"]
    assert len(tables) == 4 and len(set(tables)) == 2


def test_canonical_inputs_respect_in_place_writes_in_between():
    """A layer input repeats an earlier one's value only if nothing writes what both are computed
    from between them."""
    from types import SimpleNamespace

    from snlp_compile.passes.rewrite.inputs import canonical_inputs

    def f(buf, x):
        a = buf.to(torch.float16)
        buf.add_(1)
        b = buf.to(torch.float16)  # buf changed since `a`
        c = buf.to(torch.float16)  # the same value as `b`
        d = x.to(torch.float16)
        return a, b, c, d

    graph = torch.fx.symbolic_trace(f).graph
    a, b, c, d = (n for n in graph.nodes if n.op == "call_method" and n.target == "to")
    layers = [SimpleNamespace(inputs=[a, d], nodes=[]), SimpleNamespace(inputs=[b, d], nodes=[])]
    layers.append(SimpleNamespace(inputs=[c, d], nodes=[]))
    assert canonical_inputs(graph, layers) == {a: a, b: b, c: b, d: d}


def test_canonical_inputs_keep_inputs_the_layers_write_apart():
    """Two equal zero tensors that a layer writes (a key and a value cache) stay two tensors."""
    from types import SimpleNamespace

    from snlp_compile.passes.rewrite.inputs import canonical_inputs

    def f(x):
        keys, values = torch.zeros_like(x), torch.zeros_like(x)
        keys.add_(x)
        values.add_(2 * x)
        return keys, values

    graph = torch.fx.symbolic_trace(f).graph
    keys, values = (n for n in graph.nodes if n.target is torch.zeros_like)
    writes = [n for n in graph.nodes if n.target == "add_"]
    layers = [SimpleNamespace(inputs=[keys, values], nodes=writes)]
    assert canonical_inputs(graph, layers) == {keys: keys, values: values}


@pytest.mark.parametrize("inner, training", [("eager", False), ("eager", True), ("inductor", False)])
def test_eager_inference_norms_take_the_fused_op_under_vmap(monkeypatch, inner, training):
    """With the eager inner compiler at inference the vmapped layer graphs call snlp::rms_norm (vmap
    would run torch.rms_norm's float32 decomposition) and the one-layer graphs keep torch.rms_norm;
    for inductor and for training graphs nothing changes. Exact at iters = n_layer either way."""
    from snlp_compile.backends import dynamo

    rms_norm = torch.ops.snlp.rms_norm.default
    graphs, real = [], dynamo.inner_compile
    monkeypatch.setattr(dynamo, "inner_compile", lambda gm, inputs, cfg: graphs.append(gm) or real(gm, inputs, cfg))
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny"))
    idx = torch.randint(0, 64, (2, 7))
    compiled = torch.compile(model, backend="snlp", options=dict(n_seq=1, iters=3, inner=inner, fallback="error"))
    with torch.set_grad_enabled(training):
        torch.testing.assert_close(compiled(idx), model(idx), rtol=1e-4, atol=1e-4)
    program = graphs[0].snlp_stack
    fused = inner == "eager" and not training
    norms = [n.target for n in program.functions[0].graph.nodes if n.target in (rms_norm, torch.rms_norm)]
    assert norms and set(norms) == {rms_norm if fused else torch.rms_norm}
    if fused:
        one_layer = [n.target for n in program.one_layer_functions[0].graph.nodes]
        assert rms_norm not in one_layer and torch.rms_norm in one_layer


class _ScaledBlock(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = torch.nn.Linear(d, d, bias=False)

    def forward(self, x, scale):
        return x + torch.tanh(self.fc(x)) * scale


class _ReadsALayerInputAfterTheStack(torch.nn.Module):
    """Each layer gets its own cast of one parameter, and the code after the loop reads the last one."""

    def __init__(self, d: int = 8, n: int = 4):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_ScaledBlock(d) for _ in range(n))
        self.scale = torch.nn.Parameter(torch.rand(d))

    def forward(self, x):
        for block in self.blocks:
            scale = self.scale.to(x.dtype)
            x = block(x, scale)
        return x * scale


@pytest.mark.parametrize("n_seq", [0, 1])
def test_a_parallel_layers_input_read_after_the_stack_is_kept(n_seq):
    torch.manual_seed(0)
    model = _ReadsALayerInputAfterTheStack().eval()
    x = torch.randn(2, 3, 8)
    compiled = torch.compile(model, backend="snlp", options=dict(n_seq=n_seq, iters=4, inner="eager", fallback="error"))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_eager_inner_replays_traces_that_equal_vmap_with_two_blocks(monkeypatch):
    """blocks 2: the two blocks' stacked weights are slices at other offsets with one signature;
    the replayed traces give the vmap path's output bitwise."""
    from snlp_compile.backends import dynamo
    from snlp_compile.runtime import traced_vmap

    graphs, real = [], dynamo.inner_compile
    monkeypatch.setattr(dynamo, "inner_compile", lambda gm, inputs, cfg: graphs.append(gm) or real(gm, inputs, cfg))
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny")).eval()
    idx = torch.randint(0, 64, (2, 9))
    options = dict(blocks=2, iters=1, inner="eager", fallback="error")
    compiled = torch.compile(model, backend="snlp", options=options)
    with torch.no_grad():
        replayed = compiled(idx)
        assert graphs[0].snlp_stack.vmapped[0].traces
        monkeypatch.setattr(traced_vmap, "runs_eagerly", lambda values: False)
        assert torch.equal(compiled(idx), replayed)
