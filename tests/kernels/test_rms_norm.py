"""snlp::rms_norm: equals torch.rms_norm, and under vmap is one call on the folded tensor that equals
a per-sample loop, for batched and shared inputs and weights."""

import pytest
import torch

from snlp_compile.kernels.rms_norm import rms_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_torch_rms_norm(dtype):
    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 8, dtype=dtype), torch.randn(8, dtype=dtype)
    assert torch.equal(rms_norm(x, [8]), torch.rms_norm(x, [8]))
    assert torch.equal(rms_norm(x, [5, 8], None, 1e-3), torch.rms_norm(x, [5, 8], None, 1e-3))
    assert torch.equal(rms_norm(x, [8], w, eps=1e-6), torch.rms_norm(x, [8], w, 1e-6))
    with torch._subclasses.FakeTensorMode():
        fake = rms_norm(torch.empty(3, 8, dtype=dtype), [8])
    assert fake.shape == (3, 8) and fake.dtype == dtype


def test_vmap_is_one_call_that_equals_a_loop(monkeypatch):
    torch.manual_seed(0)
    x, w = torch.randn(3, 4, 8), torch.randn(3, 8)
    calls = []
    real = torch.rms_norm
    monkeypatch.setattr(torch, "rms_norm", lambda *args: calls.append(args[0].shape) or real(*args))
    out = torch.vmap(lambda a: rms_norm(a, [8], None, 1e-6))(x)
    assert calls == [(3, 4, 8)] and torch.equal(out, real(x, [8], None, 1e-6))
    cases = [
        ((0, 0), (x, w), lambda i: (x[i], w[i])),  # per-layer input and weight
        ((None, 0), (x[0], w), lambda i: (x[0], w[i])),  # shared input, per-layer weight
        ((1, None), (x.transpose(0, 1), w[0]), lambda i: (x[i], w[0])),  # batched along dim 1, shared weight
    ]
    for in_dims, args, sample in cases:
        out = torch.vmap(lambda a, b: rms_norm(a, [8], b), in_dims=in_dims)(*args)
        expected = torch.stack([real(*sample(i)[:1], [8], sample(i)[1]) for i in range(3)])
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_vmap_with_per_layer_weights_keeps_the_input_dtype(dtype, weight_dtype):
    """A per-layer weight scales the normalised tensor: the input's dtype, like torch.rms_norm, and
    within one more rounding of it in 16 bits."""
    torch.manual_seed(0)
    x, w = torch.randn(3, 4, 8, dtype=dtype), torch.randn(3, 8, dtype=weight_dtype)
    out = torch.vmap(lambda a, b: rms_norm(a, [8], b))(x, w)
    expected = torch.stack([torch.rms_norm(x[i], [8], w[i]) for i in range(3)])
    assert out.dtype == expected.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
