import torch

from snlp_compile.models import MHCGPT
from snlp_compile.models.mhc import HyperConnection, sinkhorn


def test_sinkhorn_doubly_stochastic():
    torch.manual_seed(0)
    for m in (2, 4, 8):
        h = sinkhorn(torch.randn(m, m), 20)
        assert (h > 0).all()
        torch.testing.assert_close(h.sum(-1), torch.ones(m), atol=1e-4, rtol=0)
        torch.testing.assert_close(h.sum(-2), torch.ones(m), atol=1e-4, rtol=0)


def test_hyper_connection_init_near_identity():
    torch.manual_seed(0)
    hc = HyperConnection(4, 20)
    h_res = sinkhorn(hc.res_logits, 20)
    assert (h_res.diagonal() > 0.5).all()
    assert not torch.allclose(h_res, torch.eye(4), atol=0.05)


def test_hyper_connection_update():
    torch.manual_seed(0)
    hc = HyperConnection(3, 20)
    h = torch.randn(2, 5, 3, 8)
    out = hc(h, lambda x: 2 * x)
    h_res = sinkhorn(hc.res_logits, 20)
    pre, post = hc.pre_logits.softmax(-1), hc.post_logits.softmax(-1)
    x = torch.einsum("m,btmd->btd", pre, h)
    y = 2 * torch.nn.functional.rms_norm(x, (8,))
    expected = torch.einsum("mn,btnd->btmd", h_res, h) + post[None, None, :, None] * y[:, :, None, :]
    torch.testing.assert_close(out, expected)


def test_mhc_streams_shape(make_model):
    model = make_model(MHCGPT, n_streams=3)
    assert model.expand(torch.randn(2, 5, 32)).shape == (2, 5, 3, 32)
    assert model(torch.randint(0, 64, (2, 5))).shape == (2, 5, 64)
    assert model.blocks[0].hc_attn.res_logits.shape == (3, 3)
