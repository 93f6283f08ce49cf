"""The snlp backend end to end on the reference models, on CPU (inner="eager" unless said)."""

import dataclasses
import logging
import pickle
import subprocess
import sys

import pytest
import torch

import snlp_compile
from snlp_compile import SNLPConfig
from snlp_compile.backends import dynamo
from snlp_compile.models import GPT, MHCGPT, GPTConfig, StaticKVCache
from tests.helpers.reference import solver_logits

VARIANTS = [
    (GPT, {}),
    (GPT, dict(x0_mixing=True)),
    (GPT, dict(window_pattern=(8, None), n_kv_head=2, softcap=15.0)),
    (MHCGPT, {}),
    (MHCGPT, dict(x0_mixing=True, n_kv_head=1)),
]
CONFIGS = [
    SNLPConfig(iters=1),
    SNLPConfig(iters=2, n_seq=1),
    SNLPConfig(iters=1, blocks=2, init="batch_fwd"),
    SNLPConfig(iters=1, fuse=2),
    SNLPConfig(iters=2, damping=0.25, surrogate="identity"),
]


def build(cls, kw, n_layer=4):
    model = cls(GPTConfig.preset("tiny", n_layer=n_layer, **kw)).eval()
    if kw.get("x0_mixing"):
        with torch.no_grad():
            model.resid_lambdas.uniform_(0.7, 1.3)
            model.x0_lambdas.uniform_(-0.5, 0.5)
    return model


def compiled(model, config, **changes):
    options = dataclasses.asdict(config.replace(inner="eager", fallback="error", **changes))
    return torch.compile(model, backend="snlp", options=options)


IDX = torch.randint(0, 64, (2, 16))


@pytest.mark.parametrize("cls, kw", VARIANTS)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@torch.no_grad()
def test_backend_equals_solver_core(cls, kw, config):
    model = build(cls, kw)
    out = compiled(model, config)(IDX)
    torch.testing.assert_close(out, solver_logits(model, IDX, config), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("cls, kw", VARIANTS)
@torch.no_grad()
def test_exact_when_iters_reach_block_size_and_not_at_one(cls, kw):
    model = build(cls, kw)
    eager = model(IDX)
    torch.testing.assert_close(compiled(model, SNLPConfig(iters=4))(IDX), eager, atol=2e-5, rtol=2e-5)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled(model, SNLPConfig(iters=2, blocks=2))(IDX), eager, atol=2e-5, rtol=2e-5)
    torch._dynamo.reset()
    assert (compiled(model, SNLPConfig(iters=1))(IDX) - eager).abs().max() > 1e-3  # the rewrite ran


@torch.no_grad()
def test_two_sequence_lengths_in_a_row():
    model = build(GPT, dict(x0_mixing=True))
    fn = compiled(model, SNLPConfig(iters=4))
    for T in (16, 9, 12):
        idx = torch.randint(0, 64, (2, T))
        torch.testing.assert_close(fn(idx), model(idx), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("cls, kw", [VARIANTS[1], VARIANTS[3]])
def test_backward_matches_autograd_through_the_solver_core(cls, kw):
    model = build(cls, kw)
    config = SNLPConfig(iters=1, fuse=2)
    compiled(model, config)(IDX).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    solver_logits(model, IDX, config).square().mean().backward()
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == reference.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], atol=1e-5, rtol=1e-4, msg=name)


@torch.no_grad()
def test_symbolic_sequence_lengths_with_and_without_a_kv_cache():
    """dynamic=True: the rewrite of graphs with symbolic sequence lengths is exact at iters = layers,
    with the KV cache written in place. (Under symbolic shapes dynamo's graph puts a layer in a group of
    its own, which must write its cache slice without vmap; inductor restarts dynamo's analysis to
    specialise a float, which the backend must let through rather than fall back.)"""
    model = build(GPT, {})
    options = dict(iters=4, fallback="error", inner="inductor")
    fn = torch.compile(model, backend="snlp", options=options, dynamic=True)
    for T in (9, 13):
        idx = torch.randint(0, 64, (1, T))
        torch.testing.assert_close(fn(idx), model(idx), atol=5e-5, rtol=5e-5)
        caches = [StaticKVCache(model.config, 1, 32) for _ in range(2)]
        torch.testing.assert_close(fn(idx, kv_cache=caches[0]), model(idx, kv_cache=caches[1]), atol=5e-5, rtol=5e-5)
        torch.testing.assert_close(caches[0].k, caches[1].k, atol=5e-5, rtol=5e-5)
        torch.testing.assert_close(caches[0].v, caches[1].v, atol=5e-5, rtol=5e-5)


