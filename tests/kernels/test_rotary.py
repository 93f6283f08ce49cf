"""snlp::rotary and its Triton kernel: bitwise the nine eager ops of the rotate-half rotary embedding."""

import textwrap

import pytest
import torch

from snlp_compile.kernels.rotary import TableRows, reference_rotary, rotary, table_rows
from tests.helpers.triton_interpreter import run_under_interpreter


def _tables(*shape: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.randn(*shape)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def test_triton_kernel_under_the_interpreter():
    """The kernel itself, run on CPU by TRITON_INTERPRET=1 (a fresh process: the flag is read at import),
    bitwise against the nine ops: tables per position, per sequence and position, shared by every
    row, a half that is not a power of two, rows that do not fill the last program; and the op
    routed through it, under vmap too."""
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import torch
        from snlp_compile.kernels import rotary as rot
        from snlp_compile.kernels.rotary import reference_rotary, triton_rotary
        torch.manual_seed(0)
        h = torch.bfloat16
        cases = [
            ((2, 7, 3, 16), (7, 1, 8)),  # [B, T, H, D] with [T, 1, D/2] tables
            ((2, 3, 7, 16), (7, 8)),  # [B, H, T, D] with [T, D/2]
            ((2, 7, 3, 16), (2, 7, 1, 8)),  # a table per sequence and position
            ((5, 6), (3,)),  # one table row for all, half 3
            ((33, 2, 10), (33, 1, 5)),  # 66 rows: more than one program, the last one partly filled
        ]
        for x_shape, table_shape in cases:
            x = (torch.randn(*x_shape) * 4).to(h)
            angles = torch.randn(*table_shape)
            cos, sin = angles.cos().to(h), angles.sin().to(h)
            got, want = triton_rotary(x, cos, sin), reference_rotary(x, cos, sin)
            assert got.is_contiguous() and got.shape == x.shape and got.dtype == h
            assert torch.equal(got, want), (x_shape, table_shape, (got.float() - want.float()).abs().max())
        inf, nan = float("inf"), float("nan")
        x = torch.tensor([[inf, nan, 3e38, -0.0], [1.0, -inf, 2.0, 0.0], [-0.0, 0.0, 0.0, -0.0]]).to(h)
        cos, sin = torch.tensor([0.5, 2.0]).to(h), torch.tensor([-0.5, 3.0]).to(h)  # overflow, inf - inf, signed zeros
        got, want = triton_rotary(x, cos, sin), reference_rotary(x, cos, sin)
        torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)
        assert torch.equal(got.signbit()[~want.isnan()], want.signbit()[~want.isnan()])
        bad = [
            (torch.randn(2, 7, 3, 16), torch.randn(7, 1, 8), torch.randn(7, 1, 8)),  # float32
            (torch.randn(2, 7, 3, 16).half(), torch.randn(7, 1, 8).half(), torch.randn(7, 1, 8).half()),  # float16
            (torch.randn(2, 16, 3, 7).to(h).transpose(1, 3), torch.randn(7, 1, 8).to(h), torch.randn(7, 1, 8).to(h)),
            (torch.randn(2, 7, 3, 15).to(h), torch.randn(7, 1, 7).to(h), torch.randn(7, 1, 7).to(h)),  # odd
            (torch.randn(2, 7, 3, 16).to(h), torch.randn(2, 1, 3, 8).to(h), torch.randn(2, 1, 3, 8).to(h)),
        ]
        for x, cos, sin in bad:
            try:
                triton_rotary(x, cos, sin)
            except ValueError as error:
                assert "triton_rotary: x contiguous with an even last dim" in str(error), error
            else:
                raise AssertionError("bad operands accepted")
        rot._triton_layout = rot._kernel_layout  # as on CUDA: the op takes the kernel where it serves the operands
        x = (torch.randn(4, 2, 7, 3, 16) * 4).to(h)
        angles = torch.randn(7, 1, 8)
        cos, sin = angles.cos().to(h), angles.sin().to(h)
        assert torch.equal(rot.rotary(x[0], cos, sin), reference_rotary(x[0], cos, sin))
        assert torch.equal(torch.vmap(lambda a: rot.rotary(a, cos, sin))(x), reference_rotary(x, cos, sin))
        layer_cos, layer_sin = cos.expand(4, 7, 1, 8).contiguous(), sin.expand(4, 7, 1, 8).contiguous()
        x1 = x[:, :1].contiguous()  # one sequence: the per-layer tables' rows collapse with the positions
        out = torch.vmap(rot.rotary)(x1, layer_cos, layer_sin)
        assert torch.equal(out, reference_rotary(x1, cos, sin))
        print("ok")
        """
    )
    run_under_interpreter(code)


def test_table_rows_find_the_run_of_dims_a_table_varies_over():
    x1 = torch.Size([2, 7, 3, 8])  # [B, T, H, D/2]
    assert table_rows(torch.empty(7, 1, 8), x1) == TableRows(inner=3, period=7, stride=8)
    assert table_rows(torch.empty(2, 7, 1, 8), x1) == TableRows(inner=3, period=14, stride=8)
    assert table_rows(torch.empty(8), x1) == TableRows(inner=1, period=1, stride=0)
    assert table_rows(torch.empty(2, 1, 3, 8), x1) is None  # varies over B and H, not over T between them
    assert table_rows(torch.empty(7, 1, 16)[..., ::2], x1) is None  # a strided last dim
    assert table_rows(torch.empty(5, 1, 8), x1) is None  # does not broadcast to x1
    assert table_rows(torch.empty(7, 2, 1, 8).transpose(0, 1), x1) is None  # B and T do not collapse into one run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_is_the_nine_ops_on_cpu_and_under_vmap(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 4, 16, dtype=dtype)
    cos, sin = _tables(5, 1, 8, dtype=dtype)
    assert torch.equal(rotary(x[0], cos, sin), reference_rotary(x[0], cos, sin))
    assert torch.equal(torch.vmap(lambda a: rotary(a, cos, sin))(x), reference_rotary(x, cos, sin))
    layer_cos, layer_sin = _tables(3, 5, 1, 8, dtype=dtype)  # per-layer tables
    out = torch.vmap(rotary)(x, layer_cos, layer_sin)
    assert torch.equal(out, torch.stack([reference_rotary(x[i], layer_cos[i], layer_sin[i]) for i in range(3)]))
    out = torch.vmap(rotary, in_dims=(None, 0, 0))(x[0], layer_cos, layer_sin)  # shared input
    assert torch.equal(out, torch.stack([reference_rotary(x[0], layer_cos[i], layer_sin[i]) for i in range(3)]))
    with torch._subclasses.FakeTensorMode():
        fake = rotary(torch.empty(2, 5, 4, 16, dtype=dtype), torch.empty(5, 1, 8, dtype=dtype), torch.empty(5, 1, 8))
    real = rotary(torch.randn(2, 5, 4, 16, dtype=dtype), cos, sin.float())  # a float32 table promotes, as in the ops
    assert fake.shape == real.shape == (2, 5, 4, 16) and fake.dtype == real.dtype == torch.float32
    assert fake.is_contiguous() and real.is_contiguous()


def test_tables_that_broadcast_x_larger_are_refused():
    x = torch.randn(5, 4, 16)
    cos, sin = _tables(3, 5, 1, 8)
    with pytest.raises(ValueError, match="broadcast"):
        rotary(x, cos, sin)
    with pytest.raises(ValueError, match="broadcast"), torch._subclasses.FakeTensorMode():
        rotary(torch.empty(5, 4, 16), torch.empty(3, 5, 1, 8), torch.empty(3, 5, 1, 8))


def test_tables_without_dims_are_refused():
    """A 0-dim table promotes dtypes as a Python scalar would, differently from a 1-dim one; under vmap
    a batched 0-dim table would become a dimensioned one."""
    x = torch.randn(5, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="at least one dim"):
        rotary(x, torch.tensor(0.5), torch.tensor(0.25))
    with pytest.raises(ValueError, match="at least one dim"):
        torch.vmap(rotary, in_dims=(None, 0, 0))(x, torch.rand(3), torch.rand(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton path runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_cuda_the_op_is_bitwise_the_nine_ops(dtype):
    """bfloat16 through the kernel (the rounding of every op emulated), float16 through the nine ops."""
    torch.manual_seed(0)
    x = (torch.randn(24, 2, 2048, 5, 128, device="cuda") * 4).to(dtype)  # a block's q and k, twin-concatenated
    cos, sin = (t.cuda() for t in _tables(2048, 1, 64, dtype=dtype))
    assert torch.equal(rotary(x, cos, sin), reference_rotary(x, cos, sin))
    assert torch.equal(torch.vmap(lambda a: rotary(a, cos, sin))(x), reference_rotary(x, cos, sin))
    zeros = torch.zeros(4, 8, device="cuda", dtype=dtype)  # signed zeros: no negation that gives 0 - x
    cos, sin = (torch.tensor(v, device="cuda", dtype=dtype) for v in ([-0.5, 0.5, -1.0, 1.0], [0.5, 0.5, 0.25, -0.25]))
    assert torch.equal(rotary(zeros, cos, sin).signbit(), reference_rotary(zeros, cos, sin).signbit())
