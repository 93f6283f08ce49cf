"""The split-KV decode attention kernels against the naive reference (TRITON_INTERPRET=1 on CPU)."""

import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from snlp_compile.passes.lowering.decode_kernels import decode_attention_call as _decode_attention
from tests.helpers.triton_interpreter import run_under_interpreter


def test_decode_kernels_under_the_interpreter():
    """1 to 16 queries, key counts that are not multiples of the blocks (one and several splits),
    head dims that are not powers of two, masks shared, per batch row and none, strided cache
    slices, a fully masked query row (zeros), and bad input."""
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import torch
        from snlp_compile.kernels.attention import reference_attention
        from snlp_compile.kernels.decode_attention import triton_decode_attention
        torch.manual_seed(0)
        for dtype, tol in ((torch.float32, 2e-4), (torch.float16, 2e-2)):
            for (B, H, T, S, D) in ((1, 2, 1, 70, 24), (2, 3, 3, 5, 32), (1, 1, 16, 300, 16)):
                q = torch.randn(B, H, T, D, dtype=dtype)
                cache = torch.randn(2, B, H, S + 4, D, dtype=dtype)  # [k/v, ...]: strided slices, as a cache
                k, v = cache[0, ..., :S, :], cache[1, ..., :S, :]
                shared = torch.rand(T, S) > 0.4
                shared[:, 0] = True
                per_row = torch.rand(B, 1, T, S) > 0.4
                per_row[..., 0] = True
                for mask in (None, shared, per_row):
                    out = triton_decode_attention(q, k, v, mask, None)
                    ref = reference_attention(q, k, v, mask, False, None)
                    assert out.shape == q.shape and out.dtype == dtype
                    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
                scaled = triton_decode_attention(q, k, v, shared, 0.3)
                torch.testing.assert_close(scaled, reference_attention(q, k, v, shared, False, 0.3), atol=tol, rtol=tol)
        q, k, v = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 9, 16), torch.randn(1, 1, 9, 16)
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[1] = False  # the second query attends nothing
        out = triton_decode_attention(q, k, v, mask, None)
        assert torch.equal(out[..., 1, :], torch.zeros(1, 1, 16))
        torch.testing.assert_close(out[..., :1, :], reference_attention(q[..., :1, :], k, v, mask[:1], False, None))
        for bad in ((torch.randn(1, 17, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8), None),
                    (torch.randn(1, 2, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8), None),
                    (torch.randn(1, 2, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.zeros(2, 4))):
            try:
                triton_decode_attention(*bad, None)
            except ValueError as error:
                assert "triton_decode_attention" in str(error)
            else:
                raise AssertionError("bad input accepted")
        print("ok")
        """
    )
    run_under_interpreter(code, timeout=600)


def _fake_cuda(*shape, dtype=torch.bfloat16):
    with FakeTensorMode():
        return torch.empty(*shape, dtype=dtype, device="cuda")  # no GPU needed: nothing is allocated


def _sdpa_node(q, k, v, mask=None, **kwargs):
    graph = torch.fx.Graph()
    args = []
    for name, value in (("q", q), ("k", k), ("v", v)):
        args.append(graph.placeholder(name))
        args[-1].meta["example_value"] = value
    if mask is not None:
        kwargs["attn_mask"] = graph.placeholder("mask")
        kwargs["attn_mask"].meta["example_value"] = mask
    return graph.call_function(F.scaled_dot_product_attention, tuple(args), kwargs)


def test_the_rewrite_routes_only_cuda_decode_attention_to_the_kernels():
    q, k = _fake_cuda(1, 2, 1, 8), _fake_cuda(1, 2, 40, 8)
    mask = _fake_cuda(1, 40, dtype=torch.bool)
    assert _decode_attention(_sdpa_node(q, k, k, mask))
    assert _decode_attention(_sdpa_node(q, k, k))
    assert not _decode_attention(_sdpa_node(q, k, k, mask, is_causal=True))
    assert not _decode_attention(_sdpa_node(_fake_cuda(1, 2, 17, 8), k, k))  # prefill: cuDNN's kernels
    assert not _decode_attention(_sdpa_node(q, k, k, _fake_cuda(1, 40)))  # additive mask
    float32 = _fake_cuda(1, 2, 40, 8, dtype=torch.float32)
    assert not _decode_attention(_sdpa_node(_fake_cuda(1, 2, 1, 8, dtype=torch.float32), float32, float32))
    cpu = torch.randn(1, 2, 40, 8, dtype=torch.bfloat16)
    assert not _decode_attention(_sdpa_node(torch.randn(1, 2, 1, 8, dtype=torch.bfloat16), cpu, cpu))


def test_decode_attention_op_falls_back_to_sdpa_off_the_kernels():
    from snlp_compile.kernels.attention import sdpa
    from snlp_compile.kernels.decode_attention import decode_attention

    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.tensor([[True, True, False, True, False]])
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(decode_attention(q, k, v, mask, None), expected)
    torch.testing.assert_close(sdpa(q, k, v, attn_mask=mask, decode=True), expected)
    with pytest.raises(ValueError, match="no is_causal with decode"):
        sdpa(q, k, v, is_causal=True, decode=True)
