"""Decode-time linears of all parallel layers at once: `snlp::linear` and `snlp::stacked_linear`.

At decode the rewritten graph multiplies a few tokens per layer by every layer's own weight: a
batched GEMV whose cost is reading the stacked weights once (the HBM floor). Layer graphs call
`snlp::linear` (one layer: x [..., K] @ cat(weights)^T, each weight [N_i, K]; several weights
are sibling linears of one input, e.g. q, k and v, computed by one kernel launch); under vmap it
becomes one `snlp::stacked_linear` (x [L, M, K] @ cat(weights)^T, each weight [L, N_i, K] ->
[L, M, sum N_i]). Invariants:

- both equal `F.linear` per weight, concatenated on the last dim / the naive
  `reference_stacked_linear` (float32 accumulation);
- both run the Triton kernel on CUDA for 16-bit inputs with at most `GEMV_MAX_TOKENS` rows per
  layer and at most `MAX_SIBLINGS` weights (one program per layer and BLOCK_N output features
  streams that weight tile once; the tiles come from `gemv_tiles`); otherwise, and on CPU, they
  are `torch.bmm` / `F.linear`. The kernel itself also runs on CPU under TRITON_INTERPRET=1 (tests);
- weights are read where they lie, at any strides (stride 0 on the layer axis: one weight shared
  by every layer), never copied;
- inference only: no autograd formula (the rewrite routes linears here only when not training).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs no Triton
    triton = None

GEMV_MAX_TOKENS = 16  # rows per layer the kernel handles (one 16-row tensor-core tile)
MAX_SIBLINGS = 4  # weights one launch reads (q, k, v; gate, up)


class GemvTiles(NamedTuple):
    """Launch configuration of the GEMV kernel."""

    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4


def gemv_tiles(layers: int, n: int, k: int) -> GemvTiles:
    """Tiles for [layers, n, k] weights, fitted to a sweep of the presets' decode shapes
    (benchmarks/bench_gemv.py --sweep): wide tiles while they still launch enough programs; narrow
    ones, long K steps and deeper pipelines when less than a wave of programs would each walk a long
    row; three stages once programs are plentiful, so that more of them share an SM."""

    def programs(block_n: int) -> int:
        return layers * -(-n // block_n)

    if programs(128) >= 200:
        block_n = 128
    elif programs(64) >= 200:
        block_n = 64
    else:
        block_n = 16 if k >= 2048 else 32
    few = programs(block_n) < 132
    return GemvTiles(block_n=block_n, block_k=256 if few and k >= 1280 else 128, num_stages=4 if few else 3)


def reference_stacked_linear(x: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """The naive reference: y[l] = x[l] @ cat(weights)[l]^T, accumulated in float32."""
    return torch.cat([torch.einsum("lmk,lnk->lmn", x.float(), w.float()) for w in weights], -1).to(x.dtype)


if triton is not None:

    @triton.jit
    def _stacked_gemv_kernel(
        x_ptr, y_ptr, w_ptr, M, K, sxl, sxm, sxk, syl, sym,
        n0, s0l, s0n, s0k, d1, n1, s1l, s1n, s1k, d2, n2, s2l, s2n, s2k, d3, n3, s3l, s3n, s3k,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """Program (layer, b): output block b of the concatenated outputs. Weight i lies d_i elements
        after w_ptr (d_0 = 0); the program picks its weight's offset, size, strides and output columns
        by scalar selects, so one tile loop (one set of shared-memory buffers) serves every weight."""
        layer = tl.program_id(0).to(tl.int64)  # layer * stride overflows int32 on large stacks
        b = tl.program_id(1)
        e0 = tl.cdiv(n0, BLOCK_N)
        e1 = e0 + tl.cdiv(n1, BLOCK_N)
        e2 = e1 + tl.cdiv(n2, BLOCK_N)
        in1, in2, in3 = b >= e0, b >= e1, b >= e2
        first = tl.where(in3, e2, tl.where(in2, e1, tl.where(in1, e0, 0)))
        col = tl.where(in3, n0 + n1 + n2, tl.where(in2, n0 + n1, tl.where(in1, n0, 0)))
        N = tl.where(in3, n3, tl.where(in2, n2, tl.where(in1, n1, n0)))
        offset = tl.where(in3, d3, tl.where(in2, d2, tl.where(in1, d1, 0)))
        swl = tl.where(in3, s3l, tl.where(in2, s2l, tl.where(in1, s1l, s0l)))
        swn = tl.where(in3, s3n, tl.where(in2, s2n, tl.where(in1, s1n, s0n)))
        swk = tl.where(in3, s3k, tl.where(in2, s2k, tl.where(in1, s1k, s0k)))
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = (b - first) * BLOCK_N + tl.arange(0, BLOCK_N)
        w_ptr += offset + layer * swl
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + layer * sxl + offs_m[:, None] * sxm + offs_k[None, :] * sxk,
                mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                other=0.0,
            )
            w = tl.load(
                w_ptr + offs_n[:, None] * swn + offs_k[None, :] * swk,
                mask=(offs_n[:, None] < N) & (offs_k[None, :] < K),
                other=0.0,
            )
            acc += tl.dot(x, tl.trans(w))
        y = y_ptr + layer * syl + offs_m[:, None] * sym + col + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def triton_stacked_linear(x: Tensor, weights: Sequence[Tensor], tiles: GemvTiles | None = None) -> Tensor:
    """The Triton kernel: x [L, M, K] (M <= GEMV_MAX_TOKENS) @ cat(weights)^T, 1 to MAX_SIBLINGS weights
    [L, N_i, K] -> [L, M, sum N_i] in x.dtype; `tiles` default to `gemv_tiles(L, sum N_i, K)`."""
    if triton is None:
        raise RuntimeError("triton_stacked_linear needs Triton (pip install triton)")
    L, M, K = x.shape
    sizes = [w.shape[1] if w.dim() == 3 else -1 for w in weights]
    if (
        not 1 <= len(weights) <= MAX_SIBLINGS
        or any(w.shape != (L, n, K) or w.dtype != weights[0].dtype for w, n in zip(weights, sizes, strict=True))
        or not 1 <= M <= GEMV_MAX_TOKENS
    ):
        raise ValueError(
            f"triton_stacked_linear: x [L, M, K] with 1 <= M <= {GEMV_MAX_TOKENS} and 1 to {MAX_SIBLINGS} "
            f"weights [L, N_i, K] of one dtype, got {tuple(x.shape)} and {[tuple(w.shape) for w in weights]}"
        )
    tiles = tiles or gemv_tiles(L, sum(sizes), K)
    y = x.new_empty((L, M, sum(sizes)))
    unused = MAX_SIBLINGS - len(weights)  # slots of zero features, never read
    padded, counts = [*weights, *[weights[0]] * unused], sizes + [0] * unused
    base, size = weights[0].data_ptr(), weights[0].element_size()
    slots = [(w.data_ptr() - base) // size for w in padded]  # element offsets from weights[0]
    slots = [a for w, n, d in zip(padded, counts, slots, strict=True) for a in (d, n, *w.stride())][1:]
    grid = (L, sum(-(-n // tiles.block_n) for n in sizes))
    _stacked_gemv_kernel[grid](
        x, y, weights[0], M, K, *x.stride(), y.stride(0), y.stride(1), *slots,
        BLOCK_M=GEMV_MAX_TOKENS, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return y


def _runs_gemv(x: Tensor, weights: Sequence[Tensor], rows: int) -> bool:
    """The kernel serves this call: CUDA, 16-bit weights of x's dtype (float32 stays off it: tl.dot
    would round it to TF32), 1 <= rows <= GEMV_MAX_TOKENS per layer, at most MAX_SIBLINGS weights."""
    half = x.dtype in (torch.float16, torch.bfloat16) and all(w.dtype == x.dtype for w in weights)
    fits = 1 <= rows <= GEMV_MAX_TOKENS and 1 <= len(weights) <= MAX_SIBLINGS
    return x.is_cuda and triton is not None and half and fits


def _check_weights(name: str, weights: Sequence[Tensor], dim: int) -> None:
    if not weights or any(w.dim() != dim for w in weights):
        raise ValueError(f"{name}: weights must be a non-empty list of {dim}-D tensors")


@torch.library.custom_op("snlp::stacked_linear", mutates_args=())
def stacked_linear(x: Tensor, weights: list[Tensor]) -> Tensor:
    """x [L, M, K] @ cat(weights)^T -> [L, M, sum N_i]: the Triton GEMV where `_runs_gemv`, else bmm."""
    _check_weights("stacked_linear", weights, 3)
    if _runs_gemv(x, weights, x.shape[1]):
        return triton_stacked_linear(x, weights)
    outs = [torch.bmm(x, w.transpose(1, 2)) for w in weights]
    return outs[0] if len(outs) == 1 else torch.cat(outs, -1)


@stacked_linear.register_fake
def _(x, weights):
    return x.new_empty((x.shape[0], x.shape[1], sum(w.shape[1] for w in weights)))


@torch.library.custom_op("snlp::linear", mutates_args=())
def linear(x: Tensor, weights: list[Tensor]) -> Tensor:
    """One layer's bias-free linears of one input, x [..., K] @ cat(weights)^T, each weight [N_i, K]: the
    Triton GEMV where `_runs_gemv` (decode; a one-layer stack), else F.linear; under vmap, one
    `stacked_linear`."""
    _check_weights("linear", weights, 2)
    if _runs_gemv(x, weights, x.numel() // max(x.shape[-1], 1)):
        rows = x.reshape(1, -1, x.shape[-1])
        out = triton_stacked_linear(rows, [w.unsqueeze(0) for w in weights])
        return out.reshape(*x.shape[:-1], out.shape[-1])
    outs = [F.linear(x, w) for w in weights]
    return outs[0] if len(outs) == 1 else torch.cat(outs, -1)


@linear.register_fake
def _(x, weights):
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


def _vmap(info, in_dims, x, weights):
    n = info.batch_size
    x_dim, weight_dims = in_dims
    x = x.movedim(x_dim, 0) if x_dim is not None else x.expand(n, *x.shape)
    if all(d is None for d in weight_dims):  # weights shared by every layer: plain linears, no per-layer copies
        return linear(x, weights), 0
    weights = [
        w.movedim(d, 0) if d is not None else w.expand(n, *w.shape) for w, d in zip(weights, weight_dims, strict=True)
    ]
    out = stacked_linear(x.reshape(n, -1, x.shape[-1]), weights)
    return out.reshape(*x.shape[:-1], out.shape[-1]), 0


linear.register_vmap(_vmap)


def bias_free_linear(input: Tensor, weight: Tensor, bias: None = None) -> Tensor:
    """Drop-in for a bias-free F.linear call in a rewritten graph (same argument names), through snlp::linear."""
    if bias is not None:
        raise ValueError("bias_free_linear: bias must be None")
    return linear(input, [weight])
