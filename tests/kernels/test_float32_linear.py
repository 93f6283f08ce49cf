"""snlp::float32_linear: F.linear(x, w).float() as one op; the GEMM with a float32 output runs on CUDA."""

import pytest
import torch
import torch.nn.functional as F

from snlp_compile.kernels.float32_linear import float32_linear, runs_float32_gemm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_off_cuda_it_is_exactly_the_linear_and_the_cast(dtype):
    x, w = torch.randn(2, 3, 8, dtype=dtype), torch.randn(5, 8, dtype=dtype)
    out = float32_linear(x, w)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 5) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, w).float(), rtol=0, atol=0)


def test_the_op_passes_the_custom_op_checks():
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(6, 8, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.snlp.float32_linear.default, (x, w))


def test_only_16_bit_cuda_inputs_take_the_float32_gemm():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert not runs_float32_gemm(x, torch.randn(6, 8, dtype=torch.bfloat16))  # CPU
    assert not runs_float32_gemm(x.float(), torch.randn(6, 8))


@pytest.mark.parametrize("shapes", [((4, 8), (6, 7)), ((4, 8), (6, 8, 1)), ((), (6, 8))], ids=["K", "3-D", "0-D"])
def test_mismatched_shapes_are_a_clear_error(shapes):
    x_shape, w_shape = shapes
    with pytest.raises(ValueError, match="must agree on K"):
        float32_linear(torch.randn(x_shape), torch.randn(w_shape))


def test_the_fake_kernel_checks_shapes_too():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), pytest.raises(ValueError, match="must agree on K"):
        float32_linear(torch.empty(4, 8), torch.empty(6, 7))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the float32-output GEMM needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_shape", [(64, 128), (128,), (3, 40, 128), (0, 128)], ids=["2-D", "1-D", "3-D", "empty"])
def test_on_cuda_it_is_the_float32_product(dtype, x_shape):
    x = torch.randn(*x_shape, dtype=dtype, device="cuda")
    if x.dim() == 3:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous
    w = torch.randn(256, 128, dtype=dtype, device="cuda")
    out = float32_linear(x, w)
    assert out.dtype == torch.float32 and out.shape == (*x_shape[:-1], 256)
    torch.testing.assert_close(out, x.float() @ w.float().t(), rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the float32-output GEMM needs CUDA")
def test_on_cuda_an_empty_inner_dim_gives_zeros():
    x, w = (torch.empty(n, 0, dtype=torch.bfloat16, device="cuda") for n in (4, 6))
    assert float32_linear(x, w).eq(0).all()
