import pytest
import torch

from snlp_compile.models import GPT, MHCGPT, GPTConfig

VARIANTS = {
    "base": {},
    "gqa": dict(n_kv_head=2),
    "window": dict(window_pattern=(8, None)),
    "x0": dict(x0_mixing=True),
    "softcap": dict(softcap=5.0),
    "all": dict(n_kv_head=1, window_pattern=(8, None), x0_mixing=True, softcap=5.0),
}


def _make_model(cls: type, **overrides) -> torch.nn.Module:
    """Tiny fp32 eval-mode model; x0 lambdas set to nonzero values so x0 mixing matters."""
    torch.manual_seed(0)
    config = GPTConfig.preset("tiny", n_layer=3, sequence_len=32, **overrides)
    model = cls(config).eval()
    if config.x0_mixing:
        with torch.no_grad():
            model.resid_lambdas.copy_(torch.linspace(0.8, 1.2, config.n_layer))
            model.x0_lambdas.copy_(torch.linspace(0.3, -0.2, config.n_layer))
    return model


@pytest.fixture
def make_model():
    return _make_model


@pytest.fixture(params=[GPT, MHCGPT], ids=["gpt", "mhc"])
def model_cls(request) -> type:
    return request.param


@pytest.fixture(params=list(VARIANTS.values()), ids=list(VARIANTS))
def variant(request) -> dict:
    """Config overrides covering GQA, sliding windows, x0 mixing, softcap and all at once."""
    return request.param


@pytest.fixture(params=[VARIANTS["base"], VARIANTS["all"]], ids=["base", "all"])
def base_or_all(request) -> dict:
    return request.param
