"""Bad input to the snlp backend: errors of the documented types, frames dynamo keeps compiling,
iteration counts past the block size, non-finite values."""

import logging
import re

import pytest
import torch
from torch import nn

from snlp_compile import SNLPFallbackError
from snlp_compile.models import GPT, GPTConfig

IDX = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
REWROTE = "snlp: rewrote 4 layers of L['self'].blocks"


def gpt():
    return GPT(GPTConfig.preset("tiny", n_layer=4)).eval()


class Residual(nn.Module):
    """x + tanh(W x): no norm, so an inf in x stays in its own element (tanh(+-inf) = +-1)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.linear, self.drop = nn.Linear(8, 8), nn.Dropout(dropout)

    def forward(self, x):
        return x + self.drop(torch.tanh(self.linear(x)))


def stack(dropout: float = 0.0):
    return nn.Sequential(*[Residual(dropout) for _ in range(4)])


@torch.no_grad()
def assert_rewritten_and_exact(caplog):
    """A GPT compiled now is still rewritten (dynamo did not skip its forward) and exact."""
    model = gpt()
    with caplog.at_level(logging.INFO, logger="snlp_compile"):
        out = torch.compile(model, backend="snlp", options={"iters": 4, "inner": "eager"})(IDX)
    assert REWROTE in caplog.text
    torch.testing.assert_close(out, model(IDX), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "options, mode, message",
    [
        ({"itres": 2}, None, r"unknown SNLP option\(s\) \['itres'\]"),
        ({"iters": 0}, None, r"SNLPConfig.iters must be an integer >= 1, got 0"),
        (None, "fast", "snlp: mode must be one of"),
        ({"n_seq": 4, "inner": "eager"}, None, r"n_seq must be < the number of layers \(4\)"),
        ({"surrogate": "hc", "inner": "eager"}, None, "surrogate='hc' needs stream mixing"),
    ],
    ids=["unknown", "iters", "mode", "too-deep", "hc-without-mixing"],
)
@torch.no_grad()
def test_a_bad_option_is_a_value_error_and_leaves_the_frame_compilable(options, mode, message, caplog):
    compiled, caught = torch.compile(gpt(), backend="snlp", options=options, mode=mode), None
    try:
        compiled(IDX)
    except ValueError as error:  # what a user writes: not torch._dynamo.exc.BackendCompilerFailed
        caught = error
    assert caught is not None and re.search(message, str(caught))
    assert_rewritten_and_exact(caplog)


@torch.no_grad()
def test_a_refused_graph_with_fallback_error_is_an_snlp_fallback_error(caplog):
    model = stack(dropout=0.5).train()  # every Newton iteration would draw new dropout masks
    compiled = torch.compile(model, backend="snlp", options={"iters": 4, "inner": "eager", "fallback": "error"})
    caught = None
    try:
        compiled(torch.randn(2, 3, 8))
    except SNLPFallbackError as error:  # what a user writes, as the README shows
        caught = error
    assert caught is not None and isinstance(caught, RuntimeError)
    assert "snlp: cannot rewrite this graph" in str(caught) and "draws random numbers (dropout)" in str(caught)
    assert_rewritten_and_exact(caplog)


def test_a_call_the_model_rejects_does_not_stop_later_compiles(caplog):
    """A raise while dynamo traces a frame makes it skip that code object from then on: the model
    raises in `forward` and runs its layers in `_forward`, which dynamo still compiles whole."""
    model = gpt()
    compiled = torch.compile(model, backend="snlp", options={"iters": 4, "inner": "eager"})
    with pytest.raises(ValueError, match=r"sequence length T must be in \[1, 64\], got 0"):
        compiled(torch.zeros(1, 0, dtype=torch.long))
    assert_rewritten_and_exact(caplog)  # a GPT compiled afterwards
    with torch.no_grad():  # and the same compiled model (its graph is the one just compiled)
        torch.testing.assert_close(compiled(IDX), model(IDX), atol=2e-5, rtol=2e-5)


@torch.no_grad()
def test_iterations_past_the_block_size_are_capped_and_logged(caplog):
    model = gpt()
    with caplog.at_level(logging.INFO, logger="snlp_compile"):
        out = torch.compile(model, backend="snlp", options={"iters": 10**9, "inner": "eager", "blocks": 2})(IDX)
    assert "iters=1000000000 capped at 2 (where the largest block reaches its fixed point" in caplog.text
    assert "iters=2, " in caplog.text  # the config the rewrite runs with
    torch.testing.assert_close(out, model(IDX), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("init", ["h0", "batch_fwd"])
@torch.no_grad()
def test_an_infinite_input_element_stays_in_its_element(init):
    """Eager keeps an inf in its own element (x + tanh(W x), the other elements finite); the compiled
    solve at the block size must too, not turn the token into NaN."""
    model, x = stack(), torch.randn(2, 3, 8)
    x[0, 1, 2], x[1, 0, 5] = float("inf"), -float("inf")
    expected = model(x)
    assert expected.isinf().sum() == 2 and expected.isnan().sum() == 0
    compiled = torch.compile(model, backend="snlp", options={"iters": 4, "init": init, "inner": "eager"})
    torch.testing.assert_close(compiled(x), expected)
