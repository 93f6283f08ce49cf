"""snlp::linear / snlp::stacked_linear and the Triton batched GEMV against the naive reference."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from snlp_compile import SNLPConfig
from snlp_compile.kernels.stacked_linear import linear, reference_stacked_linear, stacked_linear
from snlp_compile.models import GPT, GPTConfig


def test_triton_kernel_under_the_interpreter():
    """The Triton kernel itself, run on CPU by TRITON_INTERPRET=1 (a fresh process: the flag is read at
    import), over token counts up to 16 and sizes that are not multiples of the blocks."""
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import torch
        from snlp_compile.kernels.stacked_linear import reference_stacked_linear, triton_stacked_linear
        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2)):
            for m, n, k in ((1, 70, 130), (3, 64, 128), (16, 5, 33)):
                x, w = torch.randn(3, m, k, dtype=dtype), torch.randn(3, n, k, dtype=dtype)
                y = triton_stacked_linear(x, w, block_n=32, block_k=32)
                torch.testing.assert_close(triton_stacked_linear(x, w), y, atol=tol, rtol=tol)  # default blocks
                w_t = w.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strided: read in place
                torch.testing.assert_close(triton_stacked_linear(x, w_t), y, atol=tol, rtol=tol)
                assert y.dtype == dtype and y.shape == (3, m, n)
                torch.testing.assert_close(y, reference_stacked_linear(x, w), atol=tol, rtol=tol)
        for bad in ((torch.randn(2, 17, 8), torch.randn(2, 4, 8)), (torch.randn(2, 1, 8), torch.randn(3, 4, 8))):
            try:
                triton_stacked_linear(*bad)
            except ValueError as error:
                assert "1 <= M <= 16" in str(error)
            else:
                raise AssertionError("bad shapes accepted")
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


class OpLog(TorchDispatchMode):
    """Records the ops that reach dispatch."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("x_batched", [True, False])
def test_linear_under_vmap_is_one_stacked_call(x_batched):
    weight = torch.randn(4, 6, 8)
    x = torch.randn(4, 2, 3, 8) if x_batched else torch.randn(2, 3, 8)
    with OpLog() as log:
        out = torch.vmap(linear, in_dims=(0 if x_batched else None, 0))(x, weight)
    assert log.ops.count(torch.ops.snlp.stacked_linear.default) == 1
    expected = torch.stack([F.linear(x[i] if x_batched else x, weight[i]) for i in range(4)])
    torch.testing.assert_close(out, expected)
    flat = (x if x_batched else x.expand(4, *x.shape)).reshape(4, 6, 8)
    torch.testing.assert_close(stacked_linear(flat, weight), reference_stacked_linear(flat, weight))


def test_a_weight_shared_by_all_layers_is_one_plain_linear():
    x, weight = torch.randn(4, 3, 8), torch.randn(6, 8)
    with OpLog() as log:
        out = torch.vmap(linear, in_dims=(0, None))(x, weight)
    assert torch.ops.snlp.stacked_linear.default not in log.ops
    torch.testing.assert_close(out, F.linear(x, weight))


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
