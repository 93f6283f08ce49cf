"""Decode-time linears of all parallel layers at once: `snlp::linear` and `snlp::stacked_linear`.

At decode the rewritten graph multiplies a few tokens per layer by every layer's own weight: a
batched GEMV whose cost is reading the stacked weights once (the HBM floor). Layer graphs call
`snlp::linear` (one layer: x [..., K] @ weight[N, K]^T); under vmap it becomes one
`snlp::stacked_linear` (x [L, M, K] @ weight[L, N, K]^T -> [L, M, N]). Invariants:

- both equal `F.linear` / the naive `reference_stacked_linear` (float32 accumulation);
- `stacked_linear` runs the Triton kernel on CUDA when M <= `GEMV_MAX_TOKENS` (one program per
  layer and BLOCK_N output features streams that weight tile once); otherwise, and on CPU, it is
  `torch.bmm`. The kernel itself also runs on CPU under TRITON_INTERPRET=1 (tests);
- inference only: no autograd formula (the rewrite routes linears here only when not training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs no Triton
    triton = None

GEMV_MAX_TOKENS = 16  # rows per layer the kernel handles (one 16-row tensor-core tile)


def reference_stacked_linear(x: Tensor, weight: Tensor) -> Tensor:
    """The naive reference: y[l] = x[l] @ weight[l]^T, accumulated in float32."""
    return torch.einsum("lmk,lnk->lmn", x.float(), weight.float()).to(x.dtype)


if triton is not None:

    @triton.jit
    def _stacked_gemv_kernel(
        x_ptr,
        w_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xl,
        stride_xm,
        stride_xk,
        stride_wl,
        stride_wn,
        stride_wk,
        stride_yl,
        stride_ym,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        layer = tl.program_id(0).to(tl.int64)  # layer * stride overflows int32 on large stacks
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + layer * stride_xl + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                other=0.0,
            )
            w = tl.load(
                w_ptr + layer * stride_wl + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                mask=(offs_n[:, None] < N) & (offs_k[None, :] < K),
                other=0.0,
            )
            acc += tl.dot(x, tl.trans(w))
        y = y_ptr + layer * stride_yl + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def triton_stacked_linear(x: Tensor, weight: Tensor, block_n: int = 64, block_k: int = 128) -> Tensor:
    """The Triton kernel: x [L, M, K] (M <= GEMV_MAX_TOKENS) @ weight[L, N, K]^T -> [L, M, N] in x.dtype."""
    if triton is None:
        raise RuntimeError("triton_stacked_linear needs Triton (pip install triton)")
    L, M, K = x.shape
    N = weight.shape[1]
    if weight.shape != (L, N, K) or not 1 <= M <= GEMV_MAX_TOKENS:
        raise ValueError(
            f"triton_stacked_linear: x [L, M, K] with 1 <= M <= {GEMV_MAX_TOKENS} and weight [L, N, K], "
            f"got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    y = x.new_empty((L, M, N))
    grid = (L, triton.cdiv(N, block_n))
    _stacked_gemv_kernel[grid](  # any strides: the stacked weights are read where they lie, never copied
        x, weight, y, M, N, K, *x.stride(), *weight.stride(), y.stride(0), y.stride(1),
        BLOCK_M=GEMV_MAX_TOKENS, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return y


@torch.library.custom_op("snlp::stacked_linear", mutates_args=())
def stacked_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [L, M, K] @ weight[L, N, K]^T -> [L, M, N]: the Triton GEMV on CUDA for 16-bit inputs and
    1 <= M <= GEMV_MAX_TOKENS, else bmm (float32 stays off the kernel: tl.dot would round it to TF32)."""
    half = x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype
    if x.is_cuda and triton is not None and half and 1 <= x.shape[1] <= GEMV_MAX_TOKENS:
        return triton_stacked_linear(x, weight)
    return torch.bmm(x, weight.transpose(1, 2))


@stacked_linear.register_fake
def _(x, weight):
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[1]))


@torch.library.custom_op("snlp::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor) -> Tensor:
    """One layer's bias-free linear, x [..., K] @ weight[N, K]^T; under vmap, one `stacked_linear`."""
    return F.linear(x, weight)


@linear.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _vmap(info, in_dims, x, weight):
    n = info.batch_size
    x = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(n, *x.shape)
    if in_dims[1] is None:  # one weight shared by every layer: a plain linear, no per-layer copies
        return F.linear(x, weight), 0
    weight = weight.movedim(in_dims[1], 0)
    out = stacked_linear(x.reshape(n, -1, x.shape[-1]), weight)
    return out.reshape(*x.shape[:-1], weight.shape[1]), 0


linear.register_vmap(_vmap)


def bias_free_linear(input: Tensor, weight: Tensor, bias: None = None) -> Tensor:
    """Drop-in for a bias-free F.linear call in a rewritten graph (same argument names), through snlp::linear."""
    if bias is not None:
        raise ValueError("bias_free_linear: bias must be None")
    return linear(input, weight)
