"""Stream mixing whose matrix depends on the state (dynamic hyper-connections: H(h) per token) and
per-batch matrices through bmm: HCN with H at the current iterate, exact at full iterations in
outputs and gradients, closer to sequential than IDN at few iterations."""

import pytest
import torch
from torch import nn

from snlp_compile import SNLPRegularizer
from snlp_compile.passes.analysis.detect import detect_layer_stack
from snlp_compile.passes.analysis.surrogate import choose_recipe
from tests.helpers.dynamo_graphs import traced
from tests.helpers.foreign_models import BlockStack, sinkhorn

M, D, DEPTH = 3, 8, 4


class DynamicBlock(nn.Module):
    """State [B, T, M, D]; H = Sinkhorn(static) + alpha * tanh(proj(h)), one [M, M] per token."""

    def __init__(self):
        super().__init__()
        self.res_logits = nn.Parameter(2.0 * torch.eye(M) + 0.3 * torch.randn(M, M))
        self.proj = nn.Linear(D, M)
        self.alpha = nn.Parameter(torch.tensor(0.3))
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.Tanh(), nn.Linear(2 * D, D))
        self.post = nn.Parameter(torch.randn(M))

    def forward(self, x):
        mixing = sinkhorn(self.res_logits) + self.alpha * torch.tanh(self.proj(x))
        return mixing @ x + self.post[:, None] * self.mlp(x.mean(-2)).unsqueeze(-2)


class BmmBlock(DynamicBlock):
    """State [B, M, D]; the parameter-only H expanded over the batch and applied by torch.bmm."""

    def forward(self, x):
        mixing = sinkhorn(self.res_logits).expand(x.shape[0], M, M)
        return torch.bmm(mixing, x) + self.post[:, None] * self.mlp(x.mean(-2)).unsqueeze(-2)


CASES = {"dynamic": (DynamicBlock, (2, 5, M, D), (1,)), "bmm": (BmmBlock, (4, M, D), ())}


def _model(case):
    torch.manual_seed(0)
    block, shape, _ = CASES[case]
    return BlockStack(block, DEPTH), torch.randn(*shape)


def _run(model, x, **options):
    torch._dynamo.reset()
    options = {"inner": "eager", "fallback": "error", **options}
    return torch.compile(model, backend="snlp", options=options)(x)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_mixing_is_read_off_as_hcn(case):
    model, x = _model(case)
    recipe = choose_recipe(detect_layer_stack(traced(model, x)[0]).layers[0], "hc")
    assert recipe.kind == "mix" and recipe.stream == (-2, 1)
    assert bool(recipe.dynamic_nodes) == (case == "dynamic")


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_hcn_at_the_iterate_beats_idn_and_is_exact_at_full_iterations(case):
    model, x = _model(case)
    expected = model(x)
    for options in ({}, {"fuse": 2, "iters": 2}, {"init": "batch_fwd"}, {"blocks": 2}):
        exact = _run(model, x, **{"iters": DEPTH, "surrogate": "hc", **options})
        if options.get("fuse", 1) == 1:
            torch.testing.assert_close(exact, expected, atol=1e-5, rtol=1e-5)
    for iters in (1, 2):
        hcn = (_run(model, x, iters=iters) - expected).norm()
        idn = (_run(model, x, iters=iters, surrogate="identity") - expected).norm()
        assert 0 < hcn < 0.8 * idn


def test_gradients_at_full_iterations_equal_sequential_and_reach_the_mixing():
    model, x = _model("dynamic")
    model(x).square().sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    _run(model, x, iters=DEPTH).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-4, rtol=1e-4, msg=name)
    assert all(model.blocks[i].proj.weight.grad.abs().sum() > 0 for i in range(DEPTH))


@torch.no_grad()
def test_inductor_compiles_the_dynamic_solve():
    model, x = _model("dynamic")
    expected = _run(model, x, iters=2)
    torch.testing.assert_close(_run(model, x, iters=2, inner="inductor"), expected, atol=1e-5, rtol=1e-5)


def test_the_regulariser_trains_the_dynamic_model():
    model, x = _model("dynamic")
    regularizer = SNLPRegularizer(model, weight=1.0, n_par=[DEPTH], iters=[1])
    with regularizer:
        model(x)
    loss = regularizer.loss()
    loss.backward()
    assert loss > 0
    assert all(block.res_logits.grad is not None and block.res_logits.grad.abs().sum() > 0 for block in model.blocks)
