"""`snlp::float32_linear`: `F.linear(x, weight).float()` as one GEMM with a float32 output.

A language model's head is often a 16-bit linear followed by a float32 cast of the logits. For a
long prompt those logits are the largest tensor of the forward ([T, vocab]): inductor runs the
cuBLAS GEMM, writes the 16-bit logits and then reads them again in a separate cast kernel.
Invariants:

- on CUDA with 16-bit x and weight of one dtype: one cuBLAS GEMM that accumulates in float32 and
  writes float32 (`torch.mm(..., out_dtype=torch.float32)`), so the logits are the float32 cast of
  the unrounded product (they differ from the 16-bit model's by its rounding, at most half a
  16-bit ulp);
- anywhere else (CPU, float32): exactly `F.linear(x, weight).float()`;
- needs `torch.mm(..., out_dtype=)` on CUDA (torch >= 2.8; the package requires 2.9);
- the output is a new contiguous tensor; no autograd formula (inference only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import HALF_DTYPES


def runs_float32_gemm(x: Tensor, weight: Tensor) -> bool:
    """The single-GEMM path serves this call: CUDA, 16-bit x and weight of one dtype and device."""
    return x.is_cuda and x.dtype in HALF_DTYPES and weight.dtype == x.dtype and weight.device == x.device


def _check_shapes(x: Tensor, weight: Tensor) -> None:
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            "float32_linear: x [..., K] and weight [N, K] must agree on K, "
            f"got {tuple(x.shape)} and {tuple(weight.shape)}"
        )


@torch.library.custom_op("snlp::float32_linear", mutates_args=())
def float32_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., K] @ weight [N, K]^T as float32 [..., N] (see the module invariants)."""
    _check_shapes(x, weight)
    if runs_float32_gemm(x, weight):
        rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # explicit sizes: K may be 0
        return torch.mm(rows, weight.t(), out_dtype=torch.float32).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight).float()


@float32_linear.register_fake
def _(x, weight):
    _check_shapes(x, weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)