def test_inductor_inference_and_training(monkeypatch):
    """Both compile through inductor, whose FX-graph cache key pickles the rewritten graph (a graph
    that does not pickle skips the cache with a logged traceback)."""
    graphs, real = [], dynamo.inner_compile
    monkeypatch.setattr(
        dynamo, "inner_compile", lambda gm, inputs, config: graphs.append(gm) or real(gm, inputs, config)
    )
    model = build(GPT, dict(x0_mixing=True))
    fn = torch.compile(model, backend="snlp", options=dict(iters=4, fallback="error"))
    with torch.no_grad():
        torch.testing.assert_close(fn(IDX), model(IDX), atol=5e-5, rtol=5e-5)
    pickle.dumps(graphs[0].snlp_stack)
    fn(IDX).sum().backward()
    assert model.blocks[2].mlp.c_fc.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_inner_compiler_failure_falls_back_to_the_unmodified_graph(monkeypatch, caplog):
    """When inductor fails on the rewrite, the original graph compiles as it was (the rewrite left
    dynamo's graph module, its buffers and parameter sources untouched) and the log says why."""

    real = dynamo.inner_compile

    def failing_on_the_rewrite(gm, example_inputs, config):
        if hasattr(gm, "snlp_stack"):
            raise RuntimeError("simulated inner compiler failure")
        return real(gm, example_inputs, config)

    monkeypatch.setattr(dynamo, "inner_compile", failing_on_the_rewrite)
    model = build(GPT, {})
    with caplog.at_level(logging.WARNING, logger="snlp_compile"):
        out = torch.compile(model, backend="snlp", options=dict(iters=1))(IDX)
    assert "the inner compiler failed on the rewrite (RuntimeError: simulated inner compiler failure)" in caplog.text
    torch.testing.assert_close(out, model(IDX), atol=5e-5, rtol=5e-5)  # sequential: the graph as it was


@torch.no_grad()
def test_weight_updates_after_compiling_are_seen(caplog):
    model = build(GPT, {})
    fn = compiled(model, SNLPConfig(iters=4))
    fn(IDX)
    model.blocks[1].mlp.c_fc.weight.mul_(1.5)  # in place: version counter moves
    torch.testing.assert_close(fn(IDX), model(IDX), atol=2e-5, rtol=2e-5)


@torch.no_grad()
def test_prepare_is_zero_copy_and_keeps_the_state_dict(caplog):
    model = build(MHCGPT, {})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snlp_compile.prepare(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    q = [b.attn.c_q.weight for b in model.blocks]
    assert len({w.untyped_storage().data_ptr() for w in q}) == 1
    with caplog.at_level(logging.INFO, logger="snlp_compile"):
        out = compiled(model, SNLPConfig(iters=4))(IDX)
    assert "copied" not in caplog.text and "rewrote 4 layers" in caplog.text
    torch.testing.assert_close(out, model(IDX), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "mode, patches",
    [
        (None, {}),  # only what a mode switches on is patched: a user's global inductor config stays
        ("reduce-overhead", {"triton.cudagraphs": True}),
        ("max-autotune", {"triton.cudagraphs": True, "max_autotune": True, "coordinate_descent_tuning": True}),
        ("max-autotune-no-cudagraphs", {"max_autotune": True, "coordinate_descent_tuning": True}),
    ],
)
@torch.no_grad()
def test_compile_modes_reach_inductor(monkeypatch, mode, patches):
    import torch._inductor.compile_fx as inductor

    seen = []

    def capture(gm, example_inputs, config_patches):
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(inductor, "compile_fx", capture)
    model = build(GPT, {})
    out = torch.compile(model, backend="snlp", mode=mode)(IDX)  # torch.compile takes a mode or options
    assert seen == [patches] and out.shape == (2, 16, 64)


def test_bad_options():
    model = build(GPT, {})
    with pytest.raises(Exception, match="unknown SNLP option"):
        torch.compile(model, backend="snlp", options={"iterations": 2})(IDX)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="n_seq must be < the number of layers"):
        torch.compile(model, backend="snlp", options={"n_seq": 4, "inner": "eager"})(IDX)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="max_autotune must be True or False"):
        torch.compile(model, backend="snlp", options={"max_autotune": "yes"})(IDX)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="mode must be one of"):
        torch.compile(model, backend="snlp", mode="fast")(IDX)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="surrogate='hc' needs stream mixing"):
        torch.compile(model, backend="snlp", options={"surrogate": "hc", "inner": "eager"})(IDX)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("bfloat16", 5e-2)])
