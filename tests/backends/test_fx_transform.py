"""snlp_transform: the SNLP rewrite of torch.export and symbolic_trace graphs."""

import pytest
import torch
from torch import nn

from snlp_compile import SNLPFallbackError
from snlp_compile.backends.fx_transform import snlp_transform
from snlp_compile.models import GPT, GPTConfig

IDX = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def tiny():
    return GPT(GPTConfig.preset("tiny", sequence_len=16))


def test_snlp_transform_takes_a_graph_module():
    with pytest.raises(TypeError, match=r"snlp_transform takes a torch.fx.GraphModule, got GPT: pass torch.export"):
        snlp_transform(tiny(), (IDX,))


def test_fx_transform_of_an_exported_gpt():
    model = tiny().eval()
    exported = torch.export.export(model, (IDX,)).module()
    nodes = len(exported.graph.nodes)
    with torch.no_grad():
        exact = snlp_transform(exported, (IDX,), dict(iters=4, fallback="error"))(IDX)
        one = snlp_transform(exported, (IDX,), dict(iters=1, fallback="error"))(IDX)
        torch.testing.assert_close(exact, model(IDX), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(one, model(IDX), atol=1e-3)
    assert len(exported.graph.nodes) == nodes and not hasattr(exported, "snlp_stack")


def test_fx_transform_of_a_symbolic_trace_and_graphs_without_module_paths():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(8, 8)

        def forward(self, x):
            return x + torch.tanh(self.w(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Residual() for _ in range(3)])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    net, x = Net(), torch.randn(2, 8)
    traced = torch.fx.symbolic_trace(net)
    with torch.no_grad():
        torch.testing.assert_close(snlp_transform(traced, (x,), dict(iters=3, fallback="error"))(x), net(x))
        assert not torch.allclose(snlp_transform(traced, (x,), dict(iters=1))(x), net(x), atol=1e-3)
    flat = torch.fx.experimental.proxy_tensor.make_fx(net)(x)
    with pytest.raises(SNLPFallbackError, match="nn_module_stack"):
        snlp_transform(flat, (x,), dict(fallback="error"))
    assert snlp_transform(flat, (x,)) is flat
