"""snlp::rms_norm: equals torch.rms_norm, and under vmap is one call on the folded tensor that equals
a per-sample loop, for batched and shared inputs and weights."""

import textwrap

import pytest
import torch

from snlp_compile.kernels.rms_norm import _runs_triton, rms_norm
from tests.helpers.triton_interpreter import run_under_interpreter


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


def test_triton_kernel_under_the_interpreter():
    """The Triton kernel itself, run on CPU by TRITON_INTERPRET=1 (a fresh process: the flag is read at
    import): rows that do not fill the last program, widths that are not powers of two, a weight, eps
    given or torch's default, and the op routed through it, under vmap too."""
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import torch
        from snlp_compile.kernels import rms_norm as norm
        from snlp_compile.kernels.rms_norm import norm_tiles, triton_rms_norm
        torch.manual_seed(0)
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-3)):
            for shape in ((3, 37, 128), (5, 640), (7, 1), (2, 3, 96)):
                x = torch.randn(*shape, dtype=dtype) * 3
                w = torch.randn(shape[-1], dtype=dtype)
                for weight, eps in ((None, None), (w, 1e-6), (w, None), (None, 0.5)):
                    y = triton_rms_norm(x, weight, eps)
                    assert y.dtype == dtype and y.shape == x.shape
                    expected = torch.rms_norm(x.float(), [shape[-1]], None if weight is None else weight.float(), eps)
                    torch.testing.assert_close(y.float(), expected, atol=tol, rtol=tol)
            tiny = torch.full((4, 8), 1e-4, dtype=dtype)  # where eps dominates: torch's default must be used
            torch.testing.assert_close(triton_rms_norm(tiny), torch.rms_norm(tiny, [8]), atol=tol, rtol=tol)
        assert norm_tiles(128) == (32, 128, 4) and norm_tiles(640) == (4, 1024, 4) and norm_tiles(8192) == (1, 8192, 8)
        bad = (
            (torch.randn(4, 6).t(), None),  # not contiguous
            (torch.randn(4, 6), torch.randn(5)),  # weight of the wrong size
            (torch.randn(4, 6), torch.randn(6, dtype=torch.float64)),  # weight of another dtype
            (torch.randn(2, 9000), None),  # wider than one program holds
        )
        for x, weight in bad:
            try:
                triton_rms_norm(x, weight)
            except ValueError as error:
                assert "contiguous input with a last dim of 1 to 8192" in str(error)
            else:
                raise AssertionError("bad input accepted")
        norm._runs_triton = lambda *args: True  # as on CUDA for large inputs: the op takes the kernel
        x, w = torch.randn(3, 40, 128), torch.randn(128)
        torch.testing.assert_close(norm.rms_norm(x, [128], w, 1e-6), torch.rms_norm(x, [128], w, 1e-6))
        out = torch.vmap(lambda a: norm.rms_norm(a, [128], w, 1e-6))(x)
        torch.testing.assert_close(out, torch.rms_norm(x, [128], w, 1e-6))
        print("ok")
        """
    )
    run_under_interpreter(code)


def test_torch_keeps_the_calls_the_kernel_does_not_serve():
    """On CPU, and on CUDA for small inputs, several normalised dims, a weight of another dtype or a
    strided input, the op is torch.rms_norm itself (bitwise)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        big = torch.randn(512, 128, 128, device=device, dtype=torch.bfloat16)
        calls = [
            (big[:2], [128], None),
            (big, [128, 128], None),
            (big, [128], torch.randn(128, device=device)),
            (big.transpose(0, 1), [128], None),
        ]
        calls += [(big, [128], None)] if device == "cpu" else []
        for x, shape, weight in calls:
            assert not _runs_triton(x, shape, weight)
            assert torch.equal(rms_norm(x, shape, weight), torch.rms_norm(x, shape, weight))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton path runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_path_on_cuda_matches_torch(dtype):
    """A QK norm's shape (rows of 128) and a hidden state's (640), with and without a weight: within one
    rounding of the output dtype of torch's kernel."""
    torch.manual_seed(0)
    for shape in ((24, 2048, 10, 128), (8, 2048, 640)):
        x = torch.randn(*shape, device="cuda", dtype=dtype)
        w = torch.randn(shape[-1], device="cuda", dtype=dtype)
        for weight, eps in ((None, None), (w, 1e-6)):
            assert _runs_triton(x, [shape[-1]], weight)
            out = rms_norm(x, [shape[-1]], weight, eps)
            expected = torch.rms_norm(x, [shape[-1]], weight, eps)
            atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-3, torch.finfo(dtype).eps)
            torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
