"""SNLPRegularizer.paper against a faithful re-implementation of the SNLP paper's regulariser."""

import pytest
import torch

from snlp_compile.models import GPT, MHCGPT, GPTConfig
from snlp_compile.models.layers import rms_norm
from snlp_compile.models.mhc import sinkhorn
from snlp_compile.training import SNLPRegularizer

IDX = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))


def tiny(cls):
    torch.manual_seed(0)
    model = cls(GPTConfig.preset("tiny", sequence_len=16, n_layer=6, x0_mixing=cls is GPT))
    if cls is GPT:
        with torch.no_grad():
            model.resid_lambdas.copy_(torch.linspace(0.8, 1.2, 6))
            model.x0_lambdas.copy_(torch.linspace(0.3, -0.2, 6))
    return model


def official(model, n_pars, stride):
    """The paper's formula written out: per n_par, K = 1 from h_init with J = I (GPT) or H_res(mlp) @
    H_res(attn) (mHC); the sum over scored layers of mean_t ||h~ - h|| / ||h|| over the last axis."""
    cfg, positions = model.config, torch.arange(IDX.shape[1])
    cos, sin = model.cos[positions], model.sin[positions]
    x0 = model.expand(rms_norm(model.wte(IDX)))
    mhc = isinstance(model, MHCGPT)

    def f(i, h):
        if cfg.x0_mixing:
            h = model.resid_lambdas[i] * h + model.x0_lambdas[i] * x0
        return model.blocks[i](h, cos, sin, positions)

    def rel(a, b):
        return ((a - b).float().norm(dim=-1) / b.float().norm(dim=-1).clamp(min=1e-6)).mean()

    def jac(i, delta):
        block = model.blocks[i]
        iters = cfg.sinkhorn_iters
        return sinkhorn(block.hc_mlp.res_logits, iters) @ sinkhorn(block.hc_attn.res_logits, iters) @ delta

    all_h, h = [], x0
    for i in range(cfg.n_layer):
        h = f(i, h)
        all_h.append(h)
    loss, L = 0.0, cfg.n_layer
    for n_par in n_pars:
        seq = L - n_par
        h_init = all_h[seq - 1] if seq > 0 else x0
        if stride == 0 and not mhc:
            loss = loss + rel(f(L - 1, h_init), all_h[L - 1])
            continue
        h_par = [f(seq + j, h_init) for j in range(n_par)]
        h_corr = h_par[0]
        for j in range(1, n_par):
            delta = h_corr - h_init
            h_corr = h_par[j] + (jac(seq + j, delta) if mhc else delta)
            if stride > 0 and ((j + 1) % stride == 0 or j == n_par - 1):
                loss = loss + rel(h_corr, all_h[seq + j])
        if stride == 0:
            loss = loss + rel(h_corr, all_h[L - 1])
    return loss


@pytest.mark.parametrize("cls", [GPT, MHCGPT], ids=["gpt", "mhc"])
@pytest.mark.parametrize("stride", [0, 1, 2])
def test_the_paper_preset_is_the_papers_formula(cls, stride):
    model = tiny(cls)
    reg = SNLPRegularizer.paper(model, weight=0.7, n_par=(3, 6), stride=stride)
    model(IDX)
    torch.testing.assert_close(reg.loss(), 0.7 * official(model, (3, 6), stride), atol=1e-6, rtol=1e-6)


def test_the_paper_preset_trains_the_mixing_parameters():
    model = tiny(MHCGPT)
    reg = SNLPRegularizer.paper(model, weight=1.0, n_par=6, stride=2)
    model(IDX)
    reg.loss().backward()
    for block in model.blocks[1:]:
        assert block.hc_attn.res_logits.grad.abs().sum() > 0 and block.hc_mlp.res_logits.grad.abs().sum() > 0


def test_weights_map_between_the_papers_sum_and_our_mean():
    """Stride 1, one n_par of 6: the paper sums the errors of layers 1..5, ours averages layers 0..5
    (layer 0 is exact at K = 1 from the block input), so paper weight w = our weight 6 w."""
    model = tiny(GPT)
    ours = SNLPRegularizer(model, weight=0.7 * 6, n_par=6, stride=1, iters=1, surrogate="identity")
    paper = SNLPRegularizer.paper(model, weight=0.7, n_par=6, stride=1)
    model(IDX)
    torch.testing.assert_close(ours.loss(), paper.loss(), atol=1e-6, rtol=1e-5)
