"""HCN from stream mixing however it is written: einsum over streams folded into the batch (the
official mHC layout), einsum on a stream axis in the middle, and matmul on [..., M, d] states."""

import pytest
import torch
from torch import nn

from snlp_compile.passes.analysis.detect import detect_layer_stack
from snlp_compile.passes.analysis.surrogate import choose_recipe
from tests.helpers.dynamo_graphs import traced
from tests.helpers.foreign_models import BlockStack, sinkhorn

M, D = 3, 8


class FoldedBlock(nn.Module):
    """State [B * M, T, D]; H_res from parameters by Sinkhorn; mixing by einsum over the unfolded streams."""

    def __init__(self):
        super().__init__()
        self.res_logits = nn.Parameter(2.0 * torch.eye(M) + 0.3 * torch.randn(M, M))
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.Tanh(), nn.Linear(2 * D, D))
        self.post = nn.Parameter(torch.randn(M))

    def forward(self, x):
        bm, t, d = x.shape
        residuals = x.view(bm // M, M, t, d)
        update = self.mlp(residuals.mean(1))  # one branch on the streams' mean
        mixed = torch.einsum("ij,bjkl->bikl", sinkhorn(self.res_logits), residuals)
        return (mixed + self.post[None, :, None, None] * update[:, None]).reshape(bm, t, d)


class MiddleAxisBlock(FoldedBlock):
    """State [B, M, T, D]: einsum with the contracted index first ("ji": J = H transposed)."""

    def forward(self, x):
        update = self.mlp(x.mean(1))
        mixed = torch.einsum("ji,bjkl->bikl", sinkhorn(self.res_logits), x)
        return mixed + self.post[None, :, None, None] * update[:, None]


class MatmulBlock(FoldedBlock):
    """State [B, T, M, D]: H_res @ h."""

    def forward(self, x):
        update = self.mlp(x.mean(-2))
        return sinkhorn(self.res_logits) @ x + self.post[:, None] * update.unsqueeze(-2)


CASES = {
    "folded": (FoldedBlock, (2 * M, 5, D), (-3, 1)),
    "middle": (MiddleAxisBlock, (2, M, 5, D), (-3, 1)),
    "matmul": (MatmulBlock, (2, 5, M, D), (-2, 1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_mixing_is_read_off_as_hcn(case):
    block, shape, stream = CASES[case]
    torch.manual_seed(0)
    model, x = BlockStack(block), torch.randn(*shape)
    match = detect_layer_stack(traced(model, x)[0])
    recipe = choose_recipe(match.layers[0], "hc")
    assert recipe.kind == "mix" and recipe.stream == stream


@pytest.mark.parametrize("case", sorted(CASES))
def test_hcn_reaches_sequential_sooner_than_idn_and_is_exact_at_full_iterations(case):
    block, shape, _ = CASES[case]
    torch.manual_seed(0)
    model, x = BlockStack(block), torch.randn(*shape)
    with torch.no_grad():
        expected = model(x)

        def run(**options):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="snlp", options=dict(inner="eager", fallback="error", **options))
            return compiled(x)

        exact = run(iters=4, surrogate="hc")
        hcn = (run(iters=2, surrogate="auto") - expected).norm()
        idn = (run(iters=2, surrogate="identity") - expected).norm()
    torch.testing.assert_close(exact, expected, atol=1e-5, rtol=1e-5)
    assert hcn < 0.5 * idn
