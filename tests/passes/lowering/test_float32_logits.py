"""fuse_float32_logits: a 16-bit bias-free linear followed by a float32 cast becomes one snlp::float32_linear."""

import pytest
import torch
import torch.nn.functional as F
from torch.fx import GraphModule

import snlp_compile  # noqa: F401  (registers the backend)
from snlp_compile.backends import dynamo
from snlp_compile.models import GPT
from snlp_compile.models.config import GPTConfig
from snlp_compile.passes.lowering.float32_logits import fuse_float32_logits

FUSED = torch.ops.snlp.float32_linear.default


def _captured(fn, *inputs) -> GraphModule:
    """The graph dynamo hands a backend for fn(*inputs)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=capture, fullgraph=True)(*inputs)
    return graphs[0]


def _count(gm: GraphModule) -> int:
    return sum(node.target is FUSED for node in gm.graph.nodes)


@pytest.mark.parametrize("cast", [lambda y: y.float(), lambda y: y.to(torch.float32)], ids=["float", "to"])
def test_linear_and_cast_become_one_call_with_the_same_values(cast):
    x, w = torch.randn(3, 5, 8, dtype=torch.bfloat16), torch.randn(16, 8, dtype=torch.bfloat16)
    gm = _captured(lambda x, w: cast(F.linear(x, w)) * 2, x, w)
    (expected,) = gm(x, w)
    assert fuse_float32_logits(gm.graph) == 1
    gm.graph.lint()
    gm.recompile()
    assert _count(gm) == 1
    (out,) = gm(x, w)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # off CUDA: exactly linear + cast


def _linear_with_other_uses(x, w):
    y = F.linear(x, w)
    return y.float() + y.sum()


def _autocast_linear(x, w):
    """A float32 linear that autocast runs in bf16: the op would compute it from float32 inputs."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.linear(x.float(), w.float())
    return y.float()


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, w: F.linear(x, w, torch.ones(16, dtype=x.dtype)).float(),  # a bias
        _linear_with_other_uses,  # the 16-bit output is read elsewhere too
        lambda x, w: F.linear(x.float(), w.float()).float(),  # float32 linear: nothing to save
        lambda x, w: F.linear(x, w).to(torch.float16),  # not a float32 cast
        lambda x, w: F.linear(x, w).to(dtype=torch.float32, copy=True),  # a cast with more to it
        lambda x, w: F.linear(x, w).to("cpu", torch.float32),
        _autocast_linear,
    ],
    ids=["bias", "other-uses", "float32", "float16-cast", "copy", "device", "autocast"],
)
def test_other_patterns_are_left_alone(fn):
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(16, 8, dtype=torch.bfloat16)
    gm = _captured(fn, x, w)
    assert fuse_float32_logits(gm.graph) == 0


def test_the_backend_computes_bf16_logits_in_one_float32_gemm(monkeypatch):
    """A bf16 GPT through the backend: the LM head and its cast are one call, and K = chunk still
    reproduces the sequential model."""
    graphs = []
    real = dynamo.inner_compile

    def capture(gm, example_inputs, config):
        graphs.append(gm)
        return real(gm, example_inputs, config)

    monkeypatch.setattr(dynamo, "inner_compile", capture)
    model = GPT(GPTConfig.preset("tiny")).to(torch.bfloat16).eval()
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        expected = model(idx)
        out = torch.compile(model, backend="snlp", options=dict(iters=4, inner="eager", fallback="error"))(idx)
    assert [_count(gm) for gm in graphs] == [1]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0.02, atol=0.05)


def test_training_graphs_keep_the_linear():
    graphs = []
    real = dynamo.inner_compile

    def capture(gm, example_inputs, config):
        graphs.append(gm)
        return real(gm, example_inputs, config)

    model = GPT(GPTConfig.preset("tiny")).to(torch.bfloat16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamo, "inner_compile", capture)
        torch.compile(model, backend="snlp", options=dict(inner="eager", fallback="error"))(
            torch.randint(0, 64, (1, 8))
        ).sum().backward()
    assert graphs and all(_count(gm) == 0 for gm in graphs)
    assert all(hasattr(gm, "snlp_stack") for gm in graphs)  # rewritten, not a fallback
