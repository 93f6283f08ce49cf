"""RMS normalisation that vmap folds into one fused call: `snlp::rms_norm`.

vmap has no batching rule for the fused RMS-norm kernel, so under vmap `torch.rms_norm` runs its
decomposition instead: a float32 copy, pow, mean, rsqrt, a multiply and a cast back, each a kernel
over the whole batched tensor (benchmarks/RESULTS.md: most of the eager path's extra GPU time).
The rewrite gives this op to the layer graphs that the eager inner compiler runs under vmap;
inductor fuses a norm by itself, so its graphs keep `torch.rms_norm`. Invariants:

- the op computes `torch.rms_norm` (same arguments and defaults, output dtype the input's): on CUDA,
  for a contiguous input of at least `TRITON_MIN_NUMEL` elements normalised over its last dim (at
  most `TRITON_MAX_DIM`) with no weight or one of its dtype, through a Triton kernel that normalises
  `BLOCK_R` whole rows per program (float32 arithmetic, as torch's kernel; results may differ from
  it by the rounding of a float32 sum). torch's CUDA kernel runs one block per row and reaches a
  third of the memory bandwidth on the 128-wide rows of a QK norm (RESULTS.md). Otherwise, and on
  CPU, it is `torch.rms_norm`; the kernel itself runs on CPU under TRITON_INTERPRET=1 (tests);
- under vmap it is one call over the vmapped axis as a leading axis; a per-layer (batched)
  weight then scales the normalised tensor, which rounds once more in 16-bit dtypes than the
  fused kernel does (a shared weight or none: the same values as a per-layer loop);
- inference only: it has no autograd formula (the rewrite never uses it for training graphs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import HALF_DTYPES, eager_op, next_power_of_two

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs no Triton
    triton = None

TRITON_MIN_NUMEL = 1 << 23  # below this the launch (host time), not the bandwidth, is the cost: torch's kernel stays
TRITON_MAX_DIM = 8192  # widest row one program holds in registers


class NormTiles(NamedTuple):
    """Launch configuration of the RMS-norm kernel: BLOCK_R rows of BLOCK_N (>= the row) per program."""

    block_r: int
    block_n: int
    num_warps: int


def norm_tiles(dim: int) -> NormTiles:
    """About 4096 elements per program: 32 rows of a 128-wide QK norm, 4 of a 640-wide hidden state."""
    block_n = next_power_of_two(dim)
    block_r = max(1, 4096 // block_n)
    return NormTiles(block_r, block_n, 4 if block_r * block_n <= 4096 else 8)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, rows, N, eps, HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_N: tl.constexpr):  # fmt: skip
        """Rows [pid * BLOCK_R, +BLOCK_R) of the [rows, N] input: y = x * rsqrt(mean(x^2) + eps) (* w)."""
        offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_n = tl.arange(0, BLOCK_N)
        mask = (offs_r[:, None] < rows) & (offs_n[None, :] < N)
        offs = offs_r[:, None] * N + offs_n[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        y = x * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def default_eps(dtype: torch.dtype) -> float:
    """torch.rms_norm's eps when none is given: the machine epsilon of the dtype it computes in."""
    return torch.finfo(torch.float32 if dtype in HALF_DTYPES else dtype).eps


def triton_rms_norm(x: Tensor, weight: Tensor | None = None, eps: float | None = None) -> Tensor:
    """The Triton kernel: `torch.rms_norm(x, [x.shape[-1]], weight, eps)` for a contiguous x whose last
    dim is at most TRITON_MAX_DIM, and a weight of that size and x's dtype, or none."""
    if triton is None:
        raise RuntimeError("triton_rms_norm needs Triton (pip install triton)")
    if not _kernel_serves(x, weight):
        raise ValueError(
            f"triton_rms_norm: a contiguous input with a last dim of 1 to {TRITON_MAX_DIM} and a weight of that "
            f"size and the input's dtype (or none), got {tuple(x.shape)} {x.dtype} (contiguous: {x.is_contiguous()})"
            f" and {None if weight is None else (tuple(weight.shape), weight.dtype)}"
        )
    out, dim = torch.empty_like(x), x.shape[-1]
    rows = x.numel() // dim
    tiles = norm_tiles(dim)
    eps = default_eps(x.dtype) if eps is None else eps
    _rms_norm_kernel[(triton.cdiv(rows, tiles.block_r),)](
        x, x if weight is None else weight, out, rows, dim, eps,
        HAS_WEIGHT=weight is not None, BLOCK_R=tiles.block_r, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps,
    )  # fmt: skip
    return out


def _kernel_serves(x: Tensor, weight: Tensor | None) -> bool:
    """The kernel computes these operands (normalised over x's last dim): a contiguous x whose last dim
    is 1 to TRITON_MAX_DIM, and a contiguous weight of that size and x's dtype, or none."""
    dim = x.shape[-1] if x.dim() else 0
    weight_ok = weight is None or (weight.shape == (dim,) and weight.dtype == x.dtype and weight.is_contiguous())
    return x.is_contiguous() and 1 <= dim <= TRITON_MAX_DIM and weight_ok


def _runs_triton(x: Tensor, normalized_shape: list[int], weight: Tensor | None) -> bool:
    """The op takes the kernel for this call (see the module invariants)."""
    last_dim = len(normalized_shape) == 1 and x.dim() >= 1 and normalized_shape[0] == x.shape[-1]
    floating = x.dtype in HALF_DTYPES or x.dtype == torch.float32
    large = x.numel() >= TRITON_MIN_NUMEL
    return x.is_cuda and triton is not None and floating and large and last_dim and _kernel_serves(x, weight)


def _kernel(
    input: Tensor, normalized_shape: list[int], weight: Tensor | None = None, eps: float | None = None
) -> Tensor:
    if _runs_triton(input, normalized_shape, weight):
        return triton_rms_norm(input, weight, eps)
    return torch.rms_norm(input, normalized_shape, weight, eps)


def _fake(input, normalized_shape, weight=None, eps=None):
    return torch.empty_like(input)


def _vmap(info, in_dims, input, normalized_shape, weight=None, eps=None):
    x_dim, w_dim = in_dims[0], in_dims[2] if len(in_dims) > 2 else None  # one entry per argument passed
    x = input if x_dim is None else input.movedim(x_dim, 0)
    if w_dim is None:  # then the input is batched (vmap calls this rule only when something is)
        return rms_norm(x, normalized_shape, weight, eps), 0
    w = weight.movedim(w_dim, 0)
    scale = w.reshape(w.shape[0], *[1] * (x.dim() - (x_dim is not None) - (w.dim() - 1)), *w.shape[1:])
    return (rms_norm(x, normalized_shape, None, eps) * scale).to(input.dtype), 0


rms_norm = eager_op(
    "rms_norm(Tensor input, int[] normalized_shape, Tensor? weight=None, float? eps=None) -> Tensor",
    _kernel,
    _fake,
    _vmap,
)
