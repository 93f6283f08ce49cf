"""Taps: states inside the stack read outside it (a backout, an auxiliary head, collected hidden
states) are outputs of the one parallel solve: exact at K >= the block size, approximate at K = 1."""

import pytest
import torch
from torch import nn

from snlp_compile import SNLPFallbackError


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Tapped(nn.Module):
    """A residual stack of 6 layers with one of three kinds of tap."""

    def __init__(self, kind: str, width: int = 16, depth: int = 6):
        super().__init__()
        self.kind = kind
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.head, self.aux_head = nn.Linear(width, 8), nn.Linear(width, 8)
        self.backout_lambda = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        hidden, aux, kept = [], None, None
        for i, block in enumerate(self.blocks):
            hidden.append(x)
            x = block(x)
            if i == 2:
                kept = x  # backout: the state after the middle layer, subtracted before the head
                aux = self.aux_head(x)  # an auxiliary head on a middle layer, computed inside the loop
        if self.kind == "backout":
            return self.head(x - self.backout_lambda * kept)
        if self.kind == "aux":
            return self.head(x), aux
        return self.head(x), torch.stack(hidden[1:])  # collected hidden states (output_hidden_states)


def _outputs(value):
    return value if isinstance(value, tuple) else (value,)


@pytest.mark.parametrize("kind", ["backout", "aux", "hidden"])
def test_taps_are_exact_at_full_iterations_with_gradients(kind, caplog):
    torch.manual_seed(0)
    model, x = Tapped(kind), torch.randn(2, 5, 16)
    expected = _outputs(model(x))
    params = list(model.parameters())
    grads = torch.autograd.grad(sum(o.square().sum() for o in expected), params, allow_unused=True)
    with caplog.at_level("INFO", logger="snlp_compile"):
        compiled = torch.compile(model, backend="snlp", options=dict(iters=6, inner="eager", fallback="error"))
        got = _outputs(compiled(x))
    assert "tapped after" in caplog.text
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    got_grads = torch.autograd.grad(sum(o.square().sum() for o in got), params, allow_unused=True)
    for a, b in zip(got_grads, grads, strict=True):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()
    with torch.no_grad():
        approx = _outputs(torch.compile(model, backend="snlp", options=dict(iters=1, fallback="error"))(x))
    assert not torch.allclose(approx[-1], expected[-1], atol=1e-3)


def test_a_tap_inside_a_fused_super_layer_falls_back_saying_why():
    model, x = Tapped("backout"), torch.randn(2, 5, 16)  # tap after layer 2: inside the super-layer {2, 3}
    with pytest.raises(SNLPFallbackError, match=r"layers \[2\].*inside a fused super-layer"), torch.no_grad():
        torch.compile(model, backend="snlp", options=dict(iters=1, fuse=2, fallback="error"))(x)


def test_a_layer_reading_an_older_state_is_refused_as_inherently_sequential():
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(16) for _ in range(4)])

        def forward(self, x):
            previous = x
            for block in self.blocks:
                x, previous = block(x) + 0.1 * previous, x
            return x

    with pytest.raises(SNLPFallbackError, match="inherently sequential|not a chain"), torch.no_grad():
        torch.compile(Dense(), backend="snlp", options=dict(fallback="error"))(torch.randn(2, 3, 16))
