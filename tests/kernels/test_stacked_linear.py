"""snlp::linear / snlp::stacked_linear and the Triton batched GEMV against the naive reference."""

import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from snlp_compile import SNLPConfig
from snlp_compile.kernels.stacked_linear import gemv_tiles, linear, reference_stacked_linear, stacked_linear
from snlp_compile.models import GPT, GPTConfig
from tests.helpers.triton_interpreter import run_under_interpreter


def test_triton_kernel_under_the_interpreter():
    """The Triton kernel itself, run on CPU by TRITON_INTERPRET=1 (a fresh process: the flag is read at
    import), over token counts up to 16 and sizes that are not multiples of the blocks."""
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import torch
        import torch.nn.functional as F
        from snlp_compile.kernels import stacked_linear as gemv
        from snlp_compile.kernels.stacked_linear import GemvTiles, reference_stacked_linear, triton_stacked_linear
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2)):
            for m, n, k in ((1, 70, 130), (3, 64, 128), (16, 5, 33)):
                x, w = torch.randn(3, m, k, dtype=dtype), torch.randn(3, n, k, dtype=dtype)
                (y,) = triton_stacked_linear(x, [w], GemvTiles(32, 32, 4, 2))
                torch.testing.assert_close(triton_stacked_linear(x, [w])[0], y, atol=tol, rtol=tol)  # default tiles
                w_t = w.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strided: read in place
                torch.testing.assert_close(triton_stacked_linear(x, [w_t])[0], y, atol=tol, rtol=tol)
                assert y.dtype == dtype and y.shape == (3, m, n) and y.is_contiguous()
                torch.testing.assert_close(y, reference_stacked_linear(x, [w])[0], atol=tol, rtol=tol)
            # siblings: four weights of different widths, one shared by every layer (stride 0), one launch
            x = torch.randn(3, 2, 40, dtype=dtype)
            ws = [torch.randn(3, 24, 40, dtype=dtype), torch.randn(3, 8, 40, dtype=dtype)]
            ws += [torch.randn(40, 40, dtype=dtype).expand(3, 40, 40), torch.randn(3, 33, 40, dtype=dtype)]
            for count in (2, 3, 4):
                ys = triton_stacked_linear(x, ws[:count], GemvTiles(16, 32, 4, 2))
                assert all(y.is_contiguous() for y in ys)
                torch.testing.assert_close(ys, reference_stacked_linear(x, ws[:count]), atol=tol, rtol=tol)
            # siblings that are slices of one buffer, the later one first (a negative offset), one strided
            buffer = torch.randn(3, 40, 40, dtype=dtype)
            views = [buffer[:, 24:40], buffer[:, 0:8], buffer[:, 8:20, :].transpose(1, 2).contiguous().transpose(1, 2)]
            ys = triton_stacked_linear(x, views, GemvTiles(16, 32, 4, 2))
            torch.testing.assert_close(ys, reference_stacked_linear(x, views), atol=tol, rtol=tol)
        bad_shapes = (
            (torch.randn(2, 17, 8), [torch.randn(2, 4, 8)]),
            (torch.randn(2, 1, 8), [torch.randn(3, 4, 8)]),
            (torch.randn(2, 1, 8), [torch.randn(2, 4, 8)] * 5),
            (torch.randn(2, 1, 8), [torch.randn(2, 4, 8, dtype=torch.float64)]),
        )
        for x, ws in bad_shapes:
            try:
                triton_stacked_linear(x, ws)
            except ValueError as error:
                assert "1 <= M <= 16" in str(error)
            else:
                raise AssertionError("bad shapes accepted")
        gemv._runs_gemv = lambda x, weights, rows: True  # as on CUDA: one layer's linears take the kernel
        x = torch.randn(2, 3, 40, dtype=torch.float16)
        ws = [torch.randn(24, 40, dtype=torch.float16), torch.randn(16, 40, dtype=torch.float16)]
        expected = [F.linear(x, w) for w in ws]
        torch.testing.assert_close(gemv.linear(x, ws), expected, atol=1e-2, rtol=1e-2)
        print("ok")
        """
    )
    run_under_interpreter(code)


def test_every_kernel_argument_is_specialised():
    """Triton's divisible-by-16 hint on the data offsets and strides is what lets the weight loads and the
    output stores vectorise: with the offsets left unspecialised, an H100 decode step's GEMVs ran 3.5x slower."""
    triton = pytest.importorskip("triton")
    from snlp_compile.kernels.stacked_linear import _stacked_gemv_kernel

    assert isinstance(_stacked_gemv_kernel, triton.runtime.jit.JITFunction)
    assert not [p.name for p in _stacked_gemv_kernel.params if p.do_not_specialize]


