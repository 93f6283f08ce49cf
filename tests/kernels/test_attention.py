"""snlp::attention against its naive reference, plain and under vmap (forward and backward)."""

import pytest
import torch

from snlp_compile.kernels.attention import attention, reference_attention, sdpa

n, B, H, T, S, D = 3, 2, 4, 5, 7, 8


def inputs(requires_grad=True, s=S):
    return [torch.randn(n, B, H, t, D, requires_grad=requires_grad) for t in (T, s, s)]


MASKS = {
    "none": lambda: None,
    "shared [T, S]": lambda: torch.rand(T, S) > 0.3,
    "per layer [n, B, 1, T, S]": lambda: torch.rand(n, B, 1, T, S) > 0.3,
}


@pytest.mark.parametrize("mask_kind", MASKS)
def test_vmapped_forward_and_backward_match_the_reference(mask_kind):
    q, k, v = inputs()
    mask = MASKS[mask_kind]()
    if mask is not None:
        mask[..., 0] = True  # every query sees at least one key
    batched_mask = mask is not None and mask.dim() == 5
    dims = (0, 0, 0, 0 if batched_mask else None)
    out = torch.vmap(lambda a, b, c, m: sdpa(a, b, c, attn_mask=m), in_dims=dims)(q, k, v, mask)
    ref = torch.stack(
        [reference_attention(q[i], k[i], v[i], mask[i] if batched_mask else mask, False, None) for i in range(n)]
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_causal_and_scale():
    q, k, v = inputs(requires_grad=False, s=T)
    out = torch.vmap(lambda a, b, c: sdpa(a, b, c, is_causal=True, scale=0.3))(q, k, v)
    ref = torch.stack([reference_attention(q[i], k[i], v[i], None, True, 0.3) for i in range(n)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_opcheck():
    q, k, v = (t[0] for t in inputs())
    torch.library.opcheck(attention, (q, k, v, None, False, None))


def test_unsupported_arguments():
    q, k, v = (t[0] for t in inputs(requires_grad=False))
    with pytest.raises(ValueError, match="dropout_p=0 and enable_gqa=False"):
        sdpa(q, k, v, dropout_p=0.1)