def test_string_backend_in_a_fresh_process(dtype, tol):
    """Only `import snlp_compile`: every op the passes emit must be registered by the package itself
    (at inference in bf16 the float32-logits pass emits snlp::float32_linear)."""
    code = (
        "import torch, snlp_compile; from snlp_compile.models import GPT, GPTConfig; "
        "torch.set_grad_enabled(False); "
        f"m = GPT(GPTConfig.preset('tiny')).to(torch.{dtype}).eval(); x = torch.randint(0, 64, (1, 8)); "
        "out = torch.compile(m, backend='snlp', options={'iters': 4, 'inner': 'eager', 'fallback': 'error'})(x); "
        f"assert (out - m(x)).abs().max() < {tol}; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize(
    "options, device, training, warns",
    [
        (dict(gemv=True), "cuda", False, True),
        (dict(gemv=True, cudagraphs=True), "cuda", False, False),
        (dict(gemv=True, cudagraphs=True, inner="eager"), "cuda", False, True),  # no CUDA graphs in eager
        (dict(gemv=True), "cuda", True, False),  # training: gemv is off
        (dict(gemv=False), "cuda", False, False),
        (dict(gemv=True), "cpu", False, False),
    ],
)
def test_gemv_without_cuda_graphs_on_cuda_is_logged(caplog, options, device, training, warns):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from snlp_compile.backends.dynamo import warn_gemv_without_cudagraphs

    with FakeTensorMode():  # a CUDA input without a GPU: nothing is allocated
        inputs = [torch.empty(2, 3, device=device)]
    with caplog.at_level(logging.WARNING, logger="snlp_compile"):
        warn_gemv_without_cudagraphs(SNLPConfig(**options), inputs, training)
    assert ("gemv=True without CUDA graphs" in caplog.text) == warns


class _Noisy(torch.nn.Module):
    """A residual layer whose branch may draw random numbers from the state."""

    def __init__(self, body: str):
        super().__init__()
        self.linear, self.body, self.drop = torch.nn.Linear(8, 8), body, torch.nn.Dropout(0.5)

    def forward(self, x):
        y = torch.tanh(self.linear(x))
        if self.body == "dropout module":
            y = self.drop(y)
        elif self.body == "randn_like":
            y = y + 0.1 * torch.randn_like(y)
        elif self.body == "bernoulli_":
            y = y * torch.empty_like(y).bernoulli_(0.5)
        elif self.body == "dropout, training=False":
            y = torch.nn.functional.dropout(y, 0.5, training=False)
        return x + y


@pytest.mark.parametrize(
    "body, random",
    [("dropout module", True), ("randn_like", True), ("bernoulli_", True), ("dropout, training=False", False)],
)
@torch.no_grad()
def test_layers_that_draw_random_numbers_are_not_rewritten(body, random):
    """Each Newton iteration would draw new samples: no iteration count could reproduce the model, so
    the backend refuses such a stack, saying why; dropout in eval mode (or training=False) is exact."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_Noisy(body) for _ in range(4)])
    x = torch.randn(2, 3, 8)
    compiled = torch.compile(model, backend="snlp", options={"iters": 4, "inner": "eager", "fallback": "error"})
    if random:
        with pytest.raises(Exception, match=r"draws random numbers \((dropout|randn_like|bernoulli)\)"):
            compiled(x)
    else:
        torch.testing.assert_close(compiled(x), model(x))
    if body == "dropout module":  # in eval mode dropout is the identity: rewritten, and exact
        torch._dynamo.reset()
        model.eval()
        torch.testing.assert_close(compiled(x), model(x))
