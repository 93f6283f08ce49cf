"""The paper's own model forms, re-created: rewritten by the backend (never a fallback), exact at
K >= the block size in outputs and gradients, approximate at K = 1, and regularised."""

import pytest
import torch

from snlp_compile import SNLPRegularizer
from tests.helpers.foreign_models import FoldedMHC, NanoGPT

IDX = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
MODELS = {"nanochat": NanoGPT, "folded_mhc": FoldedMHC}


def _build(name):
    torch.manual_seed(0)
    return MODELS[name]()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rewritten_exact_at_full_iterations_and_approximate_at_one(name):
    model = _build(name)
    expected = model(IDX)
    params = list(model.parameters())
    grads = torch.autograd.grad(expected.square().sum(), params)
    depth = len(model.h if name == "nanochat" else model.blocks)
    out = torch.compile(model, backend="snlp", options=dict(iters=depth, inner="eager", fallback="error"))(IDX)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(out.square().sum(), params), grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()
    with torch.no_grad():
        one = torch.compile(model, backend="snlp", options=dict(iters=1, fallback="error"))(IDX)
    assert not torch.allclose(one, expected, atol=1e-3)


def test_folded_mhc_takes_hcn_which_beats_idn():
    """The expanded streams start equal, where any doubly stochastic H_res acts as I: HCN pulls ahead
    once they differ (K = 3 of 4 layers; at K = 2 the two are within 15%)."""
    model = _build("folded_mhc")
    with torch.no_grad():
        expected = model(IDX)
        errors = {}
        for surrogate in ("auto", "identity"):
            torch._dynamo.reset()
            options = dict(iters=3, surrogate=surrogate, inner="eager", fallback="error")
            errors[surrogate] = (torch.compile(model, backend="snlp", options=options)(IDX) - expected).norm()
    assert errors["auto"] < 0.5 * errors["identity"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_regularised_with_gradients_reaching_every_layer_and_the_mixing(name):
    model = _build(name)
    reg = SNLPRegularizer(model, weight=1.0, n_par=len(model.h if name == "nanochat" else model.blocks))
    model(IDX)
    loss = reg.loss()
    assert loss.item() > 0
    loss.backward()
    blocks = model.h if name == "nanochat" else model.blocks
    for block in blocks:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    if name == "folded_mhc":
        assert all(b.res_logits.grad.abs().sum() > 0 for b in blocks[1:])
    else:
        assert model.x0_lambdas.grad.abs().sum() > 0 and model.value_embeds["1"].weight.grad.abs().sum() > 0