@pytest.mark.parametrize("layers, n, k", [(1, 640, 640), (24, 2560, 640), (20, 1280, 5120), (1, 65536, 1280)])
def test_gemv_tiles_fill_the_gpu_and_fit_the_shape(layers, n, k):
    tiles = gemv_tiles(layers, n, k)
    assert tiles.block_n in (16, 32, 64, 128) and tiles.block_k in (128, 256)
    assert tiles.num_stages * (tiles.block_n + 16) * tiles.block_k * 2 <= 227 * 1024  # H100 shared memory
    if tiles.block_n < 64:  # narrow tiles only where wide ones would launch few programs
        assert layers * -(-n // 64) < 200


class OpLog(TorchDispatchMode):
    """Records the ops that reach dispatch."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("x_batched", [True, False])
@pytest.mark.parametrize("siblings", [1, 3])
def test_linear_under_vmap_is_one_stacked_call(x_batched, siblings):
    weights = [torch.randn(4, 6 + i, 8) for i in range(siblings)]
    x = torch.randn(4, 2, 3, 8) if x_batched else torch.randn(2, 3, 8)
    with OpLog() as log:
        out = torch.vmap(linear, in_dims=(0 if x_batched else None, [0] * siblings))(x, weights)
    assert log.ops.count(torch.ops.snlp.stacked_linear.default) == 1
    expected = [torch.stack([F.linear(x[i] if x_batched else x, w[i]) for i in range(4)]) for w in weights]
    torch.testing.assert_close(out, expected)
    flat = (x if x_batched else x.expand(4, *x.shape)).reshape(4, 6, 8)
    torch.testing.assert_close(stacked_linear(flat, weights), reference_stacked_linear(flat, weights))


def test_siblings_with_one_weight_shared_by_all_layers_stay_one_call():
    x, own, shared = torch.randn(4, 3, 8), torch.randn(4, 6, 8), torch.randn(5, 8)
    with OpLog() as log:
        out = torch.vmap(linear, in_dims=(0, [0, None]))(x, [own, shared])
    assert log.ops.count(torch.ops.snlp.stacked_linear.default) == 1
    expected = [torch.stack([F.linear(x[i], own[i]) for i in range(4)]), F.linear(x, shared)]
    torch.testing.assert_close(out, expected)


def test_a_weight_shared_by_all_layers_is_one_plain_linear():
    x, weight = torch.randn(4, 3, 8), torch.randn(6, 8)
    with OpLog() as log:
        out = torch.vmap(linear, in_dims=(0, [None]))(x, [weight])
    assert torch.ops.snlp.stacked_linear.default not in log.ops
    torch.testing.assert_close(out, [F.linear(x, weight)])


def test_bad_weight_lists_are_rejected():
    with pytest.raises(ValueError, match="non-empty list of 2-D"):
        linear(torch.randn(2, 8), [])
    with pytest.raises(ValueError, match="non-empty list of 3-D"):
        stacked_linear(torch.randn(2, 1, 8), [torch.randn(4, 8)])


def test_gemv_is_not_used_for_training_and_not_exported():
    from snlp_compile import export_onnx

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny"))
    idx = torch.randint(0, 64, (2, 8))
    options = dict(iters=4, inner="eager", fallback="error", gemv=True)
    torch.compile(model, backend="snlp", options=options)(idx).sum().backward()  # no autograd needed
    assert model.blocks[1].mlp.c_fc.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="gemv=True"):
        export_onnx(model.eval(), (idx,), "/tmp/never.onnx", SNLPConfig(gemv=True))
