"""Rotary embedding of the rotate-half form in one kernel: `snlp::rotary`.

`rotary(x, cos, sin)` is `torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)` for the halves
x1, x2 of x's last dim: nine eager ops, eight of them passes over strided halves (a third of the
eager inner compiler's GPU time on a 24-layer block, RESULTS.md). The eager inner compiler's vmapped
layer graphs call it (`passes/rotary.py`). Invariants:

- the value is bitwise the nine ops' value: the Triton kernel rounds every product and sum to
  bfloat16 as those ops do (a product of two bfloat16 values is exact in float32, and each op
  computes in float32 and rounds once), for x, cos and sin in bfloat16 on CUDA where cos
  and sin, broadcast to x1's shape, vary over one run of collapsible dims (`table_rows`: positions,
  say) with a last-dim stride of 1. Otherwise, and on CPU, it runs the nine ops themselves; the
  kernel also runs on CPU under TRITON_INTERPRET=1 (tests);
- the output is a new contiguous tensor of x's shape (cos and sin broadcast to x1's shape) and the
  nine ops' dtype; x, cos and sin have at least one dim each;
- under vmap it is one call with the vmapped axis leading (an unbatched table broadcasts against it);
- inference only: it has no autograd formula (the rewrite uses it only outside training).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import eager_op, next_power_of_two

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs no Triton
    triton = None


def reference_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The nine eager ops the kernel replaces."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


class TableRows(NamedTuple):
    """Row r of x (as [rows, 2 * half]) reads table row ((r // inner) % period) * stride."""

    inner: int
    period: int
    stride: int


def table_rows(table: Tensor, x1_shape: torch.Size) -> TableRows | None:
    """How rows of x index a table that broadcasts to x1's shape, or None when the broadcast table's
    row dims that vary do not collapse into one run (or its last dim is not contiguous)."""
    try:
        expanded = table.expand(x1_shape)
    except RuntimeError:
        return None
    sizes, strides = expanded.shape[:-1], expanded.stride()[:-1]
    if expanded.shape[-1] > 1 and expanded.stride(-1) != 1:
        return None
    varying = [i for i, (size, stride) in enumerate(zip(sizes, strides, strict=True)) if size > 1 and stride != 0]
    if not varying:
        return TableRows(1, 1, 0)
    first, last = varying[0], varying[-1]
    run = [i for i in range(first, last + 1) if sizes[i] > 1]
    collapsible = all(strides[a] == strides[b] * sizes[b] for a, b in itertools.pairwise(run))
    if any(strides[i] == 0 for i in run) or not collapsible:
        return None
    return TableRows(math.prod(sizes[last + 1 :]), math.prod(sizes[first : last + 1]), strides[last])


class RotaryTiles(NamedTuple):
    block_r: int
    block_d: int
    num_warps: int


def rotary_tiles(half: int) -> RotaryTiles:
    """About 2048 elements of each half per program."""
    block_d = next_power_of_two(half)
    return RotaryTiles(max(1, 2048 // block_d), block_d, 4)


if triton is not None:

    @triton.jit
    def _round(value):
        """float32 -> the nearest bfloat16 (ties to even), as float32. Integer arithmetic on the bits:
        the compiler folds a float round trip (`.to(tl.bfloat16).to(tl.float32)`) away and then
        contracts the products and sums into FMAs, which round differently from the eager ops."""
        bits = value.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return tl.where(value == value, bits.to(tl.float32, bitcast=True), value)  # NaN stays NaN

    @triton.jit
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, rows, half, inner, period, stride,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        """Rows [pid * BLOCK_R, +BLOCK_R) of x as [rows, 2 * half] (bfloat16), rounding each op's result."""
        offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_r[:, None] < rows) & (offs_d[None, :] < half)
        first = offs_r[:, None] * (2 * half) + offs_d[None, :]
        table = ((offs_r // inner) % period)[:, None] * stride + offs_d[None, :]
        x1 = tl.load(x_ptr + first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + first + half, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
        y1 = _round(_round(x1 * c) + _round(x2 * s))
        y2 = _round(_round(x2 * c) - _round(x1 * s))  # bitwise (-x1 * s) + x2 * c; no negation, which
        # some Triton versions lower to 0 - x (+0.0 for x = +0.0 where torch.neg gives -0.0)
        tl.store(y_ptr + first, y1.to(tl.bfloat16), mask=mask)
        tl.store(y_ptr + first + half, y2.to(tl.bfloat16), mask=mask)


_LAYOUTS: dict[tuple, TableRows | None] = {}  # by operand shapes and strides: the host time is the launch's
_MAX_LAYOUTS = 1024


def _kernel_layout(x: Tensor, cos: Tensor, sin: Tensor) -> TableRows | None:
    """The shared row indexing of cos and sin when the kernel can serve these operands, else None."""
    key = (x.shape, x.stride(), x.dtype, cos.shape, cos.stride(), cos.dtype, sin.shape, sin.stride(), sin.dtype)
    if key not in _LAYOUTS:
        if len(_LAYOUTS) >= _MAX_LAYOUTS:  # many shapes (dynamic sequence lengths): start over
            _LAYOUTS.clear()
        _LAYOUTS[key] = _uncached_layout(x, cos, sin)
    return _LAYOUTS[key]


def _uncached_layout(x: Tensor, cos: Tensor, sin: Tensor) -> TableRows | None:
    half = x.shape[-1] // 2 if x.dim() else 0
    if half < 1 or x.shape[-1] != 2 * half or not x.is_contiguous() or x.numel() == 0:
        return None
    if x.dtype != torch.bfloat16 or cos.dtype != x.dtype or sin.dtype != x.dtype:
        return None
    x1_shape = x.shape[:-1] + (half,)
    rows_cos, rows_sin = table_rows(cos, x1_shape), table_rows(sin, x1_shape)
    return rows_cos if rows_cos is not None and rows_cos == rows_sin else None


def triton_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The Triton kernel (see the module invariants for the operands it serves; ValueError otherwise)."""
    if triton is None:
        raise RuntimeError("triton_rotary needs Triton (pip install triton)")
    layout = _kernel_layout(x, cos, sin)
    return _launch(x, cos, sin, layout)


def _launch(x: Tensor, cos: Tensor, sin: Tensor, layout: TableRows | None) -> Tensor:
    if layout is None or x.device != cos.device or x.device != sin.device:
        raise ValueError(
            "triton_rotary: x contiguous with an even last dim, and cos and sin of x's dtype (bfloat16) and device "
            "that broadcast to x1's shape and vary over one run of collapsible dims with a contiguous last dim; "
            f"got x {tuple(x.shape)} {x.dtype}, cos {tuple(cos.shape)} {cos.dtype}, sin {tuple(sin.shape)} {sin.dtype}"
        )
    half = x.shape[-1] // 2
    rows = x.numel() // x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, as the cat of the nine ops
    tiles = rotary_tiles(half)
    _rotary_kernel[(triton.cdiv(rows, tiles.block_r),)](
        x, cos, sin, out, rows, half, *layout,  # the layout indexes the tables as broadcast to x1
        BLOCK_R=tiles.block_r, BLOCK_D=tiles.block_d, num_warps=tiles.num_warps,
    )  # fmt: skip
    return out


def _triton_layout(x: Tensor, cos: Tensor, sin: Tensor) -> TableRows | None:
    """The kernel's table indexing where it serves this call on CUDA, else None."""
    if not (x.is_cuda and triton is not None and x.device == cos.device == sin.device):
        return None
    return _kernel_layout(x, cos, sin)


def _check_ranks(x_dim: int, cos_dim: int, sin_dim: int) -> None:
    if min(x_dim, cos_dim, sin_dim) < 1:
        raise ValueError(
            f"snlp::rotary: x, cos and sin must have at least one dim (a 0-dim table promotes dtypes as a "
            f"Python scalar would), got {x_dim}, {cos_dim} and {sin_dim} dims"
        )


def _kernel(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The rotate-half rotary embedding of x by cos and sin (see the module invariants)."""
    _check_ranks(x.dim(), cos.dim(), sin.dim())
    if (layout := _triton_layout(x, cos, sin)) is not None:
        return _launch(x, cos, sin, layout)
    return _checked_reference(x, cos, sin)


def _checked_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The nine ops' value, contiguous, for tables that do not broadcast x larger (ValueError)."""
    out = reference_rotary(x, cos, sin)
    if out.shape != x.shape:
        raise ValueError(
            f"snlp::rotary: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must broadcast to x's "
            f"halves {tuple(x.shape[:-1])} + ({x.shape[-1] // 2},) without enlarging them"
        )
    return out.contiguous()


def _fake(x, cos, sin):
    _check_ranks(x.dim(), cos.dim(), sin.dim())
    return _checked_reference(x, cos, sin)  # on fake tensors: the nine ops' shape and dtype


def _vmap(info, in_dims, x, cos, sin):
    """The vmapped axis leads every batched operand, the others keep their logical dims trailing (as
    broadcasting aligns them), so one call computes every layer."""
    rank = x.dim() - (in_dims[0] is not None)
    _check_ranks(*(v.dim() - (d is not None) for v, d in zip((x, cos, sin), in_dims, strict=True)))

    def leading(value: Tensor, dim: int | None) -> Tensor:
        if dim is None:
            return value
        value = value.movedim(dim, 0)
        return value.reshape(value.shape[0], *[1] * (rank - value.dim() + 1), *value.shape[1:])

    x, cos, sin = (leading(v, d) for v, d in zip((x, cos, sin), in_dims, strict=True))
    if in_dims[0] is None:
        x = x.expand(info.batch_size, *x.shape)
    return rotary(x, cos, sin), 0


rotary = eager_op("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor", _kernel, _fake, _vmap)
